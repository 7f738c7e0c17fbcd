"""Encoders: the parts SQD takes off the shelf (paper App. D.1).

What this file teaches
----------------------
SQD (paper §3, Fig. 3) does not invent its encoders; App. D.1 names them:
  * a visual backbone: ResNet or Swin-T shared over the T frames, or Video Swin-T over the whole
    clip (all three with weights in torchvision's format), followed by a deformable transformer encoder (Deformable-DETR, Zhu et al. 2020) that does
    the "temporal aggregation": every layer attends within each frame over its three scales
    (deformable attention), then across the clip's frames at each token position (temporal
    attention), so a clip of any length is encoded in one pass;
  * an FPN that brings the encoded levels down to stride 4 for the dynamic mask head (eq. 7);
  * the standard sine positional embedding (App. D, "triangle positional embedding");
  * VGGish (Hershey et al. 2017) for the audio: the log-mel front end and the network with the
    key names of the released PyTorch port, so the released weights load strictly.
For the CPU preset there are tiny stand-ins with the same interfaces (SmallBackbone, SmallVGG).

Reading order
-------------
 1. vggish_log_mel           the VGGish front end (numpy): waveform (Ns,) -> (E, 96, 64)
 2. VGGish, SmallVGG, AudioEncoder (load_net_weights, freeze_net)  audio path -> F_a (B,T,C)
 3. IMAGENET_MEAN/STD, FrozenBatchNorm2d, BasicBlock, Bottleneck, ResNet, SmallBackbone   frame backbones
 4. window_partition, window_reverse, relative_position_index, shifted_window_regions/_mask,
    WindowAttention, SwinBlock, PatchMerging, SwinTransformer (frames), PatchEmbed3d,
    VideoSwinTransformer (clips)   Swin backbones
 5. sine_position_embedding, sine_embedding_1d   the positional embeddings of App. D (space, time)
 6. ms_deform_attn_core      multi-scale deformable attention sampling (grid_sample)
 7. MSDeformAttn, DeformableEncoderLayer, TemporalAttention   one encoder layer (space, then time)
 8. VisualEncoder            backbone -> 1x1 projections -> deformable encoder -> F_v
 9. FPN                      F_v + c2 -> mask features f_out at stride 4

Shape alphabet
--------------
The repository's one shape alphabet: docs/shapes.md. Letters used here:
B clips, T frames, C model channels, H, W image size, h, w = H/4, W/4 mask resolution,
Cm mask channels (8), H_l, W_l size of visual level l (3 levels, strides 8, 16, 32), S visual
tokens of one frame (sum of H_l*W_l over the 3 levels), Q queries of an attention layer,
Hd heads, Dh = C/Hd channels of one head, Pt sampling points per head and level,
E 0.96 s log-mel examples (96 x 64: time steps x mel bands), Ns audio samples.
The frame backbones and the deformable attention take every frame on its own: their batch is the
B*T frames of a batch. Inside the ResNet, H', W' is the size of a feature map (H/2 .. H/32;
a block's output size). Inside the Swin backbones: B' the batch of a block (B*T frames, or B
clips), Cs the channels of a stage (96, 192, 384, 768), M the window side in space (7), Mt in time
(8, or fewer when the clip is shorter), Mv the tokens of one window (M*M or Mt*M*M), Nw the windows
of one map, Hp, Wp, Tp the sides H', W', T padded up to multiples of the window.
STFT frames, levels and other counts are written as words (or as 3, the number of levels).
"""
import math
from math import gcd

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# 1. The VGGish front end (numpy). Constants as in the released VGGish (vggish_params).
# ----------------------------------------------------------------------------------------------
VGGISH_SAMPLE_RATE = 16000
VGGISH_WINDOW_SECONDS = 0.025  # 400 samples
VGGISH_HOP_SECONDS = 0.010  # 160 samples
VGGISH_NUM_MEL_BINS = 64
VGGISH_MEL_MIN_HZ = 125.0
VGGISH_MEL_MAX_HZ = 7500.0
VGGISH_LOG_OFFSET = 0.01
VGGISH_EXAMPLE_FRAMES = 96  # 0.96 s per example, non-overlapping


def _htk_mel(freq_hz):
    """HTK mel scale: mel = 1127 * ln(1 + f / 700)."""
    return 1127.0 * np.log(1.0 + np.asarray(freq_hz, dtype=np.float64) / 700.0)


def _vggish_mel_matrix(num_spectrogram_bins, sample_rate):
    """Triangular mel filters, linear in the HTK mel domain, as in VGGish's mel_features.

    Returns:
        weights: (num_spectrogram_bins, 64) float64; the DC bin's row is zero.
    """
    bins_mel = _htk_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins))  # (257,)
    edges_mel = np.linspace(_htk_mel(VGGISH_MEL_MIN_HZ), _htk_mel(VGGISH_MEL_MAX_HZ),
                            VGGISH_NUM_MEL_BINS + 2)  # (66,) band edges
    lower = edges_mel[:-2][None, :]  # (1, 64)
    centre = edges_mel[1:-1][None, :]  # (1, 64)
    upper = edges_mel[2:][None, :]  # (1, 64)
    rising = (bins_mel[:, None] - lower) / (centre - lower)  # (257, 64)
    falling = (upper - bins_mel[:, None]) / (upper - centre)  # (257, 64)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (257, 64)
    weights[0, :] = 0.0  # the DC bin does not contribute, as in VGGish
    return weights


def vggish_log_mel(waveform, sample_rate):
    """The VGGish front end: a waveform -> non-overlapping 0.96 s log-mel examples.

    Args:
        waveform: np.ndarray (Ns,) mono or (Ns, channels); float in [-1, 1], or int16 (divided by
            32768 as the VGGish wav reader does).
        sample_rate: int, the rate of `waveform` in Hz; other rates than 16 kHz are resampled.

    Returns:
        np.ndarray (E, 96, 64) float32. E = floor(STFT frames / 96) with
        STFT frames = 1 + floor((Ns - 400) / 160), Ns the samples of the 16 kHz signal;
        the incomplete tail is dropped; 1 s of audio gives 98 STFT frames -> 1 example.
    """
    x = np.asarray(waveform)  # (Ns,) or (Ns, channels)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / 32768.0  # (Ns,) or (Ns, channels); int16 PCM -> [-1, 1)
    x = x.astype(np.float64)  # (Ns,) or (Ns, channels)
    if x.ndim == 2:
        x = x.mean(axis=1)  # (Ns,) stereo / multi-channel averaged to mono
    if x.ndim != 1:
        raise ValueError(f"waveform must be (n,) or (n, channels), got shape {x.shape}")
    if sample_rate != VGGISH_SAMPLE_RATE:
        # PAPER: VGGish resamples with resampy; we use scipy's polyphase resampler (resample_poly),
        # which is close (both are band-limited) and needs no extra dependency.
        from scipy.signal import resample_poly
        g = gcd(int(sample_rate), VGGISH_SAMPLE_RATE)
        x = resample_poly(x, VGGISH_SAMPLE_RATE // g, int(sample_rate) // g)  # (Ns,) Ns counted at 16 kHz

    window_length = int(round(VGGISH_WINDOW_SECONDS * VGGISH_SAMPLE_RATE))  # 400
    hop_length = int(round(VGGISH_HOP_SECONDS * VGGISH_SAMPLE_RATE))  # 160
    fft_length = 2 ** int(math.ceil(math.log2(window_length)))  # 512
    num_frames = 1 + (len(x) - window_length) // hop_length if len(x) >= window_length else 0
    num_examples = num_frames // VGGISH_EXAMPLE_FRAMES
    if num_examples == 0:
        return np.zeros((0, VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS), dtype=np.float32)

    # Frames without centre padding: only complete windows are kept.
    starts = hop_length * np.arange(num_frames)  # (STFT frames,)
    frames = x[starts[:, None] + np.arange(window_length)[None, :]]  # (STFT frames, 400)
    # Periodic Hann: 0.5 - 0.5 cos(2 pi k / N), k = 0..N-1 (not the symmetric N-1 form).
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window_length) / window_length)  # (400,)
    spectrogram = np.abs(np.fft.rfft(frames * hann, n=fft_length))  # (STFT frames, 257) magnitude, not power
    mel = spectrogram @ _vggish_mel_matrix(fft_length // 2 + 1, VGGISH_SAMPLE_RATE)  # (STFT frames, 64)
    log_mel = np.log(mel + VGGISH_LOG_OFFSET)  # (STFT frames, 64)
    log_mel = log_mel[: num_examples * VGGISH_EXAMPLE_FRAMES]  # (E*96, 64) tail dropped
    examples = log_mel.reshape(num_examples, VGGISH_EXAMPLE_FRAMES, VGGISH_NUM_MEL_BINS)  # (E, 96, 64)
    return examples.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 2. The audio path: VGGish (released-weight layout), a small VGG, and the AudioEncoder.
# ----------------------------------------------------------------------------------------------
class VGGish(nn.Module):
    """VGGish (Hershey et al. 2017) laid out as the released PyTorch port, so its .pth loads strictly.

    Keys: features.{0,3,6,8,11,13}.{weight,bias} (3x3 convs 1-64-128-256-256-512-512, ReLU, four
    2x2 max-pools) and embeddings.{0,2,4}.{weight,bias} (12288-4096-4096-128); 72,141,184 parameters.

    Args:
        final_relu: apply a ReLU after embeddings.4 (the PyTorch port and AVS code do; TF does not).

    forward:
        x: (B*T, 1, 96, 64) log-mel examples from `vggish_log_mel`, one per frame (AudioEncoder
            feeds the B*T frames of a batch; any number of examples works).
    Returns:
        embedding: (B*T, 128)
        conv_map: (B*T, 512, 6, 4) the last pooled conv features (time 6 x frequency 4).
    """

    def __init__(self, final_relu=True):
        super().__init__()
        layers, in_ch = [], 1
        for spec in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, spec, 3, padding=1), nn.ReLU(inplace=True)]
                in_ch = spec
        self.features = nn.Sequential(*layers)  # indices 0..15 as in the released weights
        # PAPER: the paper uses VGGish as-is; AVSBench code inherits the PyTorch port's final ReLU
        # (TF's embedding is pre-activation), so final_relu=True keeps the AVS features.
        head = [nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 4096),
                nn.ReLU(inplace=True), nn.Linear(4096, 128)]
        if final_relu:
            head.append(nn.ReLU(inplace=True))
        self.embeddings = nn.Sequential(*head)
        self.channels = 512
        self.embedding_dim = 128

    def forward(self, x):
        conv_map = self.features(x)  # (B*T, 512, 6, 4)
        # TF (NHWC) flatten order, required for the ported weights: position-major, channel-minor.
        flat = conv_map.permute(0, 2, 3, 1).flatten(1)  # (B*T, 6*4*512)
        embedding = self.embeddings(flat)  # (B*T, 128)
        return embedding, conv_map


