"""Tests of decoders.py: every equation against an independent computation.

eq. (3) and (4) are rebuilt by hand from torch primitives (softmax(QK^T / sqrt(d)) V with the
modules' own projection weights, F.layer_norm, the FFN as two matmuls); eq. (5) as an explicit loop
over tokens; eq. (6) as a loop over frames; eq. (7) as a per-token einsum loop.
Small sizes, float64, eval mode where BatchNorm matters.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from decoders import (AudioSemanticDecoder, AudioVisualFusion, SemanticMaskDecoder,
                      SemanticRecombination, TransformerDecoder, dynamic_mask_conv,
                      num_dynamic_params)

B, T, N, C, HEADS, FFN = 2, 3, 4, 16, 4, 24


def hand_mha(attn, q, k, v, key_padding_mask=None):
    """Multi-head attention from nn.MultiheadAttention's weights, written out: (B, Q, C)."""
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    heads, d = attn.num_heads, q.shape[-1] // attn.num_heads

    def split(x):  # (B, L, C) -> (B, heads, L, d)
        return x.view(x.shape[0], x.shape[1], heads, d).transpose(1, 2)

    scores = split(q @ wq.T + bq) @ split(k @ wk.T + bk).transpose(-1, -2) / math.sqrt(d)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ split(v @ wv.T + bv)  # (B, heads, Q, d)
    out = out.transpose(1, 2).reshape(q.shape)  # (B, Q, C)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def hand_ln(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def hand_ffn(ffn, x):
    first, last = ffn[0], ffn[-1]
    return torch.relu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias


def hand_decoder(decoder, x, memory, query_pos=None, memory_pos=None, mask=None):
    """DETR post-norm decoder written out layer by layer: list of every layer's output."""
    qp = 0 if query_pos is None else query_pos
    mp = 0 if memory_pos is None else memory_pos
    outs = []
    for layer in decoder.layers:
        x = hand_ln(layer.norm1, x + hand_mha(layer.self_attn, x + qp, x + qp, x))
        x = hand_ln(layer.norm2, x + hand_mha(layer.cross_attn, x + qp, memory + mp, memory, mask))
        x = hand_ln(layer.norm3, x + hand_ffn(layer.ffn, x))
        outs.append(x)
    return outs


def randomise_norms(module):
    """LayerNorm weights/biases away from (1, 0) so the test sees them."""
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)


def test_eq03_audio_visual_fusion_equals_hand_formula():
    torch.manual_seed(0)
    S = 7
    fusion = AudioVisualFusion(C, HEADS, FFN).double().eval()
    randomise_norms(fusion)
    audio, audio_pos = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    visual, visual_pos = torch.randn(B, S, C, dtype=torch.float64), torch.randn(B, S, C, dtype=torch.float64)

    mca = hand_mha(fusion.cross_attn, audio + audio_pos, visual + visual_pos, visual)
    h_a = hand_ln(fusion.norm1, mca + audio)  # eq. (3), second line
    expected = hand_ln(fusion.norm2, hand_ffn(fusion.ffn, h_a) + h_a)  # eq. (3), first line

    out = fusion(audio, visual, visual_pos, audio_pos)
    assert out.shape == (B, T, C)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # without positional embeddings the values still come from visual alone
    expected0 = hand_mha(fusion.cross_attn, audio, visual, visual)
    h0 = hand_ln(fusion.norm1, expected0 + audio)
    torch.testing.assert_close(fusion(audio, visual), hand_ln(fusion.norm2, hand_ffn(fusion.ffn, h0) + h0))


