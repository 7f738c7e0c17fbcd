"""The decoders of SQD: audio-visual fusion, audio semantic decoders, recombination, mask decoder.

What this file teaches
    How a handful of learnable queries turn a feature map into a set of tokens (the transformer
    decoder TrD), and how SQD uses that one idea three times: to decompose the clip's audio into N
    semantic tokens (global ASD), to decompose each frame's audio (local ASD), and to turn each
    quantized local token into a mask, a class and a box (the semantic-guided mask decoder, whose
    masks come from a dynamic convolution whose filters the token itself writes).

Paper: §3.3 eq. (3)-(5) and §3.4 eq. (6)-(7), in the reading order below; Fig. 4: the ASD (a) and
the mask decoder (b); App. D: 3 layers per TrD. Public code this follows: DETR's post-norm decoder
layer, CondInst's dynamic mask head (parameter layout, grouped 1x1 convolutions, relative
coordinates), ReferFormer's per-layer heads.

Reading order
    1. mlp, with_pos                   two small helpers (two-layer MLP, optional positional add)
    2. DecoderLayer, TransformerDecoder TrD: self-attn, cross-attn, FFN, each residual + LayerNorm
    3. AudioVisualFusion                §3.3 eq. (3) audio-visual fusion
    4. AudioSemanticDecoder             §3.3 eq. (4) global ASD; §3.4 eq. (6) local ASD
    5. ChannelLayerNorm, MaskedBatchNorm2d, SemanticRecombination   §3.3 eq. (5) recombination
    6. num_dynamic_params, dynamic_mask_conv                        §3.4 eq. (7), dynamic conv
    7. SemanticMaskDecoder              §3.4 eq. (7) TrD_segm + controller + class/box heads,
                                        relative coordinates

Shape alphabet (the repository's one alphabet: docs/shapes.md)
    B clips, T frames, N semantic tokens, C model channels, Q queries of a decoder, S memory tokens
    (a frame's visual tokens, or T*S for a clip), L decoder layers, Kc foreground classes, H_l, W_l
    size of one visual level, Cm mask-feature channels (8), h, w mask resolution (H/4, W/4), G images
    of the dynamic convolution, Pd dynamic parameters per token, Cin its input channels (2 + Cm).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# 1. helpers ---------------------------------------------------------------------------------------

def mlp(in_dim, hidden_dim, out_dim):
    """Two-layer MLP, an nn.Sequential (..., in_dim) -> (..., out_dim): Linear -> ReLU -> Linear
    (the FFN, the heads, the controller). A Dropout(0) stands where DETR's FFN has its dropout, so
    the Linears keep indices 0 and 3 in the state_dict keys of saved runs."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(0.0),
                         nn.Linear(hidden_dim, out_dim))


def with_pos(x, pos):
    """x (..., C) + pos (the same shape), or x when pos is None (DETR adds it to queries/keys only)."""
    return x if pos is None else x + pos


# 2. the transformer decoder TrD -------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """One DETR post-norm decoder layer: self-attn, cross-attn, FFN, each with residual + LayerNorm."""

    def __init__(self, dim, num_heads, ffn_dim):
        super().__init__()
        # PAPER: TrD is named, not specified; we use DETR's post-norm layer (self-attention among
        # the queries, cross-attention to the memory, FFN), without dropout (DETR: 0.1).
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ffn = mlp(dim, ffn_dim, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, memory, query_pos=None, memory_pos=None, memory_padding_mask=None):
        q = k = with_pos(x, query_pos)  # (B, Q, C)
        x = self.norm1(x + self.self_attn(q, k, x, need_weights=False)[0])  # (B, Q, C)
        attn = self.cross_attn(with_pos(x, query_pos), with_pos(memory, memory_pos), memory,
                               key_padding_mask=memory_padding_mask, need_weights=False)[0]  # (B, Q, C)
        x = self.norm2(x + attn)  # (B, Q, C)
        return self.norm3(x + self.ffn(x))  # (B, Q, C)