class SmallVGG(nn.Module):
    """A small VGG with VGGish's interface, for the CPU preset (pretrained as a sound classifier by
    pretrain.py, then frozen, as VGGish).

    forward:
        x: (B*T, 1, 96, 64), as VGGish
    Returns:
        embedding: (B*T, 128)
        conv_map: (B*T, channels, 6, 4)
    """

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        # NOT IN PAPER (it uses VGGish): a stand-in for the CPU preset only.
        # NOT IN PAPER: GroupNorm after every convolution (VGGish has none). Trained from scratch, the
        # plain stack maps every clip to nearly the same output (the log-mel floor dominates the
        # first layer): at initialisation the clip-to-clip spread of its embedding was ~4 % of its
        # size, and the audio was too faint a signal for the decoders to pick up in a CPU run.
        layers, in_ch = [], 1
        for width in widths:  # four conv + pool stages: 96x64 -> 6x4, as VGGish
            layers += [nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.GroupNorm(min(8, width), width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, 2)]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(in_ch * 6 * 4, 128), nn.ReLU(inplace=True), nn.Linear(128, 128))
        self.channels = in_ch
        self.embedding_dim = 128

    def forward(self, x):
        conv_map = self.features(x)  # (B*T, channels, 6, 4)
        embedding = self.embeddings(conv_map.permute(0, 2, 3, 1).flatten(1))  # (B*T, 128)
        return embedding, conv_map


class AudioEncoder(nn.Module):
    """The acoustic encoder of App. D.1: VGGish (or SmallVGG) per frame, projected to C.

    Args:
        kind: 'vggish' (released layout, 72M parameters) or 'small' (CPU preset).
        dim: C, the model width.

    forward:
        audio: (B, T, 1, 96, 64) log-mel, one 0.96 s example per frame.
    Returns:
        frame_emb: (B, T, C) F_a = {f_{a,t}}, one vector per frame: the queries of eq. (3) and,
            one frame at a time, the memory of the local ASD, eq. (6).
    """

    def __init__(self, kind="vggish", dim=256):
        super().__init__()
        if kind == "vggish":
            self.net = VGGish()
        elif kind == "small":
            self.net = SmallVGG()
        else:
            raise ValueError(f"unknown audio encoder kind {kind!r}; use 'vggish' or 'small'")
        self.kind = kind
        # PAPER: App. D.1 gives F_a as VGGish features of dimension C_a (128) but eq. (3) adds it to
        # C-channel tokens; the paper names no projection, we use one linear layer 128 -> C.
        self.emb_proj = nn.Linear(self.net.embedding_dim, dim)  # 128 -> C
        # NOT IN PAPER: a LayerNorm after the projection. The visual tokens leave the
        # post-norm deformable encoder at unit scale and the prototypes p_i are unit normals; an
        # unnormalised audio projection starts ~15x smaller, and the audio then hardly moves the
        # queries of eq. (3) and the tokens of eq. (4) and (6).
        self.emb_norm = nn.LayerNorm(dim)
        self.net_frozen = False  # see freeze_net

    def load_net_weights(self, path):
        """Load a state_dict file strictly into the wrapped network self.net (not emb_proj/norm).

        For 'vggish' the released `vggish-10086976.pth` (the model file, not the PCA file); for
        'small' a file written by `torch.save(SmallVGG().state_dict(), path)`. Raises ValueError,
        naming the file and what was expected, when it cannot be read or does not fit the network.
        """
        expected = self.net.state_dict()
        what = (f"a state_dict of the {self.kind!r} audio network ({type(self.net).__name__}: "
                f"{len(expected)} tensors, {next(iter(expected))!r} first)")
        import pickle
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's long message would suggest weights_only=False
            raise ValueError(f"{path} cannot be read (not a weights-only torch.save file: another "
                             f"format, or pickled Python objects); expected {what}") from None
        except Exception as e:  # missing, a folder, a truncated or corrupt torch file
            reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]
            raise ValueError(f"{path} cannot be read ({type(e).__name__}: {reason}); "
                             f"expected {what}") from None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a dict of tensors; "
                             f"expected {what}")
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
        problems = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)})"
                    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("wrong shapes", wrong)) if items]
        if problems:
            raise ValueError(f"{path} does not fit: expected {what}; " + "; ".join(problems))
        self.net.load_state_dict(state, strict=True)
        return self

    def freeze_net(self):
        """Freeze the wrapped (pretrained) network; emb_proj and emb_norm, ours, still train.

        requires_grad False keeps its parameters out of the optimizer (SQD.parameter_groups skips
        them, so AdamW's weight decay does not touch them either) and out of autograd: the
        log-mel input needs no gradient, so no graph is recorded through the net at all.
        """
        self.net.requires_grad_(False)
        self.net_frozen = True
        self.net.eval()
        return self

    def train(self, mode=True):
        """nn.Module.train, except that a frozen net stays in eval mode.

        model.train() reaches every submodule through this method. A frozen net must compute what
        it computed when it was pretrained: BatchNorm with its stored statistics (in train mode it
        would normalise with the batch's and overwrite the stored ones, which requires_grad does not
        prevent) and no dropout. VGGish has neither and SmallVGG's GroupNorm is the same in both
        modes, so today this changes no number; it keeps a net that has them frozen.
        """
        super().train(mode)
        if self.net_frozen:
            self.net.eval()
        return self

    def forward(self, audio):
        B, T = audio.shape[:2]  # (B, T, 1, 96, 64)
        embedding, _ = self.net(audio.flatten(0, 1))  # (B*T, 128); the conv map is not used
        return self.emb_norm(self.emb_proj(embedding)).view(B, T, -1)  # (B, T, C)