def test_eq04_global_asd_equals_hand_decoder():
    torch.manual_seed(1)
    L = 3
    asd = AudioSemanticDecoder(C, N, L, HEADS, FFN).double().eval()
    randomise_norms(asd)
    memory, pos = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)

    protos = asd.prototypes[None].expand(B, N, C)  # p_i are the queries
    expected = hand_decoder(asd.decoder, protos, memory, memory_pos=pos)[-1]  # eq. (4)
    out = asd(memory, pos)
    assert out.shape == (B, N, C)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    # TrD itself: every layer's output, with query positions and a memory padding mask
    decoder = TransformerDecoder(C, L, HEADS, FFN).double().eval()
    randomise_norms(decoder)
    Q, S = 5, 6
    q, qpos = torch.randn(B, Q, C, dtype=torch.float64), torch.randn(B, Q, C, dtype=torch.float64)
    mem, mpos = torch.randn(B, S, C, dtype=torch.float64), torch.randn(B, S, C, dtype=torch.float64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, -2:] = True
    outs = decoder(q, mem, qpos, mpos, mask)
    assert outs.shape == (L, B, Q, C)
    torch.testing.assert_close(outs, torch.stack(hand_decoder(decoder, q, mem, qpos, mpos, mask)),
                               rtol=1e-10, atol=1e-10)
    # masked memory tokens really are ignored
    mem2 = mem.clone()
    mem2[0, -2:] = 100.0
    torch.testing.assert_close(decoder(q, mem2, qpos, mpos, mask)[:, 0], outs[:, 0])