class TransformerDecoder(nn.Module):
    """TrD: a stack of DETR post-norm decoder layers that returns every layer's output.

    forward: queries (B, Q, C) the query content, memory (B, S, C) the tokens the queries read;
        query_pos (B, Q, C) or None, memory_pos (B, S, C) or None: added to queries / keys, never
        values; memory_padding_mask (B, S) bool or None, True = ignore that memory token
    returns (L, B, Q, C): the output of each of the L layers (the last one is the decoder's output;
        the earlier ones feed the auxiliary losses)
    """

    def __init__(self, dim, num_layers, num_heads, ffn_dim):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim) for _ in range(num_layers))

    def forward(self, queries, memory, query_pos=None, memory_pos=None, memory_padding_mask=None):
        x, outputs = queries, []
        for layer in self.layers:
            x = layer(x, memory, query_pos, memory_pos, memory_padding_mask)  # (B, Q, C)
            outputs.append(x)
        # PAPER: no extra final LayerNorm (DETR has one); a post-norm layer already ends in LN,
        # as in Deformable DETR.
        return torch.stack(outputs)  # (L, B, Q, C)


# 3. eq. (3): audio tokens read the visual tokens --------------------------------------------------

class AudioVisualFusion(nn.Module):
    """Eq. (3): h_a = LN(MCA(F_a, F_v) + F_a), F'_a = LN(FFN(h_a) + h_a).

    forward(audio, visual, visual_pos=None, audio_pos=None, visual_padding_mask=None)
        audio:  (B, T, C) F_a, one token per frame (the queries of the cross-attention)
        visual: (B, T*S, C) F_v, every frame's tokens of all levels (keys and values)
        visual_pos (B, T*S, C) or None, audio_pos (B, T, C) or None: added to keys / queries
        visual_padding_mask (B, T*S) bool or None: True = a token of a padding frame, never attended
    returns (B, T, C) F'_a
    """

    def __init__(self, dim, num_heads, ffn_dim):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = mlp(dim, ffn_dim, dim)

    def forward(self, audio, visual, visual_pos=None, audio_pos=None, visual_padding_mask=None):
        # PAPER: positional embeddings go to queries and keys, not values, as in DETR.
        mca = self.cross_attn(with_pos(audio, audio_pos), with_pos(visual, visual_pos), visual,
                              key_padding_mask=visual_padding_mask, need_weights=False)[0]  # (B, T, C) MCA(F_a, F_v)
        h_a = self.norm1(mca + audio)  # eq. (3), second line: (B, T, C)
        return self.norm2(self.ffn(h_a) + h_a)  # eq. (3), first line: (B, T, C)


# 4. eq. (4) and (6): learnable prototypes query the audio -----------------------------------------

class AudioSemanticDecoder(nn.Module):
    """ASD (Fig. 4a): N learnable prototypes p_i query audio tokens with a TrD.

    Global ASD, eq. (4): g_i = TrD_global(p_i | F'_a), memory F'_a (B, T, C).
    Local ASD, eq. (6):  l_{i,t} = TrD_local(p_i | f_{a,t}), frames flattened into the batch:
        memory (B*T, 1, C), the frame's audio vector; output viewed back to (B, T, N, C) by the caller.

    forward(memory, memory_pos=None, memory_padding_mask=None): memory (B', T or 1, C), memory_pos
    the same or None, memory_padding_mask (B', T or 1) bool or None (True = a padding frame's
    token, never attended) -> (B', N, C), the semantic tokens of the last decoder layer.
    """

    def __init__(self, dim, num_tokens, num_layers, num_heads, ffn_dim):
        super().__init__()
        # PAPER: the prototypes are the decoder's input content (DETR instead feeds zeros and adds a
        # learned query embedding at every layer); N(0, 1) init, as nn.Embedding.
        self.prototypes = nn.Parameter(torch.randn(num_tokens, dim))  # (N, C)
        self.decoder = TransformerDecoder(dim, num_layers, num_heads, ffn_dim)

    def forward(self, memory, memory_pos=None, memory_padding_mask=None):
        queries = self.prototypes.expand(memory.shape[0], -1, -1)  # (B', N, C)
        return self.decoder(queries, memory, memory_pos=memory_pos,
                            memory_padding_mask=memory_padding_mask)[-1]  # eq. (4) / (6): (B', N, C)


# 5. eq. (5): the tokens modulate the visual channels, phi recombines them -------------------------