# ----------------------------------------------------------------------------------------------
# 3. Frame backbones: ResNet with torchvision's keys, and a tiny CPU backbone.
# ----------------------------------------------------------------------------------------------
# The per-channel RGB statistics of ImageNet: the pretrained backbones saw frames normalised with
# them, so every dataset normalises its frames with them too (data.py, synthetic.py).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)  # (3,)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)  # (3,)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (as DETR's), all buffers.

    Unlike DETR's, it keeps `num_batches_tracked` so that a torchvision state_dict loads strictly;
    a state_dict without it (old weight files) also loads (the buffer is then left at 0).

    forward: x (B*T, num_features, H', W') -> (B*T, num_features, H', W')
        = (x - running_mean) / sqrt(running_var + eps) * weight + bias (any map size H', W')
    """

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:  # old files lack it; nn.BatchNorm2d fills it in the same way
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)  # (num_features,)
        shift = self.bias - self.running_mean * scale  # (num_features,)
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)  # (B*T, num_features, H', W')


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs (stride on the first), identity or 1x1 downsample.

    forward: x (B*T, in_ch, x's size) -> (B*T, planes, H', W'), H', W' = x's size / stride.
    """
    expansion = 1

    def __init__(self, in_ch, planes, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)  # (B*T, planes, H', W')
        out = self.relu(self.bn1(self.conv1(x)))  # (B*T, planes, H', W')
        out = self.bn2(self.conv2(out))  # (B*T, planes, H', W')
        return self.relu(out + identity)  # (B*T, planes, H', W')


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision "V1.5"): 1x1, 3x3 (stride here), 1x1 x4; 1x1 downsample.

    forward: x (B*T, in_ch, x's size) -> (B*T, 4*planes, H', W'), H', W' = x's size / stride.
    """
    expansion = 4

    def __init__(self, in_ch, planes, stride, norm):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)  # (B*T, 4*planes, H', W')
        out = self.relu(self.bn1(self.conv1(x)))  # (B*T, planes) at x's size (before the stride)
        out = self.relu(self.bn2(self.conv2(out)))  # (B*T, planes, H', W')
        out = self.bn3(self.conv3(out))  # (B*T, 4*planes, H', W')
        return self.relu(out + identity)  # (B*T, 4*planes, H', W')


class ResNet(nn.Module):
    """ResNet-18/34/50 whose state_dict keys and shapes are torchvision's (320 keys for ResNet-50).

    Args:
        depth: 18, 34 or 50.
        frozen_bn: use FrozenBatchNorm2d (fixed ImageNet statistics, as DETR-family code does).

    forward:
        x: (B*T, 3, H, W) ImageNet-normalised, every frame on its own.
    Returns:
        [c2 (B*T, channels[0], H/4, W/4), c3 (.., H/8, W/8), c4 (.., H/16, W/16), c5 (.., H/32, W/32)]
    Attribute `channels`: (64, 128, 256, 512) for 18/34, (256, 512, 1024, 2048) for 50.
    """
    per_frame = True  # VisualEncoder feeds it the B*T frames of a batch, each on its own

    def __init__(self, depth=50, frozen_bn=False):
        super().__init__()
        block, counts = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
                         50: (Bottleneck, (3, 4, 6, 3))}[depth]
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch, stages = 64, []
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(count):
                blocks.append(block(in_ch, planes, 2 if (i > 0 and j == 0) else 1, norm))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # The classifier is never used; it is kept (frozen, so no optimizer or DDP sees it)
        # only so that torchvision's files load with strict=True.
        self.fc = nn.Linear(512 * block.expansion, 1000)
        self.fc.requires_grad_(False)
        self.channels = tuple(p * block.expansion for p in (64, 128, 256, 512))
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def load_torchvision_weights(self, path):
        """Load a torchvision resnet state_dict file (e.g. resnet50-0676ba61.pth) strictly."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state, strict=True)
        return self

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B*T, 64, H/4, W/4)
        c2 = self.layer1(x)  # (B*T, channels[0], H/4, W/4)
        c3 = self.layer2(c2)  # (B*T, channels[1], H/8, W/8)
        c4 = self.layer3(c3)  # (B*T, channels[2], H/16, W/16)
        c5 = self.layer4(c4)  # (B*T, channels[3], H/32, W/32)
        return [c2, c3, c4, c5]


class SmallBackbone(nn.Module):
    """A tiny CNN with ResNet's interface (strides 4/8/16/32), for the CPU preset.

    forward: x (B*T, 3, H, W) -> [c2 (B*T, 16, H/4, W/4), c3 (B*T, 32, H/8, W/8),
    c4 (B*T, 64, H/16, W/16), c5 (B*T, 64, H/32, W/32)] with the default widths. Attribute `channels`.
    """
    per_frame = True

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        # NOT IN PAPER (it uses ResNet-50 / Swin): a stand-in for the CPU preset only.

        def conv(cin, cout, stride):
            # NOT IN PAPER: GroupNorm instead of BatchNorm: CPU batches are a handful of frames.
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.GroupNorm(min(8, cout), cout), nn.ReLU(inplace=True))

        self.stem = nn.Sequential(conv(3, widths[0], 2), conv(widths[0], widths[0], 2))  # stride 4
        self.stages = nn.ModuleList(
            [conv(widths[i - 1], widths[i], 2) for i in range(1, 4)])  # strides 8, 16, 32
        self.channels = tuple(widths)

    def forward(self, x):
        feats = [self.stem(x)]  # c2 (B*T, widths[0], H/4, W/4)
        for stage in self.stages:
            feats.append(stage(feats[-1]))  # c3, c4, c5 at strides 8, 16, 32
        return feats


