"""Vector quantization with one shared codebook (product quantization) and the SQD quantization loss.

What this file teaches
    SQD (Sec. 3.1) represents a multi-source audio clip by N semantic tokens, each snapped to its
    nearest word of ONE shared codebook of K words: N tokens can express K**N products (eq. 1) while
    the codebook stays small (K << Kc**N, Kc sound categories: §4.2's 128 << 70**N), so a mixture
    must decompose into single-source parts that reuse the same words (eq. 2). The N quantized
    tokens stay side by side, (..., N, C): eq. (2)'s concatenation (+) is that layout read as one
    N*C vector, which no step needs (tests/test_quantize.py's product_quantize writes it out).
    Eq. (9) of Sec. 3.5 trains the codebook (first term), pulls the global tokens e_i = VQ(g_i) of
    Sec. 3.3 to their codewords (second term), and makes the local, per-frame tokens of Sec. 3.4
    commit to the same codebook without updating it (third).

Reading order
    1. QuantizerOutput        what one quantization returns
    2. VectorQuantizer        codebook, nearest_code (VQ of eq. 2), forward (straight-through, the
                              eq. (9) terms, the update_codebook=False local path); then, not in
                              the paper, the warm-up (VQ(x) = x) and the k-means codebook ending it
    3. quantization_loss      eq. (9): the three named, unweighted terms
    (how much of the codebook a run uses, and the collapse warning: metrics.py)

Shape alphabet (the repository's one alphabet: docs/shapes.md)
    ... any leading dimensions (B, or B and T), N semantic tokens per clip (or per frame), C token
    and codeword width (the model channels), K codewords, V vectors after flattening the leading
    dimensions.
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class QuantizerOutput(NamedTuple):
    """The result of quantizing vectors x (..., C). The losses are means over elements, unweighted
    (the criterion applies lambda_com); with update_codebook=False, codebook_loss is zero and
    nothing carries a gradient to the codebook."""
    quantized: torch.Tensor  # (..., C) VQ(x), straight-through
    indices: torch.Tensor  # (...) int64, the index in [0, K) of the chosen codeword
    codebook_loss: torch.Tensor  # () eq. (9) first term ||VQ(x) - sg[x]||^2
    commitment_loss: torch.Tensor  # () eq. (9) second/third term ||sg[VQ(x)] - x||^2


class VectorQuantizer(nn.Module):
    """VQ(x) = argmin_{e_k in C} ||x - e_k||_2 with a learnable codebook C = {e_k}, k = 1..K.

    num_codes is K (128 in the paper), dim is C. The codewords are the parameter `codebook`, trained
    by eq. (9)'s first term. Not in the paper, the warm-up's state: `warmup` (bool, see set_warmup)
    and two buffers, in checkpoints so that a run resumed in the warm-up continues exactly: the
    ring `warmup_tokens` of the last `warmup_memory` tokens and the count `warmup_seen`.
    """

    def __init__(self, num_codes: int, dim: int, warmup_memory: int = 4096):
        super().__init__()
        self.num_codes = num_codes
        self.dim = dim
        # PAPER: codewords start on the sphere ||e||^2 = C of the LayerNorm'd tokens (normal vectors
        # through a LayerNorm without affine); docs/paper-silent.md#codebook-initialisation.
        self.codebook = nn.Parameter(F.layer_norm(torch.randn(num_codes, dim), (dim,)))  # (K, C)
        self.warmup = False
        self.register_buffer("warmup_tokens", torch.zeros(warmup_memory, dim))  # (V, C) the ring
        self.register_buffer("warmup_seen", torch.tensor(0))  # () int64, tokens written so far

    @torch.no_grad()
    def nearest_code(self, flat: torch.Tensor) -> torch.Tensor:
        """The index (V,) int64 of the nearest codeword in L2 to each row of flat (V, C), the VQ of
        eq. (2); ties go to the lowest index. ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2 (one matrix
        product), in at least float32 with autocast off, so that a bf16/fp16 autocast region cannot
        change which codeword is nearest."""
        dtype = torch.promote_types(torch.promote_types(flat.dtype, self.codebook.dtype), torch.float32)
        with torch.autocast(device_type=flat.device.type, enabled=False):
            x = flat.to(dtype)  # (V, C)
            e = self.codebook.detach().to(dtype)  # (K, C)
            dist2 = (x.pow(2).sum(1, keepdim=True)  # (V, 1)
                     - 2.0 * x @ e.t()  # (V, K)
                     + e.pow(2).sum(1).unsqueeze(0))  # (1, K) -> (V, K)
            return dist2.argmin(dim=1)  # (V,) int64

    def forward(self, x: torch.Tensor, update_codebook: bool = True,
                valid: Optional[torch.Tensor] = None) -> QuantizerOutput:
        """Quantize every C-vector of x (..., C), the global g_i or the local l_{i,t}.

        update_codebook: True for the global path (eq. 9 terms 1 and 2, the codebook is trained),
        False for the local path (eq. 9 term 3, no codebook gradient). valid (...) bool or None: the
        tokens that count, in the losses (means over valid tokens) and in the warm-up memory
        (padding frames count nowhere). Returns a QuantizerOutput with x's leading dimensions.
        """
        lead = x.shape[:-1]  # (...) the leading dimensions
        flat = x.reshape(-1, self.dim)  # (V, C)
        keep = None if valid is None else valid.reshape(-1)  # (V,) bool
        if self.warmup:
            return self._warmup_forward(flat, lead, update_codebook, keep)  # VQ(x) = x in the warm-up (not in the paper)
        indices = self.nearest_code(flat)  # (V,) int64, VQ of eq. (2)
        codebook = self.codebook if update_codebook else self.codebook.detach()  # (K, C)
        codes = codebook[indices]  # (V, C) e = VQ(x), gradient to the codebook only if update_codebook

        # NOT IN PAPER: eq. (9)'s sums over tokens are means over all V * C elements (MSE), so
        # lambda_quant keeps one meaning across presets; docs/paper-silent.md#eq-9-as-means.
        # zero: the local path's codebook term (update_codebook=False), and both terms of an empty x
        codebook_loss = commitment_loss = flat.new_zeros(())  # ()
        if flat.shape[0] > 0:
            xd = flat.to(codes.dtype)  # (V, C)
            if update_codebook:
                codebook_loss = _mse(codes, xd.detach(), keep)  # eq. (9), first term ||VQ(g) - sg[g]||^2
            commitment_loss = _mse(xd, codes.detach(), keep)  # eq. (9), second/third term ||sg[VQ(x)] - x||^2

        # PAPER: gradients cross the argmin by VQ-VAE's straight-through estimator, written
        # sg[e] + (x - sg[x]): value = the codeword bit for bit, d quantized / d x = I, nothing to the
        # codebook; docs/paper-silent.md#the-straight-through-estimator.
        quantized = codes.detach().to(flat.dtype) + (flat - flat.detach())  # (V, C)
        return QuantizerOutput(
            quantized=quantized.reshape(*lead, self.dim),  # (..., C)
            indices=indices.reshape(lead),  # (...)
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
        )

    # ------------------------------------------------------------------------------------------
    # NOT IN PAPER: the quantizer warm-up (a pass-through for every recipe's first 300 steps;
    # --quant-warmup-steps 0 is the paper) and the k-means codebook that ends it;
    # docs/paper-silent.md#the-quantizer-warm-up.
    # ------------------------------------------------------------------------------------------
    def set_warmup(self, active: bool) -> None:
        """Switch the warm-up on or off (train.py, from its step count). While on, VQ(x) = x: the
        tokens go on unquantized, eq. (9) is zero, the codebook is not touched, and the tokens of
        each training forward (global and local) go into the ring that `end_warmup` clusters."""
        self.warmup = bool(active)

    def end_warmup(self) -> None:
        """End the warm-up (train.py: once, right after the update of the step that ends it): quantize
        from now on, from the k-means centres of the remembered tokens (`init_from_tokens`), if any."""
        self.warmup = False
        seen = int(self.warmup_seen)
        if seen > 0:
            self.init_from_tokens(self.warmup_tokens[: min(seen, self.warmup_tokens.shape[0])])  # (V', C)

    def _warmup_forward(self, flat: torch.Tensor, lead, update_codebook: bool,
                        keep: Optional[torch.Tensor]) -> QuantizerOutput:
        """forward in the warm-up, on flat (V, C) and keep (V,): VQ(x) = x and zero losses; the nearest
        codewords' indices are still reported (for logging), and training tokens are remembered."""
        if self.training:  # into the ring `warmup_tokens`, overwriting the oldest (no host read)
            ring = self.warmup_tokens.shape[0]
            seen = (flat if keep is None else flat[keep]).detach()[-ring:]  # (V', C), V' <= ring
            seen = seen.to(self.warmup_tokens.dtype)  # (V', C)
            self.warmup_tokens[(self.warmup_seen + torch.arange(len(seen), device=flat.device)) % ring] = seen
            self.warmup_seen += len(seen)
        indices = self.nearest_code(flat)  # (V,)
        # () eq. (9) is off. The global path's zero comes from the codebook, keeping it in the graph
        # with a zero gradient (DDP expects every parameter used); the local path never touches it.
        zero = (self.codebook.sum() * 0.0).to(flat.dtype) if update_codebook else flat.new_zeros(())
        return QuantizerOutput(
            quantized=flat.reshape(*lead, self.dim),  # (..., C) the token itself
            indices=indices.reshape(lead),  # (...)
            codebook_loss=zero,
            commitment_loss=flat.new_zeros(()),
        )

    @torch.no_grad()
    def init_from_tokens(self, tokens: torch.Tensor, iters: int = 20, seed: int = 0) -> torch.Tensor:
        """Set the codebook to the k-means centres of tokens (V, C): k-means++ seeding (draws seeded
        by `seed`), then `iters` Lloyd steps (each vector to its nearest centre, each centre to the
        mean of its vectors; a centre with no vector stays). With fewer than K distinct vectors, the
        codes no vector can seed keep their value. Returns sizes (K,) int64, the tokens each code
        holds after the last assignment. Under DDP rank 0's centres are broadcast; Adam's moments
        of the codebook are left as they were. Why torch and not scipy's kmeans2:
        docs/paper-silent.md#k-means-in-torch.
        """
        x = tokens.detach().to(torch.float32)  # (V, C)
        K = self.num_codes
        g = torch.Generator(device="cpu").manual_seed(seed)
        centres = self.codebook.detach().to(torch.float32).clone()  # (K, C) fallback for unseeded codes
        # k-means++: the first centre uniformly, each next one with probability ~ squared distance
        first = int(torch.randint(x.shape[0], (1,), generator=g))
        centres[0] = x[first]
        d2 = (x - x[first]).pow(2).sum(1)  # (V,) squared distance to the nearest chosen centre
        seeded = 1
        while seeded < K and d2.sum() > 0:
            pick = int(torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=g))
            centres[seeded] = x[pick]
            d2 = torch.minimum(d2, (x - x[pick]).pow(2).sum(1))  # (V,)
            seeded += 1
        for _ in range(iters):
            assign = torch.cdist(x, centres[:seeded]).argmin(1)  # (V,) nearest seeded centre
            sums = torch.zeros(seeded, x.shape[1], device=x.device).index_add_(0, assign, x)  # (K', C)
            counts = torch.bincount(assign, minlength=seeded)  # (K',)
            moved = counts > 0
            centres[:seeded][moved] = sums[moved] / counts[moved, None]  # (K', C) cluster means
        sizes = torch.bincount(torch.cdist(x, centres[:seeded]).argmin(1), minlength=K)  # (K,)
        self.codebook.copy_(centres.to(self.codebook.dtype))  # (K, C)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(self.codebook, src=0)  # (K, C) rank 0's centres everywhere
        return sizes