class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of a map: (B', C, H, W) -> (B', C, H, W).
    `valid` only matches MaskedBatchNorm2d's interface: nothing is shared between positions."""

    def forward(self, x, valid=None):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B', C, H, W)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from the real frames only.

    forward(x, valid=None)
        x: (B', C, H, W) the frames of a batch; valid: (B',) bool or None, False = a padding frame
    returns (B', C, H, W). With valid None, or in eval mode, this is nn.BatchNorm2d itself. In
    training mode the mean and (biased) variance are taken over the valid frames' pixels, and
    the running statistics are updated with them (unbiased variance, as torch does), so a clip
    padded with any content normalises exactly as the same clip unpadded. No host sync.
    """

    def forward(self, x, valid=None):
        if valid is None or not self.training:
            return super().forward(x)
        m = valid.to(x.dtype)[:, None, None, None]  # (B', 1, 1, 1)
        n = m.sum() * x.shape[2] * x.shape[3]  # () valid pixels per channel
        mean = (x * m).sum((0, 2, 3)) / n  # (C,)
        var = ((x - mean[:, None, None]).pow(2) * m).sum((0, 2, 3)) / n  # (C,) biased
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)  # (C,)
            self.running_var.lerp_(var * n / (n - 1).clamp(min=1), self.momentum)  # (C,) unbiased
        x_hat = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)  # (B', C, H, W)
        return x_hat * self.weight[:, None, None] + self.bias[:, None, None]  # (B', C, H, W)


class SemanticRecombination(nn.Module):
    """AVSR, eq. (5): F'_v = BN(phi(w_1 F_v (+) ... (+) w_N F_v) + F_v), for one visual level.

    w_i (C,) = two linear layers of token i; w_i F_v is channel-wise attention, here sigmoid(w_i) *
    F_v (forward's PAPER note); (+) concatenates channels; phi is a 1x1 conv N*C -> C. One per level.

    forward(tokens, visual, frame_valid=None)
        tokens: (B, N, C) the (quantized) global semantic tokens e_i (the paper also says g_i:
                the PAPER note in sqd.SQD.forward)
        visual: (B, T, C, H_l, W_l) F_v at one level
        frame_valid: (B, T) bool or None; padding frames (False) stay out of BN's statistics
    returns (B, T, C, H_l, W_l) F'_v
    """

    def __init__(self, dim, num_tokens, batch_norm=True):
        super().__init__()
        # PAPER: "two linear layers" read as Linear -> ReLU -> Linear with hidden width C.
        self.filters = mlp(dim, dim, dim)
        self.phi = nn.Conv2d(num_tokens * dim, dim, kernel_size=1)
        # NOT IN PAPER: batch_norm=False (the CPU preset) replaces eq. (5)'s BN by a per-position
        # LayerNorm over channels; docs/paper-silent.md#layernorm-for-bn-in-the-cpu-preset.
        # PAPER: BN's statistics are taken over the real frames only (padding frames, of AVSS's
        # 5-frame v1s/v1m clips in a 10-frame batch or at Table 6's T = 7, would shift them).
        self.norm = MaskedBatchNorm2d(dim) if batch_norm else ChannelLayerNorm(dim)

    def forward(self, tokens, visual, frame_valid=None):
        B, T, C, H, W = visual.shape  # (B, T, C, H_l, W_l)
        w = self.filters(tokens)  # (B, N, C) dynamic filters w_i
        # PAPER: "channel-wise attention" read as an SE-style gate sigmoid(w_i) in (0, 1), not as
        # eq. (5)'s literal product by w_i; docs/paper-silent.md#the-sigmoid-gate-of-eq-5.
        w = w.sigmoid()  # (B, N, C)
        modulated = w[:, None, :, :, None, None] * visual[:, :, None]  # (B, T, N, C, H_l, W_l) w_i F_v
        concat = modulated.reshape(B * T, -1, H, W)  # (B*T, N*C, H_l, W_l) w_1 F_v (+) ... (+) w_N F_v
        valid = None if frame_valid is None else frame_valid.reshape(B * T)  # (B*T,)
        out = self.norm(self.phi(concat) + visual.reshape(B * T, C, H, W), valid)  # eq. (5): (B*T, C, H_l, W_l)
        return out.view(B, T, C, H, W)  # (B, T, C, H_l, W_l)


# 6. eq. (7): the dynamic convolution (CondInst layout) --------------------------------------------

def _dynamic_layer_shapes(in_channels, channels, num_layers):
    """(c_out, c_in) of each 1x1 layer: in -> channels -> ... -> channels -> 1 (one mask logit)."""
    c_in = [in_channels] + [channels] * (num_layers - 1)
    c_out = [channels] * (num_layers - 1) + [1]
    return list(zip(c_out, c_in))


def num_dynamic_params(in_channels, channels=8, num_layers=3):
    """Pd, the parameters per token of the dynamic mask head: weights plus biases of every 1x1 layer.

    in_channels Cin counts all the first layer sees (Cm feature channels + 2 coordinates); channels
    and num_layers are ints. CondInst's sizes: (8 + 2) * 8 + 8 + 8 * 8 + 8 + 8 * 1 + 1 = 169.
    """
    return sum(c_out * c_in + c_out for c_out, c_in in _dynamic_layer_shapes(in_channels, channels,
                                                                             num_layers))


def dynamic_mask_conv(features, theta, channels=8, num_layers=3, rel_coords=None):
    """Eq. (7), M = f_out * theta: every token runs its own small 1x1-conv net over the mask features.

    All tokens of all images run at once as one grouped convolution (groups = G*Q), as CondInst.
    Parameter layout (CondInst): all layers' weights first (layer 0, 1, ...), then all biases;
    a layer's weights are (c_out, c_in) row-major. ReLU between layers, none after the last.

    features:   (G, Cm, h, w) mask features of G images (shared by that image's tokens)
    theta:      (G, Q, Pd) theta_{i,t} of each token, Pd = num_dynamic_params(Cin, channels, num_layers)
    rel_coords: (G, Q, 2, h, w) or None; when given they are put before the Cm feature channels,
                so Cin = 2 + Cm
    returns (G, Q, h, w) mask logits
    """
    G, Q, Pd = theta.shape
    x = features[:, None].expand(-1, Q, -1, -1, -1)  # (G, Q, Cm, h, w)
    if rel_coords is not None:
        x = torch.cat([rel_coords, x], dim=2)  # (G, Q, Cin, h, w), channels: (x, y, features)
    c_in, h, w = x.shape[2:]
    shapes = _dynamic_layer_shapes(c_in, channels, num_layers)  # [(c_out, c_in)] per layer
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]  # every layer's weights, then biases
    if Pd != sum(sizes):  # num_dynamic_params(c_in, channels, num_layers)
        raise ValueError(f"got {Pd} dynamic parameters per token, need {sum(sizes)} "
                         f"for {c_in} input channels")
    chunks = theta.reshape(G * Q, Pd).split(sizes, dim=1)  # weights then biases, each (G*Q, size)
    weights, biases = chunks[:num_layers], chunks[num_layers:]  # num_layers x (G*Q, c_out*c_in), x (G*Q, c_out)
    x = x.reshape(1, G * Q * c_in, h, w)  # (1, G*Q*Cin, h, w) every token's input side by side
    for layer, (c_out, c_in) in enumerate(shapes):
        weight = weights[layer].reshape(G * Q * c_out, c_in, 1, 1)  # (G*Q*c_out, c_in, 1, 1)
        x = F.conv2d(x, weight, biases[layer].reshape(-1), groups=G * Q)  # (1, G*Q*c_out, h, w)
        if layer < num_layers - 1:
            x = F.relu(x)  # (1, G*Q*c_out, h, w)
    return x.view(G, Q, h, w)  # eq. (7): (G, Q, h, w) mask logits


# 7. the semantic-guided mask decoder (Fig. 4b) ----------------------------------------------------

class SemanticMaskDecoder(nn.Module):
    """TrD_segm(VQ(l_{i,t}) | f_t), then per token: class logits, a box, and a mask by eq. (7).

    theta_{i,t} = phi_segm(TrD_segm(VQ(l_{i,t}) | f_t)), phi_segm the two-layer controller MLP;
    M_{i,t} = f_out_t * theta_{i,t} (dynamic_mask_conv with relative coordinates);
    P_{i,t} and B_{i,t} come from two two-layer MLPs on the same embeddings (§3.4).

    forward(queries, memory, memory_pos, mask_features)
        queries:       (B, T, N, C) the quantized local tokens VQ(l_{i,t}) (the query content)
        memory:        (B, T, S, C) the visual tokens f_t of each frame
        memory_pos:    (B, T, S, C) or None, their positional embedding
        mask_features: (B, T, Cm, h, w) f_out_t from the FPN (stride 4)
    returns dict: the last layer's pred_logits (B, T, N, Kc), pred_masks (B, T, N, h, w) mask
        logits and pred_boxes (B, T, N, 4), and aux_outputs, L-1 such dicts of layers 0 .. L-2
    """

    def __init__(self, dim, num_classes, num_layers, num_heads, ffn_dim, mask_dim=8, dyn_channels=8,
                 dyn_layers=3, num_slots=None):
        super().__init__()
        self.dyn_channels, self.dyn_layers = dyn_channels, dyn_layers
        # PAPER: TrD_segm's query positions are not given. With num_slots each token index i has a
        # learned position (N, C) on queries and keys, never the content, so two tokens with one
        # codeword still differ (DETR, R2VOS); docs/paper-silent.md#slot-positions-of-the-mask-decoder.
        self.slot_pos = None if num_slots is None else nn.Parameter(torch.randn(num_slots, dim))  # (N, C)
        self.decoder = TransformerDecoder(dim, num_layers, num_heads, ffn_dim)
        # PAPER: eq. (7) cites CondInst's dynamic convolution without sizes; we take CondInst's:
        # Cm = 8 feature channels + 2 relative coordinates, three 1x1 layers of 8 channels.
        num_params = num_dynamic_params(mask_dim + 2, dyn_channels, dyn_layers)  # 169 for 8, 8, 3
        self.controller = mlp(dim, dim, num_params)  # phi_segm, "a two-layer fully-connected network"
        # PAPER: the class head has Kc sigmoid outputs (focal loss, no-object = all off, as
        # Deformable DETR); the paper names focal loss but not sigmoid vs softmax.
        self.class_head = mlp(dim, dim, num_classes)
        # PAPER: boxes are sigmoid (cx, cy, w, h) in [0, 1], as DETR; the paper gives no format.
        self.box_head = mlp(dim, dim, 4)
        # PAPER: the paper does not mention auxiliary (per-layer) outputs; as ReferFormer, the three
        # heads are shared by all decoder layers and applied to each layer's output.
        # PAPER: init as ReferFormer: controller Xavier-uniform weights and zero biases; class bias at
        # prior 0.01 (Deformable DETR) so the focal loss starts near "no object" everywhere.
        for layer in (self.controller[0], self.controller[-1]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.class_head[-1].bias, -torch.log(torch.tensor(99.0)).item())

    def forward(self, queries, memory, memory_pos, mask_features):
        B, T, N, C = queries.shape
        h, w = mask_features.shape[-2:]
        # the quantized tokens are the decoder's input content; slot_pos (if any) their positions
        pos = None if memory_pos is None else memory_pos.flatten(0, 1)  # (B*T, S, C)
        query_pos = None if self.slot_pos is None else self.slot_pos.expand(B * T, N, C)  # (B*T, N, C)
        hs = self.decoder(queries.flatten(0, 1), memory.flatten(0, 1), query_pos=query_pos,
                          memory_pos=pos)  # (L, B*T, N, C)
        L = hs.shape[0]
        logits = self.class_head(hs)  # (L, B*T, N, Kc) P_{i,t} as logits
        boxes = self.box_head(hs).sigmoid()  # (L, B*T, N, 4) B_{i,t}, cxcywh in [0, 1]
        theta = self.controller(hs)  # (L, B*T, N, Pd) theta_{i,t}
        # Relative coordinates (CondInst): every pixel centre in [0, 1] minus the token's box centre.
        # PAPER: the relative-coordinate origin is not given; we use the token's predicted box
        # centre, detached (ReferFormer uses its reference point, CondInst the instance location).
        # PAPER: offsets in normalised [0, 1] units (CondInst divides pixels by a size of interest,
        # ReferFormer keeps raw pixels); this keeps the filters independent of the image size.
        xs = (torch.arange(w, dtype=boxes.dtype, device=boxes.device) + 0.5) / w  # (w,)
        ys = (torch.arange(h, dtype=boxes.dtype, device=boxes.device) + 0.5) / h  # (h,)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, h, w) pixel centres, x then y
        rel = grid - boxes[..., :2].detach().flatten(0, 1)[:, :, :, None, None]  # (L*B*T, N, 2, h, w)
        feats = mask_features.flatten(0, 1).expand(L, -1, -1, -1, -1).flatten(0, 1)  # (L*B*T, Cm, h, w)
        masks = dynamic_mask_conv(feats, theta.flatten(0, 1), self.dyn_channels, self.dyn_layers,
                                  rel_coords=rel)  # eq. (7): (L*B*T, N, h, w)
        per_layer = [dict(pred_logits=logits[i].view(B, T, N, -1),  # (B, T, N, Kc)
                          pred_masks=masks.view(L, B, T, N, h, w)[i],  # (B, T, N, h, w)
                          pred_boxes=boxes[i].view(B, T, N, 4))  # (B, T, N, 4)
                     for i in range(L)]
        return dict(per_layer[-1], aux_outputs=per_layer[:-1])