# ----------------------------------------------------------------------------------------------
# 4. Swin Transformer (Liu et al. 2021) and Video Swin (Liu et al. 2022), with torchvision's keys.
# ----------------------------------------------------------------------------------------------
# A Swin stage is a stack of transformer blocks whose self-attention stays inside non-overlapping
# windows of M x M tokens (Mt x M x M in a clip); every second block shifts the window grid by half
# a window, so that information crosses the window borders from one block to the next. Between
# stages a patch merging halves the map and doubles the channels: strides 4, 8, 16, 32 as ResNet's.
# The helpers below work on any number of axes: (H', W') in an image, (T, H', W') in a clip.
def window_partition(x, window):
    """Cut a map into non-overlapping windows.

    Args:
        x: (B', Hp, Wp, Cs) or (B', Tp, Hp, Wp, Cs); every axis a multiple of its window side.
        window: (M, M) or (Mt, M, M).
    Returns:
        (B'*Nw, Mv, Cs): the windows of the first map, then of the second (row-major over the
        window grid), the tokens of a window in row-major order.
    """
    B, *size, C = x.shape
    n = len(window)
    split = [v for s, m in zip(size, window) for v in (s // m, m)]  # per axis: windows, window side
    x = x.view(B, *split, C)  # (B', Hp/M, M, Wp/M, M, Cs); a clip has (Tp/Mt, Mt) first
    grid_axes, inside_axes = [1 + 2 * i for i in range(n)], [2 + 2 * i for i in range(n)]
    x = x.permute(0, *grid_axes, *inside_axes, 1 + 2 * n)  # (B', Hp/M, Wp/M, M, M, Cs)
    return x.reshape(-1, math.prod(window), C)  # (B'*Nw, Mv, Cs)


def window_reverse(windows, window, size):
    """The inverse of window_partition: windows (B'*Nw, Mv, Cs) -> the map (B', Hp, Wp, Cs) or
    (B', Tp, Hp, Wp, Cs), for size = (Hp, Wp) or (Tp, Hp, Wp)."""
    n, C = len(window), windows.shape[-1]
    grid = [s // m for s, m in zip(size, window)]
    x = windows.view(-1, *grid, *window, C)  # (B', Hp/M, Wp/M, M, M, Cs)
    order = [v for i in range(n) for v in (1 + i, 1 + n + i)]  # each grid axis before its window axis
    x = x.permute(0, *order, 1 + 2 * n)  # (B', Hp/M, M, Wp/M, M, Cs)
    return x.reshape(-1, *size, C)  # (B', Hp, Wp, Cs)


def relative_position_index(window, table_window=None):
    """The row of the relative position bias table that each (query, key) pair of a window reads.

    The table holds one row per possible offset between two tokens of a window of sides
    table_window: prod(2 M_k - 1) rows. An offset (d_0, d_1[, d_2]), query minus key, each
    d_k in [-(M_k - 1), M_k - 1], is shifted to d_k + M_k - 1 >= 0 and read as the digits of a
    mixed-radix number with bases 2 M_k - 1, the first axis most significant (Swin's layout).

    Args:
        window: sides of the window whose tokens are paired, (M, M) or (Mt, M, M).
        table_window: the sides the table was made for (default: window). A window that Video Swin
            shrinks to a short axis still reads the table of its full window.
    Returns:
        (Mv, Mv) long: row i is the query at row-major position i of the window, column j the key.
    """
    table_window = window if table_window is None else table_window
    grids = torch.meshgrid(*[torch.arange(m) for m in window], indexing="ij")  # 2 or 3 x (M, M) / (Mt, M, M)
    coords = torch.stack([g.flatten() for g in grids])  # (2 or 3, Mv)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2 or 3, Mv, Mv) query minus key
    index = torch.zeros(offsets.shape[1:], dtype=torch.long)  # (Mv, Mv)
    for d, m in zip(offsets, table_window):
        index = index * (2 * m - 1) + d + (m - 1)  # (Mv, Mv)
    return index


def shifted_window_regions(size, window, shift, device=None):
    """Region ids of a rolled map, for the mask of a shifted-window block (Swin §3.2).

    The block rolls the map by -shift along each axis, so that the shifted windows become the regular
    grid. Along an axis of length S the rolled map has three bands: [0, S - M) (windows that did not
    wrap), [S - M, S - shift) and [S - shift, S) (the last window: tokens from the far end of the
    map and tokens that wrapped around from its start). A token's region is its band on every axis;
    a shift of 0 leaves one band.

    Args:
        size: the padded map, (Hp, Wp) or (Tp, Hp, Wp); window, shift: per axis.
    Returns:
        (Hp, Wp) or (Tp, Hp, Wp) float: region = 3 * (band on the first axis) + band on the next
        (base-3 digits, the first axis most significant).
    """
    regions = torch.zeros(size, device=device)  # (Hp, Wp) or (Tp, Hp, Wp)
    for axis, (s, m, sh) in enumerate(zip(size, window, shift)):
        band = torch.zeros(s, device=device)  # (s,) the band of each position along this axis
        if sh:
            band[s - m:s - sh] = 1
            band[s - sh:] = 2
        along = [1] * len(size)
        along[axis] = s
        regions = regions * 3 + band.view(along)  # (Hp, Wp) or (Tp, Hp, Wp)
    return regions


def shifted_window_mask(size, window, shift, device=None):
    """The additive attention mask of a shifted-window block: (Nw, Mv, Mv), 0 where query and key
    lie in the same region (shifted_window_regions), -100 elsewhere (Swin's value: after the
    softmax such a key has a weight below 1e-43)."""
    regions = shifted_window_regions(size, window, shift, device)  # (Hp, Wp) or (Tp, Hp, Wp)
    ids = window_partition(regions[None, ..., None], window)[..., 0]  # (Nw, Mv)
    differ = ids[:, :, None] != ids[:, None, :]  # (Nw, Mv, Mv)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, -100.0)  # (Nw, Mv, Mv)


def stochastic_depth(x, p, training):
    """Drop a residual branch for a whole sample with probability p, scaling the kept ones by 1/(1-p)
    (Huang et al. 2016; torchvision's StochasticDepth, mode "row"). x: (B', ...) -> (B', ...)."""
    if not training or p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)  # (B', 1, ..)
    return x * keep / (1.0 - p)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows with a learned relative position bias
    (Swin §3.2), for images (2 axes) or clips (3 axes); keys as torchvision's ShiftedWindowAttention.

    A map whose side is not a multiple of the window is padded with zeros at the end, the padded
    tokens take part in the attention as any token (as in torchvision and Swin), and the output is
    cropped back. An axis no longer than one window is not shifted; Video Swin (clip_window=True)
    also shrinks the window to it, image Swin pads it up to one window.

    Args:
        dim: Cs. num_heads: Hd. window: (M, M) or (Mt, M, M). shift: per axis, 0 or half a window.
        clip_window: Video Swin's rule above (torchvision's video model), or image Swin's.

    forward: x (B', H', W', Cs) or (B', T, H', W', Cs) -> the same shape.
    """

    def __init__(self, dim, num_heads, window, shift, clip_window=False):
        super().__init__()
        self.num_heads, self.window, self.shift = num_heads, tuple(window), tuple(shift)
        self.clip_window = clip_window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        rows = math.prod(2 * m - 1 for m in self.window)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))  # (rows, Hd)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        index = relative_position_index(self.window)  # (Mv, Mv)
        # torchvision's files hold the index (a persistent buffer): flat for images, square for clips.
        self.register_buffer("relative_position_index", index.flatten() if len(self.window) == 2 else index)

    def position_bias(self, window):
        """The bias added to the attention logits of a window of sides `window`: (Hd, Mv, Mv)."""
        Mv = math.prod(window)
        if tuple(window) == self.window:
            index = self.relative_position_index.view(Mv, Mv)  # (Mv, Mv)
        else:
            # NOT IN PAPER: a window that Video Swin shrank to a short axis reads, in the full
            # window's table, the rows of its own tokens' offsets. torchvision's video model (and
            # Video Swin's code) take the first Mv rows and columns of the full window's index
            # instead: the same when time alone is shrunk (time is the outermost axis, e.g. T <= 8
            # frames at 224 px), other offsets when H' or W' is below M (stage 4 under 224 px).
            index = relative_position_index(window, self.window).to(self.relative_position_index.device)  # (Mv, Mv)
        bias = self.relative_position_bias_table[index.flatten()]  # (Mv*Mv, Hd)
        return bias.view(Mv, Mv, -1).permute(2, 0, 1)  # (Hd, Mv, Mv)

    def forward(self, x):
        B, *size, C = x.shape  # (B', H', W', Cs) or (B', T, H', W', Cs)
        window, shift = list(self.window), list(self.shift)
        for k, s in enumerate(size):
            if s <= window[k]:  # one window covers this axis: nothing to shift
                shift[k] = 0
                if self.clip_window:
                    window[k] = s
        pad = [(-s) % m for s, m in zip(size, window)]
        x = F.pad(x, [0, 0] + [v for p in reversed(pad) for v in (0, p)])  # (B', Hp, Wp, Cs) zeros at the end
        padded, axes, shifted = tuple(x.shape[1:-1]), list(range(1, len(size) + 1)), any(shift)
        if shifted:
            x = torch.roll(x, [-s for s in shift], axes)  # (B', Hp, Wp, Cs) shifted windows -> regular grid

        win = window_partition(x, window)  # (B'*Nw, Mv, Cs)
        Bw, Mv = win.shape[:2]
        Dh = C // self.num_heads
        q, k, v = self.qkv(win).view(Bw, Mv, 3, self.num_heads, Dh).permute(2, 0, 3, 1, 4)  # 3 x (B'*Nw, Hd, Mv, Dh)
        logits = (q * Dh ** -0.5) @ k.transpose(-2, -1)  # (B'*Nw, Hd, Mv, Mv)
        logits = logits + self.position_bias(window)  # (B'*Nw, Hd, Mv, Mv)
        if shifted:
            mask = shifted_window_mask(padded, window, shift, x.device).to(logits.dtype)  # (Nw, Mv, Mv)
            logits = logits.view(B, mask.shape[0], self.num_heads, Mv, Mv) + mask[:, None]  # (B', Nw, Hd, Mv, Mv)
            logits = logits.view(Bw, self.num_heads, Mv, Mv)  # (B'*Nw, Hd, Mv, Mv)
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(Bw, Mv, C)  # (B'*Nw, Mv, Cs) heads concatenated
        x = window_reverse(self.proj(out), window, padded)  # (B', Hp, Wp, Cs)
        if shifted:
            x = torch.roll(x, shift, axes)  # (B', Hp, Wp, Cs) back in place
        return x[(slice(None), *[slice(0, s) for s in size])]  # (B', H', W', Cs) padding cropped


class SwinBlock(nn.Module):
    """One Swin block (pre-norm): x + attn(norm1(x)), then x + mlp(norm2(x)); each branch dropped
    per sample with probability drop_path in training (stochastic depth).

    forward: (B', H', W', Cs) or (B', T, H', W', Cs) -> the same shape.
    """

    def __init__(self, dim, num_heads, window, shift, mlp_ratio=4.0, drop_path=0.0, clip_window=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window, shift, clip_window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # The two linears at indices 0 and 3, as torchvision's MLP (Linear, GELU, Dropout, Linear, ..).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + stochastic_depth(self.attn(self.norm1(x)), self.drop_path, self.training)  # (B', H', W', Cs)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, self.training)  # (B', H', W', Cs)


class PatchMerging(nn.Module):
    """Swin's downsampling between stages: each 2 x 2 neighbourhood's four Cs-vectors concatenated,
    in torchvision's order (even row, even column), (odd, even), (even, odd), (odd, odd), then
    LayerNorm and a linear 4 Cs -> 2 Cs. An odd side gets a zero row or column first. A clip's
    time axis is kept (Video Swin merges in space only).

    forward: (B', H', W', Cs) or (B', T, H', W', Cs) -> (B', ceil(H'/2), ceil(W'/2), 2 Cs) (T kept).
    """

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        H, W = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # (B', H' + H' % 2, W' + W' % 2, Cs)
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :],
                       x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], dim=-1)  # (B', H'/2, W'/2, 4 Cs)
        return self.reduction(self.norm(x))  # (B', H'/2, W'/2, 2 Cs)


class _ChannelsLast(nn.Module):
    """(B*T, Cs, H', W') -> (B*T, H', W', Cs): the parameter-free index 1 of torchvision's patch embedding."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)  # (B*T, H', W', Cs)


def _swin_stages(embed_dim, depths, num_heads, window, mlp_ratio, drop_path, clip_window):
    """torchvision's `features` after the patch embedding: stage 1, merge, stage 2, merge, ..., stage 4.
    Blocks alternate unshifted and shifted windows; the stochastic depth grows linearly from 0 at the
    first block to drop_path at the last."""
    total, done, layers = sum(depths), 0, []
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        blocks = []
        for j in range(depth):
            shift = [0 if j % 2 == 0 else m // 2 for m in window]
            p = drop_path * done / max(total - 1, 1)
            blocks.append(SwinBlock(dim, heads, window, shift, mlp_ratio, p, clip_window))
            done += 1
        layers.append(nn.Sequential(*blocks))
        if i < len(depths) - 1:
            layers.append(PatchMerging(dim))
    return layers


def _swin_init(model):
    """torchvision's initialisation: every linear truncated normal (std 0.02) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class SwinTransformer(nn.Module):
    """Swin-T (Liu et al. 2021) as a frame backbone, laid out as torchvision's swin_t so that its
    ImageNet file swin_t-704ceda3.pth loads strictly: features.0 (4 x 4 patch embedding: conv,
    channels-last permute, LayerNorm), features.1/3/5/7 (the four stages), features.2/4/6 (patch
    merging), norm, head; 185 tensors, 28,288,354 parameters.

    Args (the defaults are Swin-T; tests build tiny ones):
        embed_dim: channels of stage 1 (96); depths, num_heads: blocks and heads per stage;
        window: M (7); mlp_ratio: hidden width of the MLP / Cs; drop_path: stochastic depth of the
        last block (torchvision's swin_t: 0.2); num_classes: the unused head's classes (1000).

    forward:
        x: (B*T, 3, H, W) ImageNet-normalised, every frame on its own (as ResNet).
    Returns:
        [c2 (B*T, channels[0], H/4, W/4), c3 (.., H/8, W/8), c4 (.., H/16, W/16), c5 (.., H/32, W/32)]:
        the outputs of the four stages (before the merging that follows each), channels first.
        The patch embedding floors H/4, W/4; each merging rounds up.
    Attribute `channels`: (96, 192, 384, 768) for Swin-T.
    """
    per_frame = True  # VisualEncoder feeds it the B*T frames of a batch, each on its own

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window=7,
                 mlp_ratio=4.0, drop_path=0.2, num_classes=1000):
        super().__init__()
        window = (window, window) if isinstance(window, int) else tuple(window)
        embed = nn.Sequential(nn.Conv2d(3, embed_dim, 4, 4), _ChannelsLast(), nn.LayerNorm(embed_dim))
        self.features = nn.Sequential(embed, *_swin_stages(embed_dim, depths, num_heads, window, mlp_ratio,
                                                           drop_path, clip_window=False))
        self.channels = tuple(embed_dim * 2 ** i for i in range(len(depths)))
        # PAPER: the paper does not say how the stage outputs are normalised. Swin's detection backbone
        # (mmdet; ReferFormer's image Swin) adds a fresh LayerNorm per output stage and drops the
        # classifier's norm; MTTR's and ReferFormer's Video Swin backbones add none. We add none and
        # keep torchvision's pretrained `norm` on c5, where the classifier read it: every backbone map
        # is normalised again by the 1x1 conv + GroupNorm that VisualEncoder (c3..c5) and the FPN (c2)
        # put after it, and the file then loads with strict=True as it is.
        self.norm = nn.LayerNorm(self.channels[-1])
        # The classifier is never used; it is kept (frozen, so no optimizer or DDP sees it)
        # only so that torchvision's file loads with strict=True.
        self.head = nn.Linear(self.channels[-1], num_classes)
        _swin_init(self)
        self.head.requires_grad_(False)

    def load_torchvision_weights(self, path):
        """Load a torchvision swin_t state_dict file (swin_t-704ceda3.pth) strictly."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(state, strict=True)
        return self

    def forward(self, x):
        x = self.features[0](x)  # (B*T, H/4, W/4, channels[0]) patch tokens, channels last
        outs = []
        for i, layer in enumerate(self.features[1:]):
            x = layer(x)  # a stage (B*T, H', W', Cs) or a merging (B*T, H'/2, W'/2, 2 Cs)
            if i % 2 == 0:
                outs.append(x)  # the stage's output, before the merging
        outs[-1] = self.norm(outs[-1])  # (B*T, H/32, W/32, channels[3])
        return [o.permute(0, 3, 1, 2) for o in outs]  # [(B*T, Cs, H', W')] at strides 4, 8, 16, 32


class PatchEmbed3d(nn.Module):
    """Clip -> patch tokens (torchvision's PatchEmbed3d keys): a Conv3d with kernel = stride = patch
    (pt, 4, 4), then LayerNorm. T, H and W are padded with zeros up to multiples of the patch.

    forward: (B, 3, T, H, W) -> (B, T/pt, H/4, W/4, Cs) (sides rounded up).
    """

    def __init__(self, patch, dim):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(3, dim, self.patch, self.patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        pad = [(-s) % p for s, p in zip(x.shape[2:], self.patch)]  # T, H, W
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))  # (B, 3, T, H, W) rounded up to the patch
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))  # (B, T/pt, H/4, W/4, Cs)


class VideoSwinTransformer(nn.Module):
    """Video Swin-T (Liu et al. 2022) as a clip backbone, laid out as torchvision's swin3d_t so that its
    Kinetics-400 file swin3d_t-7615ae03.pth loads strictly (load_torchvision_weights): patch_embed
    (proj, norm), features.0/2/4/6 (stages with windows over time and space), features.1/3/5 (patch
    merging, in space only), norm, head; 185 tensors, 28,158,070 parameters with torchvision's patch.

    Unlike the frame backbones it sees the whole clip: windows span Mt frames, so a frame's
    features depend on its neighbours. One feature map per frame needs a temporal patch of 1.

    Args (the defaults are Video Swin-T as SQD uses it; tests build tiny ones):
        embed_dim, depths, num_heads, mlp_ratio: as SwinTransformer. window: (Mt, M, M) = (8, 7, 7).
        patch: (1, 4, 4); torchvision's (2, 4, 4) builds the pretrained network itself, whose time
        axis is halved (stage_outputs only). drop_path: torchvision's swin3d_t: 0.1.
        num_classes: the unused head's classes (400).

    forward:
        frames: (B, T, 3, H, W) ImageNet-normalised (torchvision's Kinetics recipe uses ImageNet's
            mean and std); frame_valid: (B, T) bool or None.
    Returns:
        [c2 (B*T, channels[0], H/4, W/4), c3 (.., H/8, W/8), c4 (.., H/16, W/16), c5 (.., H/32, W/32)]
        one map per frame, as a frame backbone (sides rounded up); padding slots hold zeros.
    Attribute `channels`: (96, 192, 384, 768).
    """
    per_frame = False  # VisualEncoder passes (frames, frame_valid): the clip is one input

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window=(8, 7, 7),
                 patch=(1, 4, 4), mlp_ratio=4.0, drop_path=0.1, num_classes=400):
        super().__init__()
        # PAPER: one feature map per frame. As MTTR's VideoSwinTransformerBackbone (and ReferFormer's),
        # the temporal patch is 1 instead of Kinetics' 2, so time is never downsampled while the
        # windows still span Mt = 8 frames; load_torchvision_weights adapts the pretrained kernel.
        self.patch_embed = PatchEmbed3d(patch, embed_dim)
        self.features = nn.Sequential(*_swin_stages(embed_dim, depths, num_heads, tuple(window), mlp_ratio,
                                                    drop_path, clip_window=True))
        self.channels = tuple(embed_dim * 2 ** i for i in range(len(depths)))
        # PAPER: as SwinTransformer: no norm per output stage, torchvision's pretrained `norm` on c5
        # (MTTR and ReferFormer use no norm at all on their Video Swin outputs).
        self.norm = nn.LayerNorm(self.channels[-1])
        self.head = nn.Linear(self.channels[-1], num_classes)  # unused, frozen: strict loading only
        _swin_init(self)
        self.head.requires_grad_(False)

    def load_torchvision_weights(self, path):
        """Load a torchvision swin3d_t state_dict file (swin3d_t-7615ae03.pth) strictly.

        The file's patch kernel (96, 3, 2, 4, 4) becomes (96, 3, 1, 4, 4) for the temporal patch of 1.
        """
        state = dict(torch.load(path, map_location="cpu", weights_only=True))
        key = "patch_embed.proj.weight"
        kernel, ours = state.get(key), self.patch_embed.proj.weight
        if kernel is not None and kernel.dim() == 5 and kernel.shape[2] != ours.shape[2] == 1:
            # PAPER: the kernel summed over its time axis (MTTR's deflation): on a clip that is
            # constant over time the new patch embedding gives what the pretrained one gave.
            state[key] = kernel.sum(dim=2, keepdim=True)  # (96, 3, 1, 4, 4)
        self.load_state_dict(state, strict=True)
        return self

    def stage_outputs(self, frames):
        """The four stage outputs of clips whose frames are all real, channels last.

        frames: (B, T, 3, H, W) -> [(B, T, H', W', Cs)] at strides 4, 8, 16, 32 in space (T/pt
        time steps with a temporal patch pt > 1); c5 after `norm`.
        """
        x = self.patch_embed(frames.transpose(1, 2))  # (B, T, H/4, W/4, channels[0])
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)  # a stage (B, T, H', W', Cs) or a merging (B, T, H'/2, W'/2, 2 Cs)
            if i % 2 == 0:
                outs.append(x)  # the stage's output, before the merging
        outs[-1] = self.norm(outs[-1])  # (B, T, H/32, W/32, channels[3])
        return outs

    def forward(self, frames, frame_valid=None):
        if self.patch_embed.patch[0] != 1:
            raise ValueError("one feature map per frame needs a temporal patch of 1; a clip backbone "
                             f"with patch {self.patch_embed.patch} has only stage_outputs")
        B, T = frames.shape[:2]  # (B, T, 3, H, W)
        valid = None if frame_valid is None else frame_valid.bool()  # (B, T)
        if valid is None or bool(valid.all()) or not bool(valid.any()):
            return [o.permute(0, 1, 4, 2, 3).flatten(0, 1) for o in self.stage_outputs(frames)]  # 4 x (B*T, Cs, H', W')
        # PAPER: padding frames must not move the real frames' features, but the windows mix the
        # frames of a clip. Each clip therefore runs on its real frames alone, in their order (a
        # clip with n real frames is the clip of those n frames), and its padding slots get zeros.
        # Clips with the same number of real frames run together.
        counts = valid.sum(1)  # (B,) real frames per clip
        outs = None
        for n in counts.unique().tolist():
            if n == 0:
                continue  # a clip of padding only: zeros
            clips = (counts == n).nonzero()[:, 0]  # (G,) the clips with n real frames
            frame_ids = valid[clips].nonzero()[:, 1].view(-1, n)  # (G, n) their real frames, in order
            feats = self.stage_outputs(frames[clips[:, None], frame_ids])  # 4 x (G, n, H', W', Cs)
            if outs is None:
                outs = [f.new_zeros(B, T, f.shape[-1], *f.shape[2:4]) for f in feats]  # 4 x (B, T, Cs, H', W')
            for out, f in zip(outs, feats):
                out[clips[:, None], frame_ids] = f.permute(0, 1, 4, 2, 3)  # (G, n, Cs, H', W')
        return [o.flatten(0, 1) for o in outs]  # 4 x (B*T, Cs, H', W')


