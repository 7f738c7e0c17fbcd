"""The SQD model of Fig. 3, assembled from its parts, and per-frame inference (eq. 11).

What this file teaches
    How the pieces of the other files make one network, in the order of the paper:
      (1) feature encoding            encoders.py   VisualEncoder, AudioEncoder     App. D.1
      (2) global semantic quantization
            audio-visual fusion       decoders.py   AudioVisualFusion               eq. (3)
            global ASD                decoders.py   AudioSemanticDecoder            eq. (4)
            product quantization      quantize.py   VectorQuantizer                 eq. (1), (2)
            recombination (AVSR)      decoders.py   SemanticRecombination           eq. (5)
      (3) local semantic calibration
            local ASD                 decoders.py   AudioSemanticDecoder            eq. (6)
            shared-codebook VQ        quantize.py   (update_codebook=False)         eq. (9), third term
            semantic-guided masks     decoders.py   SemanticMaskDecoder             eq. (7)
      (4) the loss                    matcher.py    SetCriterion                    eq. (8)-(10)
      (5) inference                   this file     segment, foreground_probability eq. (11)

Reading order
    ModelConfig and PRESETS (the hyper-parameters, with the paper's values), SQD.__init__
    (which module is which box of Fig. 3), SQD.forward (the paper's data flow, Fig. 3),
    then segment() and foreground_probability() (App. E).

Ablations (Table 2) are four booleans of ModelConfig, by default the full model: use_gsd, use_avsr
and use_lsd (one `if` each in SQD.forward) and shared_codebook. What replaces a removed box lives in
two methods below forward (ablation_queries, quantize_local), so that forward reads as Fig. 3.

Shape alphabet (the repository's one alphabet: docs/shapes.md)
    B clips, T frames, N semantic tokens, C channels, K codewords, Kc foreground classes,
    H, W image size, h, w = H/4, W/4 (mask resolution), H_l, W_l one visual level, S visual
    tokens of one frame (all levels), Cm mask-feature channels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from decoders import (AudioSemanticDecoder, AudioVisualFusion, SemanticMaskDecoder,
                      SemanticRecombination)
from encoders import (FPN, AudioEncoder, ResNet, SmallBackbone, SwinTransformer, VideoSwinTransformer,
                      VisualEncoder, sine_embedding_1d)
from quantize import VectorQuantizer, quantization_loss


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """Every hyper-parameter of the model. Defaults are the paper's setting (App. D)."""
    num_classes: int = 70          # Kc, foreground classes (AVSS: 70; S4/MS3: 1; synthetic: 24)
    dim: int = 256                 # C = C_v = C_e = C_q, width of every transformer (App. D)
    num_tokens: int = 5            # N, decomposed semantic tokens (Table 4 best: 5)
    codebook_size: int = 128       # K, codewords of the shared codebook (Table 3 best: 128)
    dec_layers: int = 3            # layers of TrD_global, TrD_local and TrD_segm (App. D, Table 7)
    # PAPER: encoder depth, heads, FFN width, sampling points and frozen BN are not given; the
    # values below are ReferFormer's (4 layers) and Deformable-DETR's (8 heads, 1024, 4 points).
    enc_layers: int = 4            # deformable encoder layers (ReferFormer: 4)
    num_heads: int = 8             # attention heads (DETR-family default 8)
    ffn_dim: int = 1024            # FFN hidden width (Deformable-DETR default 1024)
    num_points: int = 4            # deformable attention sampling points per head and level
    backbone: str = "resnet50"     # resnet18 | resnet34 | resnet50 | swin-t | video-swin-t | small (CPU preset)
    frozen_bn: bool = True         # ResNet BatchNorm frozen (DETR-family practice for batch 4); Swin has LayerNorm only
    audio_encoder: str = "vggish"  # vggish (released weights) | small (CPU preset)
    freeze_audio: bool = False     # audio network (AudioEncoder.net) frozen: pretrained, not trained
    mask_dim: int = 8              # Cm, channels of f_out fed to the dynamic convolution (CondInst)
    dyn_channels: int = 8          # channels of the dynamic 1x1 convolutions (CondInst: 8)
    dyn_layers: int = 3            # layers of the dynamic convolution (CondInst: 3)
    # --- ablation switches (Table 2; K and N above for Tables 3-4); defaults: the full model ---
    use_gsd: bool = True           # global semantic decomposition, eq. (3)-(4) + global VQ (Table 2)
    use_avsr: bool = True          # audiovisual semantic recombination, eq. (5) (Table 2)
    use_lsd: bool = True           # local semantic decomposition, eq. (6) (Table 2)
    shared_codebook: bool = True   # local tokens use the global codebook, eq. (9) (Table 2, "SC")
    avsr_batch_norm: bool = True   # eq. (5)'s BN (True) or a LayerNorm over channels (CPU preset)
    # PAPER: TrD_segm's query positions are not given: a learned position per token index i
    # (DETR, R2VOS), chosen on val (docs/paper-silent.md#slot-positions-of-the-mask-decoder).
    slot_positions: bool = True    # False only for pretrain.ReferringSegmenter (one query per category)

    def check(self) -> None:
        """Raise ValueError for an impossible combination of switches."""
        if self.use_avsr and not self.use_gsd:
            raise ValueError("use_avsr needs use_gsd: the recombination (eq. 5) is driven by the "
                             "global tokens; pass --no-avsr together with --no-gsd")
        if not self.shared_codebook and not (self.use_gsd and self.use_lsd):
            raise ValueError("--no-shared-codebook only means something with both GSD and LSD on "
                             "(it gives the local tokens a codebook of their own)")
        if self.num_tokens < 1 or self.codebook_size < 1:
            raise ValueError(f"num_tokens and codebook_size must be >= 1, got "
                             f"{self.num_tokens} and {self.codebook_size}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; expected one of {', '.join(BACKBONES)}")
        if self.audio_encoder not in ("vggish", "small"):
            raise ValueError(f"unknown audio encoder {self.audio_encoder!r}; expected vggish or small")