@pytest.mark.parametrize("batch_norm", [True, False])
def test_eq05_recombination_equals_token_loop(batch_norm):
    torch.manual_seed(2)
    H, W = 5, 6
    avsr = SemanticRecombination(C, N, batch_norm=batch_norm).double().eval()
    if batch_norm:
        avsr.norm.running_mean.normal_(0.0, 0.5)
        avsr.norm.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(avsr.norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(avsr.norm.bias, 0.0, 0.3)
    tokens = torch.randn(B, N, C, dtype=torch.float64)
    visual = torch.randn(B, T, C, H, W, dtype=torch.float64)

    expected = torch.empty_like(visual)
    first, last = avsr.filters[0], avsr.filters[-1]
    phi_w = avsr.phi.weight[:, :, 0, 0]  # (C, N*C)
    bn = avsr.norm
    for b in range(B):
        for t in range(T):
            parts = []
            for i in range(N):  # w_i F_v, one token at a time
                w_i = torch.relu(tokens[b, i] @ first.weight.T + first.bias) @ last.weight.T + last.bias
                w_i = torch.sigmoid(w_i)  # the channel-wise gate
                parts.append(w_i[:, None, None] * visual[b, t])  # (C, H, W)
            cat = torch.cat(parts, 0)  # (N*C, H, W)
            y = torch.einsum("oc,chw->ohw", phi_w, cat) + avsr.phi.bias[:, None, None] + visual[b, t]
            if batch_norm:  # BN with running statistics (eval mode), per channel
                y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
            else:  # LayerNorm over the channels of each position (h, w) on its own
                mean = y.mean(0, keepdim=True)  # (1, H, W)
                var = ((y - mean) ** 2).mean(0, keepdim=True)  # (1, H, W), biased as LayerNorm's
                y = (y - mean) / torch.sqrt(var + bn.eps)
            expected[b, t] = y * bn.weight[:, None, None] + bn.bias[:, None, None]

    out = avsr(tokens, visual)
    assert out.shape == (B, T, C, H, W)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if not batch_norm:  # per-clip: a clip's output does not depend on the other clips in the batch
        avsr.train()
        torch.testing.assert_close(avsr(tokens[:1], visual[:1]), avsr(tokens, visual)[:1])


def test_eq06_local_asd_equals_hand_decoder_on_one_audio_vector_per_frame():
    """Eq. (6) with the memory the model really uses (sqd.SQD.forward (its local path)): each frame's audio
    is ONE token f_{a,t}, frames flattened into the batch, no memory position. Against the hand
    decoder; and with a single memory token the cross-attention weight is 1, so its output is
    out_proj(W_v f_{a,t} + b_v) for every prototype (checked in closed form on layer 0)."""
    torch.manual_seed(3)
    asd = AudioSemanticDecoder(C, N, 2, HEADS, FFN).double().eval()
    randomise_norms(asd)
    f_a = torch.randn(B, T, C, dtype=torch.float64)                   # F_a = {f_{a,t}}
    memory = f_a.reshape(B * T, 1, C)                                  # (B*T, 1, C) as the model
    out = asd(memory).view(B, T, N, C)                                 # eq. (6): l_{i,t}
    protos = asd.prototypes[None].expand(B * T, N, C)
    expected = hand_decoder(asd.decoder, protos, memory)[-1].view(B, T, N, C)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # closed form of layer 0's cross-attention on one memory token
    layer = asd.decoder.layers[0]
    _, _, Wv = layer.cross_attn.in_proj_weight.split(C)
    _, _, bv = layer.cross_attn.in_proj_bias.split(C)
    q = protos[:1]
    x = layer.norm1(q + layer.self_attn(q, q, q, need_weights=False)[0])
    got = layer.cross_attn(x, memory[:1], memory[:1], need_weights=False)[0]  # (1, N, C)
    same = layer.cross_attn.out_proj(memory[0, 0] @ Wv.t() + bv)              # (C,)
    torch.testing.assert_close(got[0], same.expand(N, C), rtol=1e-10, atol=1e-10)
    # frame t's tokens depend on frame t's audio alone
    f_b = f_a.clone()
    f_b[0, 1] += 1.0
    out_b = asd(f_b.reshape(B * T, 1, C)).view(B, T, N, C)
    changed = (out_b - out).abs().amax(dim=(2, 3)) > 1e-6              # (B, T)
    assert changed.tolist() == [[t == 1 for t in range(T)]] + [[False] * T] * (B - 1)


def loop_dynamic_conv(features, params, rel, channels, num_layers):
    """Eq. (7) token by token with einsum, parsing CondInst's layout by hand: (G, Q, h, w)."""
    G, Q, _ = params.shape
    out = torch.empty(G, Q, *features.shape[-2:], dtype=features.dtype)
    for g in range(G):
        for q in range(Q):
            x = torch.cat([rel[g, q], features[g]]) if rel is not None else features[g]  # (Cin, h, w)
            c_ins = [x.shape[0]] + [channels] * (num_layers - 1)
            c_outs = [channels] * (num_layers - 1) + [1]
            p, at = params[g, q], 0
            ws = []
            for o, i in zip(c_outs, c_ins):  # all weights first ...
                ws.append(p[at:at + o * i].view(o, i))
                at += o * i
            for layer, o in enumerate(c_outs):  # ... then all biases
                x = torch.einsum("oi,ihw->ohw", ws[layer], x) + p[at:at + o, None, None]
                at += o
                if layer < num_layers - 1:
                    x = torch.relu(x)
            assert at == p.numel()
            out[g, q] = x[0]
    return out


def test_eq07_dynamic_conv_and_mask_decoder():
    torch.manual_seed(4)
    # parameter counts: CondInst's 169 and a hand count without coordinates
    assert num_dynamic_params(8 + 2, 8, 3) == 169
    assert num_dynamic_params(8, 8, 3) == (8 * 8 + 8) + (8 * 8 + 8) + (8 * 1 + 1) == 153
    assert num_dynamic_params(6, 4, 1) == 6 + 1

    G, Q, Cm, h, w = 2, 3, 8, 5, 7
    feats = torch.randn(G, Cm, h, w, dtype=torch.float64)
    rel = torch.randn(G, Q, 2, h, w, dtype=torch.float64)
    params = torch.randn(G, Q, 169, dtype=torch.float64) * 0.5
    out = dynamic_mask_conv(feats, params, 8, 3, rel_coords=rel)
    assert out.shape == (G, Q, h, w)
    torch.testing.assert_close(out, loop_dynamic_conv(feats, params, rel, 8, 3), rtol=1e-10, atol=1e-10)
    params2 = torch.randn(G, Q, num_dynamic_params(Cm, 4, 2), dtype=torch.float64)
    torch.testing.assert_close(dynamic_mask_conv(feats, params2, 4, 2),
                               loop_dynamic_conv(feats, params2, None, 4, 2), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        dynamic_mask_conv(feats, params2, 8, 3)

    # the mask decoder: shapes, L-1 aux outputs, and the last layer's masks rebuilt by hand
    L, Kc, S = 3, 5, 6
    dec = SemanticMaskDecoder(C, Kc, L, HEADS, FFN, mask_dim=Cm).double().eval()
    queries = torch.randn(B, T, N, C, dtype=torch.float64, requires_grad=True)
    memory, pos = torch.randn(B, T, S, C, dtype=torch.float64), torch.randn(B, T, S, C, dtype=torch.float64)
    mask_feats = torch.randn(B, T, Cm, h, w, dtype=torch.float64)
    out = dec(queries, memory, pos, mask_feats)
    assert out["pred_logits"].shape == (B, T, N, Kc)
    assert out["pred_masks"].shape == (B, T, N, h, w)
    assert out["pred_boxes"].shape == (B, T, N, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == L - 1
    for aux in out["aux_outputs"]:
        assert {k: v.shape for k, v in aux.items()} == {k: out[k].shape for k in aux}
    torch.testing.assert_close(dec.class_head[-1].bias, torch.full((Kc,), -math.log(99.0), dtype=torch.float64))

    hs = dec.decoder(queries.flatten(0, 1), memory.flatten(0, 1), memory_pos=pos.flatten(0, 1))
    for layer, pred in enumerate(out["aux_outputs"] + [out]):
        emb = hs[layer]  # (B*T, N, C)
        boxes = torch.sigmoid(hand_ffn(dec.box_head, emb))
        torch.testing.assert_close(pred["pred_boxes"], boxes.view(B, T, N, 4))
        torch.testing.assert_close(pred["pred_logits"], hand_ffn(dec.class_head, emb).view(B, T, N, Kc))
        rel = torch.empty(B * T, N, 2, h, w, dtype=torch.float64)
        for y in range(h):
            for x in range(w):  # pixel centre in [0, 1] minus the box centre; x channel first
                rel[:, :, 0, y, x] = (x + 0.5) / w - boxes[:, :, 0]
                rel[:, :, 1, y, x] = (y + 0.5) / h - boxes[:, :, 1]
        masks = loop_dynamic_conv(mask_feats.flatten(0, 1), hand_ffn(dec.controller, emb), rel, 8, 3)
        torch.testing.assert_close(pred["pred_masks"], masks.view(B, T, N, h, w), rtol=1e-9, atol=1e-9)

    # the coordinates use detached box centres: masks send no gradient to the box head
    out["pred_masks"].sum().backward()
    assert all(p.grad is None for p in dec.box_head.parameters())
    assert queries.grad is not None and dec.controller[0].weight.grad is not None


def test_masked_batch_norm_equals_batch_norm_on_the_real_frames():
    """Train mode: outputs on valid frames, running mean/var and the batch counter equal torch's
    BatchNorm2d applied to the valid frames alone; eval mode and valid=None are BatchNorm2d."""
    from decoders import MaskedBatchNorm2d
    torch.manual_seed(0)
    x = torch.randn(6, 4, 3, 5) * 3 + 1
    valid = torch.tensor([True, False, True, True, False, True])
    x[~valid] = 1000.0                                    # padding frames: anything at all
    ours, ref = MaskedBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ours.weight.normal_()
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for _ in range(2):
        got = ours(x, valid)
        want = ref(x[valid])
        torch.testing.assert_close(got[valid], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, valid), ref(x))
    ours.train(), ref.train()
    torch.testing.assert_close(ours(x), ref(x))