# ----------------------------------------------------------------------------------------------
# 5. Positional embedding (App. D: the standard sine/cosine embedding of Vaswani et al.).
# ----------------------------------------------------------------------------------------------
def sine_position_embedding(h, w, dim, temperature=10000.0, device=None, dtype=torch.float32):
    """2-D sine/cosine positional embedding, normalised as Deformable-DETR's.

    Half the channels encode y, half x. A position p in 1..h is normalised to
    (p - 0.5) / h * 2*pi; channel pair (2i, 2i+1) of an axis holds sin and cos of that value
    divided by temperature^(2i / (dim/2)).

    Called with a level's size h, w = H_l, W_l and dim = C.

    Returns:
        pos: (C, H_l, W_l), channels [y features (C/2), x features (C/2)].
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    half = dim // 2
    # PAPER: App. D names only "the standard" embedding; we use the normalised 2-D form of
    # Deformable-DETR (positions in (0, 2*pi)), so the embedding does not depend on the image size.
    scale = 2 * math.pi
    y = (torch.arange(1, h + 1, device=device, dtype=torch.float32) - 0.5) / (h + 1e-6) * scale  # (H_l,)
    x = (torch.arange(1, w + 1, device=device, dtype=torch.float32) - 0.5) / (w + 1e-6) * scale  # (W_l,)
    i = torch.arange(half, device=device, dtype=torch.float32)  # (C/2,)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)  # (C/2,)
    pos_y = y[:, None] / freq  # (H_l, C/2)
    pos_x = x[:, None] / freq  # (W_l, C/2)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (H_l, C/2) sin,cos interleaved
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (W_l, C/2)
    pos = torch.cat((pos_y[:, None, :].expand(h, w, half), pos_x[None, :, :].expand(h, w, half)), dim=2)  # (H_l, W_l, C)
    return pos.permute(2, 0, 1).to(dtype)  # (C, H_l, W_l)


def sine_embedding_1d(length, dim, device=None):
    """Sinusoidal embedding over time (Vaswani et al., App. D): (T, C) for length = T frames and
    dim = C, sin on even channels, cos on odd ones, frequency 1 / 10000^(2i / C) for channel pair i."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]  # (T, 1)
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=device)  # (C/2,)
    angle = pos / (10000 ** (i / dim))  # (T, C/2)
    emb = torch.zeros(length, dim, device=device)  # (T, C)
    emb[:, 0::2] = torch.sin(angle)  # (T, C/2) even channels
    emb[:, 1::2] = torch.cos(angle[:, : dim // 2])  # (T, C/2) odd channels
    return emb  # (T, C)


# ----------------------------------------------------------------------------------------------
# 6-7. Multi-scale deformable attention (Zhu et al. 2020), pure PyTorch.
# ----------------------------------------------------------------------------------------------
def ms_deform_attn_core(value, spatial_shapes, sampling_locations, attention_weights):
    """The sampling core of multi-scale deformable attention (Deformable-DETR eq. 3, inner sums):
    out[q, m] = sum_l sum_p A[q, m, l, p] * bilinear(value_l[m], loc[q, m, l, p]).

    Shapes: B*T frames, each attended to on its own (the encoder's batch); Q queries; Hd heads;
    Dh channels of a head; Pt points; the level axis is written 3 (the model's 3 levels; the
    function takes any number, one per entry of spatial_shapes).

    Args:
        value: (B*T, S, Hd, Dh) values of all levels concatenated (level l has H_l*W_l tokens, row-major).
        spatial_shapes: list of the 3 (H_l, W_l) pairs (ints, or a (3, 2) tensor).
        sampling_locations: (B*T, Q, Hd, 3, Pt, 2) normalised (x, y) in [0, 1], (0, 0) the top-left
            corner of the map; pixel i's centre is (i + 0.5) / W_l (align_corners=False).
            Samples outside the map read zeros.
        attention_weights: (B*T, Q, Hd, 3, Pt), softmax-normalised over (levels, points) per head by
            the caller.

    Returns:
        out: (B*T, Q, Hd*Dh)
    """
    BT, S, Hd, Dh = value.shape
    Q = sampling_locations.shape[1]
    shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes)
                                             else spatial_shapes)]
    values = value.split([h * w for h, w in shapes], dim=1)  # 3 x (B*T, H_l*W_l, Hd, Dh)
    grids = 2 * sampling_locations - 1  # (B*T, Q, Hd, 3, Pt, 2) grid_sample's [-1, 1] coordinates
    out = value.new_zeros(BT * Hd, Dh, Q)  # (B*T*Hd, Dh, Q)
    for lvl, (h, w) in enumerate(shapes):
        v = values[lvl].permute(0, 2, 3, 1).reshape(BT * Hd, Dh, h, w)  # (B*T*Hd, Dh, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*T*Hd, Q, Pt, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*T*Hd, Dh, Q, Pt)
        a = attention_weights[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*T*Hd, Q, Pt)
        out = out + (sampled * a[:, None]).sum(-1)  # (B*T*Hd, Dh, Q) sum over points
    return out.view(BT, Hd * Dh, Q).transpose(1, 2)  # (B*T, Q, Hd*Dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al. 2020), layout and init as Deformable-DETR.

    Args:
        dim: C; num_levels: the levels (3 in the encoder; written 3 in the shapes below);
        num_heads: Hd; num_points: Pt per head and level.

    forward (B*T frames, each on its own; Q queries, in the encoder the S tokens of a frame):
        query: (B*T, Q, C) (content + positional embedding)
        reference_points: (B*T, Q, 3, 2) normalised (x, y) in [0, 1] per level
        input_flatten: (B*T, S, C) the values' source, levels concatenated
        spatial_shapes: list of the 3 (H_l, W_l)
    Returns:
        (B*T, Q, C)
    """

    def __init__(self, dim=256, num_levels=4, num_heads=8, num_points=4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_levels, self.num_heads, self.num_points = num_levels, num_heads, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable-DETR's init: head m starts looking along angle 2*pi*m/Hd, point p at p+1 pixels
        (directions scaled so max(|x|, |y|) = 1), the same on every level; uniform attention."""
        M, L, P = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(M, dtype=torch.float32) * (2.0 * math.pi / M)  # (Hd,)
        grid = torch.stack([angles.cos(), angles.sin()], -1)  # (Hd, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]  # (Hd, 2) on the square ring
        grid = grid.view(M, 1, 1, 2).repeat(1, L, P, 1)  # (Hd, 3, Pt, 2)
        grid = grid * torch.arange(1, P + 1, dtype=torch.float32).view(1, 1, P, 1)  # (Hd, 3, Pt, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, input_flatten, spatial_shapes):
        BT, Q, C = query.shape
        Hd, levels, Pt = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(input_flatten)  # (B*T, S, C)
        value = value.view(BT, value.shape[1], Hd, C // Hd)  # (B*T, S, Hd, Dh)
        offsets = self.sampling_offsets(query).view(BT, Q, Hd, levels, Pt, 2)  # (B*T, Q, Hd, 3, Pt, 2) in level pixels
        weights = self.attention_weights(query).view(BT, Q, Hd, levels * Pt)  # (B*T, Q, Hd, 3*Pt)
        weights = weights.softmax(-1).view(BT, Q, Hd, levels, Pt)  # (B*T, Q, Hd, 3, Pt) softmax over levels and points
        # (3, 2) as (W_l, H_l) since locations are (x, y); filled on the device, so that no
        # host-to-device copy makes the host wait (torch.tensor(list, device=cuda) would)
        normaliser = query.new_empty(levels, 2)  # (3, 2)
        for lvl, (h, w) in enumerate(spatial_shapes):
            normaliser[lvl, 0], normaliser[lvl, 1] = w, h
        locations = (reference_points[:, :, None, :, None, :]
                     + offsets / normaliser[None, None, None, :, None, :])  # (B*T, Q, Hd, 3, Pt, 2)
        out = ms_deform_attn_core(value, spatial_shapes, locations, weights)  # (B*T, Q, C)
        return self.output_proj(out)  # (B*T, Q, C)


class DeformableEncoderLayer(nn.Module):
    """One layer of the visual encoder, post-norm as Deformable-DETR, with a temporal step added:
      1. deformable self-attention within each frame over its 3 scales (residual + LayerNorm);
      2. self-attention over time at every token position (TemporalAttention, residual + LayerNorm);
      3. FFN with ReLU (residual + LayerNorm).

    forward:
        src: (B, T, S, C) the tokens of every frame, scales concatenated; pos: (S, C) their spatial
        and scale embedding; reference_points: (1, S, 3, 2); spatial_shapes: list of the 3 (H_l, W_l);
        time_pos: (T, C); frame_valid: (B, T) bool or None (False = a padding frame).
    Returns:
        (B, T, S, C)
    """

    def __init__(self, dim, ffn_dim, num_heads, num_points, dropout=0.1, num_scales=3):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_scales, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.temporal = TemporalAttention(dim, num_heads, dropout)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference_points, spatial_shapes, time_pos, frame_valid=None):
        B, T, S, C = src.shape
        x = src.flatten(0, 1)  # (B*T, S, C) every frame on its own
        q = x + pos  # (B*T, S, C)
        ref = reference_points.expand(B * T, -1, -1, -1)  # (B*T, S, 3, 2)
        attn = self.self_attn(q, ref, x, spatial_shapes)  # (B*T, S, C) within the frame
        x = self.norm1(x + self.dropout1(attn)).view(B, T, S, C)  # (B, T, S, C)
        x = self.temporal(x, time_pos, frame_valid)  # (B, T, S, C) across the clip's frames
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(x))))  # (B, T, S, C)
        return self.norm2(x + self.dropout3(ffn))  # (B, T, S, C)