BACKBONES = ("resnet18", "resnet34", "resnet50", "swin-t", "video-swin-t", "small")


def visual_backbone(cfg: ModelConfig) -> nn.Module:
    """The visual backbone that cfg.backbone names (encoders.py): ResNet (frozen_bn applies), Swin-T
    on every frame, Video Swin-T on the whole clip, or the CPU preset's SmallBackbone."""
    if cfg.backbone.startswith("resnet"):
        return ResNet(int(cfg.backbone[len("resnet"):]), frozen_bn=cfg.frozen_bn)
    others = {"small": SmallBackbone, "swin-t": SwinTransformer, "video-swin-t": VideoSwinTransformer}
    return others[cfg.backbone]()


PRESETS = {
    # App. D: C = 256, 3 layers in every decoder, N = 5, K = 128, ResNet-50, VGGish.
    "paper": ModelConfig(),
    # NOT IN PAPER: the whole preset, small enough that `python train.py` trains and evaluates on
    # 2 CPU cores in minutes (docs/paper-silent.md#the-cpu-presets-values).
    # codebook_size=128, the paper's K: each token index needs its own words for 24 categories.
    # avsr_batch_norm=False: eq. (5) with a LayerNorm; BN over the tiny maps mixes a batch's clips.
    # num_classes=12: a placeholder, which train.py replaces by the dataset's (synthetic: 24).
    "cpu": ModelConfig(num_classes=12, dim=64, num_tokens=5, codebook_size=128, dec_layers=2,
                       enc_layers=1, num_heads=4, ffn_dim=128, num_points=2, backbone="small",
                       frozen_bn=False, audio_encoder="small", avsr_batch_norm=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with some fields replaced, e.g. preset('cpu', num_classes=1)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class SQD(nn.Module):
    """SQD, the model of Fig. 3: audio decomposed into N tokens quantized with one shared codebook.

    forward(batch) takes the batch of data.py:
        frames (B, T, 3, H, W) float, ImageNet-normalised
        audio  (B, T, 1, 96, 64) VGGish log-mel, one example per frame
        frame_valid (B, T) bool, optional: False marks a padding frame, which no real frame sees
    and returns a dict:
        pred_logits (B, T, N, Kc)   class logits (sigmoid; no-object is all classes off)
        pred_masks  (B, T, N, h, w) mask logits at stride 4, eq. (7)
        pred_boxes  (B, T, N, 4)    boxes (cx, cy, w, h) in [0, 1]
        aux_outputs list of dec_layers-1 dicts with the same three keys (earlier layers)
        quant       dict of the unweighted eq. (9) terms (quant_codebook, quant_commit_global, ...)
        indices     dict: 'global' (B, N) and 'local' (B, T, N) codeword ids (where present)
        tokens      dict: 'global' (B, N, C) g_i and 'local' (B, T, N, C) l_{i,t} (where present)
    A clip of any length T >= 1 runs in one pass (App. A): nothing in the model is sized by T.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        C, N = cfg.dim, cfg.num_tokens

        # (1) encoders (App. D.1)
        backbone = visual_backbone(cfg)
        self.visual_encoder = VisualEncoder(backbone, C, cfg.enc_layers, cfg.num_heads,
                                            cfg.num_points, cfg.ffn_dim)
        self.audio_encoder = AudioEncoder(cfg.audio_encoder, C)
        self.fpn = FPN(C, backbone.channels[0], cfg.mask_dim)

        # (2) global semantic quantization: eq. (3), (4), the shared codebook, eq. (5)
        self.fusion = AudioVisualFusion(C, cfg.num_heads, cfg.ffn_dim)
        self.global_asd = AudioSemanticDecoder(C, N, cfg.dec_layers, cfg.num_heads, cfg.ffn_dim)
        self.vq = VectorQuantizer(cfg.codebook_size, C)             # the shared codebook {e_k}
        self.avsr = nn.ModuleList(SemanticRecombination(C, N, batch_norm=cfg.avsr_batch_norm)
                                  for _ in range(3))

        # (3) local semantic calibration: eq. (6), the mask decoder with eq. (7)
        self.local_asd = AudioSemanticDecoder(C, N, cfg.dec_layers, cfg.num_heads, cfg.ffn_dim)
        # PAPER: eq. (4) and (6) both write p_i; whether the ASDs share them is not said. Two sets
        # (docs/paper-silent.md#one-prototype-set-per-asd).
        # PAPER: Table 2 without SC does not say what the local tokens use: a codebook of their own.
        self.local_vq = None if cfg.shared_codebook else VectorQuantizer(cfg.codebook_size, C)
        self.local_owns_codebook = not cfg.shared_codebook or not cfg.use_gsd
        self.mask_decoder = SemanticMaskDecoder(C, cfg.num_classes, cfg.dec_layers, cfg.num_heads,
                                                cfg.ffn_dim, cfg.mask_dim, cfg.dyn_channels, cfg.dyn_layers,
                                                num_slots=N if cfg.slot_positions else None)
        # Table 2 baseline without GSD and LSD: N learnable queries plus the frame's audio embedding
        self.baseline_queries = nn.Parameter(torch.randn(N, C))  # (N, C)

        # Ablated modules are removed, so that every remaining parameter gets a gradient.
        if not cfg.use_gsd:
            self.fusion, self.global_asd = None, None
        if not cfg.use_avsr:
            self.avsr = None
        if not cfg.use_lsd:
            self.local_asd = None
        if cfg.use_lsd or cfg.use_gsd:
            self.baseline_queries = None
        if not cfg.use_gsd and not cfg.use_lsd:
            self.vq = None
        if cfg.freeze_audio:  # a pretrained audio network kept as it is (train.py sets this)
            self.audio_encoder.freeze_net()

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        cfg = self.cfg
        frames, audio = batch["frames"], batch["audio"]           # (B, T, 3, H, W), (B, T, 1, 96, 64)
        frame_valid = batch.get("frame_valid")                    # (B, T) bool or None; False = padding
        B, T = frames.shape[:2]
        N, C = cfg.num_tokens, cfg.dim

        # (1) feature encoding (App. D.1)
        vis = self.visual_encoder(frames, frame_valid)
        # the visual encoder (encoders.py) gives, per frame: "levels", F_v at strides 8, 16, 32,
        # its sine positions "pos" (the same shapes), and "c2", the backbone's stride-4 map (the FPN's)
        F_v, pos = vis["levels"], vis["pos"]                      # 3 x (B, T, C, H_l, W_l) each
        memory, memory_pos = _frame_tokens(F_v, pos)              # (B, T, S, C) each, all levels
        f_a = self.audio_encoder(audio)                           # (B, T, C)  F_a = {f_a,t}
        # PAPER: App. D says only that sine embeddings are added in the transformers; the audio
        # tokens get a 1-D sine embedding over time (queries of eq. 3, memory of eq. 4).
        time_pos = sine_embedding_1d(T, C, f_a.device).expand(B, T, C)  # (B, T, C)
        pad = None if frame_valid is None else ~frame_valid.bool()     # (B, T) True = padding

        # (2) global semantic quantization
        vq_g, tokens = None, {}                                   # vq_g: QuantizerOutput of the g_i
        F_v_prime = F_v                                           # F'_v; F_v itself without AVSR
        if cfg.use_gsd:
            # PAPER: F_v of eq. (3) read as every visual token of the clip, all T frames and all
            # three levels, before recombination; a padding frame's tokens are never attended.
            clip_pad = None if pad is None else pad.repeat_interleave(memory.shape[2], dim=1)  # (B, T*S)
            F_a_prime = self.fusion(f_a, memory.flatten(1, 2), memory_pos.flatten(1, 2),  # (B, T*S, C) x2
                                    time_pos, clip_pad)           # (B, T, C) eq. (3): F'_a
            g = tokens["global"] = self.global_asd(F_a_prime, time_pos, pad)  # (B, N, C)  eq. (4): g_i
            vq_g = self.vq(g)                                     # §3.3, eq. (2)'s shared codebook: e_i = VQ(g_i)
            e_i = vq_g.quantized                                  # (B, N, C)  e_i, straight-through
            if cfg.use_avsr:
                # PAPER: §3.3 derives the filters from e_i, one sentence later "from g_i"; e_i here
                # (docs/paper-silent.md#avsr-filters-from-the-quantized-tokens).
                F_v_prime = [avsr(e_i, F_l, frame_valid) for avsr, F_l in zip(self.avsr, F_v)]  # eq. (5)
                memory = _frame_tokens(F_v_prime)[0]              # (B, T, S, C) recombined
        c2 = vis["c2"].flatten(0, 1)                              # (B*T, C2, h, w) backbone stride-4 map
        f_out = self.fpn([F_l.flatten(0, 1) for F_l in F_v_prime], c2)  # (B*T, Cm, h, w)
        f_out = f_out.unflatten(0, (B, T))                        # (B, T, Cm, h, w)

        # (3) local semantic calibration
        vq_l = None                                               # QuantizerOutput of the l_{i,t}
        if cfg.use_lsd:
            # eq. (6) reads one frame's audio f_{a,t}: a memory of a single token per frame, so
            # the cross-attention weight is 1 and every prototype p_i receives the same message
            f_at = f_a.reshape(B * T, 1, C)                       # (B*T, 1, C)  eq. (6)'s memory
            l = self.local_asd(f_at)                              # (B*T, N, C)  eq. (6): l_{i,t}
            l = tokens["local"] = l.reshape(B, T, N, C)           # (B, T, N, C)
            vq_l = self.quantize_local(l, frame_valid)            # VQ(l_{i,t}), the shared codebook
            queries = vq_l.quantized                              # (B, T, N, C)  VQ(l_{i,t})
        else:
            queries = self.ablation_queries(f_a, vq_g)            # (B, T, N, C)
        # PAPER: f_t of TrD_segm(VQ(l_{i,t}) | f_t) read as F'_v of frame t, all three levels.
        out = self.mask_decoder(queries, memory, memory_pos, f_out)  # eq. (7) inside

        out["quant"] = self.quantization_terms(vq_g, vq_l)        # eq. (9), weighted in eq. (8)
        out["indices"] = {k: q.indices for k, q in (("global", vq_g), ("local", vq_l)) if q is not None}
        out["tokens"] = tokens                                    # g_i (B, N, C), l_{i,t} (B, T, N, C)
        return out

    # ------------------------------------------------------------------------------------------
    # The ablations' side of forward: what replaces a removed box of Fig. 3
    # ------------------------------------------------------------------------------------------
    def quantize_local(self, l, frame_valid):
        """VQ(l_{i,t}): l (B, T, N, C) -> QuantizerOutput with quantized (B, T, N, C).

        The paper's model: the shared codebook, which the local tokens commit to but never update
        (eq. 9, third term). Without SC (Table 2), the local tokens train a codebook of their own;
        without GSD they train the only one (NOT IN PAPER: the paper has no row with LSD and no GSD).
        """
        B, T, N, C = l.shape
        vq = self.vq if self.local_vq is None else self.local_vq
        valid = None if frame_valid is None else frame_valid.bool()[:, :, None].expand(B, T, N)  # (B, T, N)
        return vq(l, update_codebook=self.local_owns_codebook, valid=valid)

    def ablation_queries(self, f_a, vq_g):
        """The mask decoder's queries without LSD (Table 2): (B, T, N, C).

        With GSD: e_i + f_{a,t}, the clip tokens broadcast to every frame. Baseline (no GSD, no
        LSD): q_i + f_{a,t}, N learnable queries plus the frame's undecomposed audio embedding.
        PAPER: the paper does not say what the mask decoder queries without LSD; adding the frame's
        audio embedding lets every row of Table 2 see the frame's audio.
        """
        B, T, C = f_a.shape
        clip_queries = (vq_g.quantized if vq_g is not None
                        else self.baseline_queries.expand(B, self.cfg.num_tokens, C))  # (B, N, C)
        return clip_queries[:, None] + f_a[:, :, None]            # (B, T, N, C)

    def quantization_terms(self, vq_g, vq_l) -> dict:
        """The unweighted terms of eq. (9) (matcher.SetCriterion weights them, eq. 8).

        The paper's model: quant_codebook (term 1) and quant_commit_global (term 2) from the global
        tokens, quant_commit_local (term 3) from the local ones. A local path that trains a codebook
        (no SC, or no GSD) adds its own codebook term quant_codebook_local.
        """
        owned = vq_l is not None and self.local_owns_codebook
        terms = {} if vq_g is None else quantization_loss(vq_g, None if owned else vq_l)
        if owned:
            terms.update(quant_codebook_local=vq_l.codebook_loss, quant_commit_local=vq_l.commitment_loss)
        return terms

    def quantizers(self) -> list:
        """The VectorQuantizers of the model: the shared codebook, and the local one if separate."""
        return [vq for vq in (self.vq, self.local_vq) if vq is not None]

    def set_quantizer_warmup(self, active: bool) -> None:
        """Quantizer warm-up on or off (not in the paper; quantize.VectorQuantizer.set_warmup)."""
        for vq in self.quantizers():
            vq.set_warmup(active)

    def end_quantizer_warmup(self) -> None:
        """Warm-up off, each codebook at the k-means centres of its warm-up tokens (VectorQuantizer.end_warmup)."""
        for vq in self.quantizers():
            vq.end_warmup()

    def parameter_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float):
        """AdamW parameter groups: the visual backbone at lr * backbone_lr_mult (paper §4: 0.5, weight
        decay 5e-4; train.py's BACKBONE_LR_MULT and WEIGHT_DECAY).
        Frozen parameters (ResNet's unused fc, a frozen audio network) are left out."""
        backbone, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (backbone if name.startswith("visual_encoder.backbone.") else rest).append(p)
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "model"},
                {"params": backbone, "lr": lr * backbone_lr_mult, "weight_decay": weight_decay,
                 "name": "backbone"}]


def _frame_tokens(*maps):
    """Each frame's tokens of all levels: every argument, a list of per-level maps (B, T, C, H_l, W_l)
    (the features, their positions), becomes one (B, T, S, C) tensor."""
    return [torch.cat([m.flatten(3).transpose(2, 3) for m in levels], dim=2)  # (B, T, S, C)
            for levels in maps]


# ----------------------------------------------------------------------------------------------
# Inference (App. E)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def segment(pred_logits: torch.Tensor, pred_masks: torch.Tensor, size: tuple[int, int],
            class_threshold: float = 0.1, mask_threshold: float = 0.5) -> torch.Tensor:
    """Eq. (11): a class id for every pixel of every frame.

    pred_logits (B, T, N, Kc) class logits; pred_masks (B, T, N, h, w) mask logits;
    size (H, W) of the output. Returns labels (B, T, H, W) int64 with 0 = background.

    Per frame t: tokens whose best class probability is below class_threshold are dropped
    (App. D); a kept token covers the pixels where its mask probability exceeds mask_threshold;
    a covered pixel takes argmax_{C in 1..Kc} sum_i P_{i,t}[C] M_{i,t}[h, w]; other pixels are
    background. The argmax never includes the "empty" category (App. E).
    """
    # PAPER: App. D gives the two thresholds and App. E eq. (11), not how they combine: as the
    # docstring says; masks are upsampled bilinearly (as logits) to the label size, then sigmoid.
    B, T, N, Kc = pred_logits.shape
    prob = pred_logits.sigmoid()                                         # (B, T, N, Kc)  P_{i,t}
    keep = prob.max(-1).values >= class_threshold                        # (B, T, N)
    out = torch.zeros(B, T, *size, dtype=torch.long, device=pred_logits.device)  # (B, T, H, W)
    for b in range(B):          # one frame at a time keeps memory at (Kc, H, W)
        for t in range(T):
            m = F.interpolate(pred_masks[b, t][None], size=size, mode="bilinear",
                              align_corners=False)[0].sigmoid()          # (N, H, W)  M_{i,t}
            k = keep[b, t].to(m.dtype)                                   # (N,)
            score = torch.einsum("nc,nhw->chw", prob[b, t] * k[:, None], m)  # (Kc, H, W) eq. (11)
            covered = ((m > mask_threshold) & keep[b, t][:, None, None]).any(0)  # (H, W)
            out[b, t] = torch.where(covered, score.argmax(0) + 1, 0)     # (H, W), ids 1..Kc or 0
    return out


@torch.no_grad()
def foreground_probability(pred_logits: torch.Tensor, pred_masks: torch.Tensor,
                           size: tuple[int, int]) -> torch.Tensor:
    """Binary AVS: the foreground probability max_i P_{i,t} * M_{i,t}[h, w].

    pred_logits (B, T, N, Kc), pred_masks (B, T, N, h, w) -> (B, T, H, W) in [0, 1].
    P_{i,t} is the token's best class probability (with Kc = 1, the sounding-object probability).
    """
    # PAPER: the paper gives no rule for the binary task; we score max_i P_{i,t} M_{i,t}, without
    # the class threshold, and the metrics threshold it at 0.5.
    B, T, N = pred_logits.shape[:3]
    p = pred_logits.sigmoid().max(-1).values                             # (B, T, N)
    m = F.interpolate(pred_masks.flatten(0, 1), size=size, mode="bilinear",
                      align_corners=False).sigmoid()                     # (B*T, N, H, W)
    m = m.unflatten(0, (B, T))                                           # (B, T, N, H, W)
    return (p[..., None, None] * m).max(2).values                        # (B, T, H, W)