def _mse(a: torch.Tensor, b: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of (a - b)^2 over all elements of the rows where keep is True (all rows if None).
    a, b: (V, C); keep: (V,) bool or None. Returns a scalar; 0 when no row is kept."""
    if keep is None:
        return F.mse_loss(a, b)
    w = keep.to(a.dtype)  # (V,)
    return ((a - b).pow(2).mean(1) * w).sum() / w.sum().clamp(min=1.0)  # ()


def quantization_loss(global_out: QuantizerOutput, local_out: Optional[QuantizerOutput] = None) -> dict:
    """Eq. (9), the three terms, unweighted (the criterion applies lambda_quant and lambda_com).

    L_quant = ||VQ(g) - sg[g]||^2 + lambda_com ||sg[VQ(g)] - g||^2 + lambda_com ||sg[VQ(l)] - l||^2

    global_out quantized the global tokens g (update_codebook=True), local_out (or None) the local
    tokens l; the local tokens must not update the shared codebook (Sec. 3.4): a ValueError if
    local_out carries a codebook gradient.
    """
    losses = {
        "quant_codebook": global_out.codebook_loss,  # eq. (9), first term
        "quant_commit_global": global_out.commitment_loss,  # eq. (9), second term
    }
    if local_out is not None:
        if local_out.codebook_loss.requires_grad:
            raise ValueError("the local tokens must be quantized with update_codebook=False: "
                             "they commit to the shared codebook but do not update it (eq. 9)")
        losses["quant_commit_local"] = local_out.commitment_loss  # eq. (9), third term
    return losses