class TemporalAttention(nn.Module):
    """Self-attention over time at every visual token position, with residual + LayerNorm:
    token s of frame t attends to token s of every real frame of the clip (itself included).

    Queries and keys carry a sinusoidal time embedding, values do not (as DETR's positions), so
    the layer has no parameter whose size depends on T. Padding frames take no attention mass
    (key padding mask); their own outputs are computed but never read by a real frame.

    forward:
        x: (B, T, S, C); time_pos: (T, C); frame_valid: (B, T) bool or None.
    Returns:
        (B, T, S, C)
    """

    def __init__(self, dim, num_heads, dropout=0.1):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, time_pos, frame_valid=None):
        B, T, S, C = x.shape
        seq = x.transpose(1, 2).reshape(B * S, T, C)  # (B*S, T, C) one sequence per token position
        q = seq + time_pos  # (B*S, T, C)
        pad = None
        if frame_valid is not None:
            pad = (~frame_valid.bool())[:, None, :].expand(B, S, T).reshape(B * S, T)  # (B*S, T) True = padding
        out = self.attn(q, q, seq, key_padding_mask=pad, need_weights=False)[0]  # (B*S, T, C)
        seq = self.norm(seq + self.dropout(out))  # (B*S, T, C)
        return seq.view(B, S, T, C).transpose(1, 2)  # (B, T, S, C)


# ----------------------------------------------------------------------------------------------
# 8. The visual encoder: backbone -> 1x1 projections -> deformable encoder over space and time.
# ----------------------------------------------------------------------------------------------
class VisualEncoder(nn.Module):
    """The visual encoder of App. D.1: a shared frame backbone and a deformable transformer
    encoder that "conducts temporal aggregation". Every layer attends within each frame over its
    three scales (deformable attention) and then across the frames of the clip at each token
    position (TemporalAttention). No parameter depends on the number of frames, so a model trained
    on T = 5 encodes a clip of any length in one pass (App. A).

    Args:
        backbone: returns [c2, c3, c4, c5] with attribute `channels`. A frame backbone (ResNet,
            SmallBackbone, SwinTransformer; per_frame True) takes the B*T frames as one batch; a clip
            backbone (VideoSwinTransformer; per_frame False) takes (frames, frame_valid).
        dim: C. enc_layers, num_heads, num_points, ffn_dim: encoder sizes. dropout: encoder dropout.

    forward:
        frames: (B, T, 3, H, W), any T >= 1
        frame_valid: (B, T) bool or None; padding frames (False) are never attended to, so the
            real frames' outputs do not depend on them (a frame backbone sees each frame on its own,
            the clip backbone runs each clip on its real frames; a backbone with BatchNorm in
            training mode, frozen_bn=False, would still mix them into its statistics).
    Returns dict:
        levels: [(B, T, C, H_l, W_l)] for strides 8, 16, 32 (F_v)
        pos: [(B, T, C, H_l, W_l)] the sine positional embedding of each level (no level embedding)
        c2: (B, T, c2_channels, h, w) the backbone's stride-4 features, for the FPN
    """

    def __init__(self, backbone, dim=256, enc_layers=4, num_heads=8, num_points=4, ffn_dim=1024,
                 dropout=0.1):
        super().__init__()
        self.backbone = backbone
        self.dim = dim
        self.num_scales = 3  # strides 8, 16, 32
        self.c2_channels = backbone.channels[0]
        # 1x1 conv + GroupNorm to C per scale, as Deformable-DETR (32 groups, fewer if C is small).
        groups = gcd(32, dim)
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, dim, 1), nn.GroupNorm(groups, dim)) for c in backbone.channels[1:]])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        # PAPER: encoder depth, heads, points and dropout are not given; the defaults are
        # ReferFormer's depth (4 layers) and Deformable-DETR's sizes (8 heads, 4 points, FFN 1024,
        # dropout 0.1).
        # PAPER: App. D.1 says only that the deformable encoder "conducts temporal aggregation" over
        # the T frames, and App. A that the model "can accept arbitrary frame numbers during
        # inference". We read it as factorised space-time attention (as TimeSformer's divided
        # attention): in every layer, deformable attention within each frame over its 3 scales
        # (one learned embedding per scale, as Deformable-DETR), then full self-attention over the
        # clip's real frames at each token position, with a sinusoidal time embedding. Nothing is
        # sized by T, and padding frames are masked out of the time attention. An encoder that
        # treats each (frame, scale) pair as a deformable level would have offsets, weights and
        # level embeddings for exactly T frames.
        self.level_embed = nn.Parameter(torch.empty(self.num_scales, dim).normal_())  # (3, C)
        self.layers = nn.ModuleList([DeformableEncoderLayer(dim, ffn_dim, num_heads, num_points, dropout,
                                                            self.num_scales)
                                     for _ in range(enc_layers)])

    @staticmethod
    def reference_points(spatial_shapes, device, dtype):
        """Pixel centres of every level, normalised to [0, 1] as (x, y), as Deformable-DETR's encoder
        (no padding, so valid ratios are 1 and a token looks at the same relative place on every level).

        Returns: (S, 3, 2)
        """
        refs = []
        for h, w in spatial_shapes:
            ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                                    torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")  # (H_l, W_l) each
            refs.append(torch.stack([xs.flatten() / w, ys.flatten() / h], -1))  # (H_l*W_l, 2)
        ref = torch.cat(refs, 0)  # (S, 2)
        return ref[:, None, :].expand(-1, len(spatial_shapes), -1)  # (S, 3, 2)

    def forward(self, frames, frame_valid=None):
        B, T = frames.shape[:2]  # (B, T, 3, H, W)
        if self.backbone.per_frame:
            c2, *cs = self.backbone(frames.flatten(0, 1))  # c2 (B*T, c2_channels, h, w); c3..c5
        else:  # a clip backbone: its windows span frames, so it needs the clip and its padding
            c2, *cs = self.backbone(frames, frame_valid)  # c2 (B*T, c2_channels, h, w); c3..c5
        feats = [proj(c) for proj, c in zip(self.input_proj, cs)]  # 3 x (B*T, C, H_l, W_l)
        scale_shapes = [tuple(f.shape[-2:]) for f in feats]  # 3 x (H_l, W_l)
        pos = [sine_position_embedding(h, w, self.dim, device=frames.device, dtype=feats[0].dtype)
               for h, w in scale_shapes]  # 3 x (C, H_l, W_l)

        src = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)  # (B*T, S, C) scales concatenated
        src = src.view(B, T, -1, self.dim)  # (B, T, S, C)
        pos_tokens = torch.cat([p.flatten(1).t() + self.level_embed[s] for s, p in enumerate(pos)])  # (S, C)
        ref = self.reference_points(scale_shapes, frames.device, src.dtype)[None]  # (1, S, 3, 2)
        time_pos = sine_embedding_1d(T, self.dim, frames.device).to(src.dtype)  # (T, C)
        for layer in self.layers:
            src = layer(src, pos_tokens, ref, scale_shapes, time_pos, frame_valid)  # (B, T, S, C)

        levels, start = [], 0
        for h, w in scale_shapes:
            lvl = src[:, :, start:start + h * w].transpose(2, 3)  # (B, T, C, H_l*W_l)
            levels.append(lvl.reshape(B, T, self.dim, h, w))  # (B, T, C, H_l, W_l)
            start += h * w
        pos = [p[None, None].expand(B, T, -1, -1, -1) for p in pos]  # 3 x (B, T, C, H_l, W_l)
        c2 = c2.view(B, T, *c2.shape[1:])  # (B, T, c2_channels, h, w)
        return dict(levels=levels, pos=pos, c2=c2)


# ----------------------------------------------------------------------------------------------
# 9. FPN: the encoded levels (strides 8/16/32) and c2 -> mask features f_out at stride 4 (eq. 7).
# ----------------------------------------------------------------------------------------------
class FPN(nn.Module):
    """Top-down feature pyramid to stride 4 (as the mask-feature FPNs of ReferFormer/Mask2Former):
    nearest upsample-and-add, 3x3 conv + GroupNorm + ReLU after each merge, a 1x1 lateral on c2,
    and a 3x3 output conv to mask_dim channels.

    Args:
        dim: C; c2_channels: channels of the backbone's stride-4 map; mask_dim: Cm (8).

    forward:
        levels: [(B*T, C, H_l, W_l)] at strides 8, 16, 32
        c2: (B*T, c2_channels, h, w), h, w = H/4, W/4
    Returns:
        f_out: (B*T, Cm, h, w)
    """

    def __init__(self, dim, c2_channels, mask_dim=8):
        super().__init__()
        # PAPER: the mask-feature FPN is not described; this is the usual top-down path of the
        # CondInst/ReferFormer family, ending at stride 4 with Cm = 8 channels for eq. 7.
        groups = gcd(32, dim)

        def conv3x3(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                                 nn.ReLU(inplace=True))

        self.merge16 = conv3x3(dim, dim)  # after adding stride 32 into stride 16
        self.merge8 = conv3x3(dim, dim)  # after adding into stride 8
        self.lateral4 = nn.Sequential(nn.Conv2d(c2_channels, dim, 1, bias=False), nn.GroupNorm(groups, dim))
        self.merge4 = conv3x3(dim, dim)  # after adding into stride 4
        self.mask_out = nn.Conv2d(dim, mask_dim, 3, padding=1)

    def forward(self, levels, c2):
        x8, x16, x32 = levels
        y = self.merge16(x16 + F.interpolate(x32, size=x16.shape[-2:], mode="nearest"))  # (B*T, C, H/16, W/16)
        y = self.merge8(x8 + F.interpolate(y, size=x8.shape[-2:], mode="nearest"))  # (B*T, C, H/8, W/8)
        y = self.merge4(self.lateral4(c2) + F.interpolate(y, size=c2.shape[-2:], mode="nearest"))  # (B*T, C, h, w)
        return self.mask_out(y)  # (B*T, Cm, h, w)
