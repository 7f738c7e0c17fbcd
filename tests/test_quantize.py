"""Tests of quantize.py: eq. (1), (2), (9), the warm-up and its k-means.

Every test compares with an independent computation: enumeration, an explicit python loop with a
brute-force argmin, hand-written losses and gradients, autograd Jacobians.
"""
import itertools
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantize import QuantizerOutput, VectorQuantizer, quantization_loss  # noqa: E402


def make_vq(K, D, seed=0, **kw):
    torch.manual_seed(seed)
    return VectorQuantizer(K, D, **kw).double()


def product_quantize(vq, tokens, update_codebook=True):
    """Eq. (2): PQ(x) = VQ_s(x_1) (+) ... (+) VQ_s(x_N) with one shared codebook C_s (vq).

    tokens (..., N, C) are the decomposed tokens x_i = f_i(x) (in the model g_i or l_{i,t}, which
    it keeps side by side). Returns pq (..., N*C), the N straight-through quantized tokens
    concatenated (token i in channels [i*C, (i+1)*C)), and the QuantizerOutput of the N tokens.
    """
    out = vq(tokens, update_codebook=update_codebook)  # quantized (..., N, C): one VQ_s for every token
    return out.quantized.flatten(-2), out  # (..., N*C) eq. (2), concatenation (+)


def brute_force_nearest(x, codebook):
    """Python loop over the codebook: index of the smallest squared distance."""
    best, best_d = None, float("inf")
    for k in range(len(codebook)):
        d = sum((float(a) - float(b)) ** 2 for a, b in zip(x, codebook[k]))
        if d < best_d:
            best, best_d = k, d
    return best


# ---------------------------------------------------------------------------------------------
# eq. (1): N tokens over one K-word codebook express K**N products
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K,N", [(3, 2), (2, 3), (1, 3), (4, 2)])
def test_eq01_shared_codebook_expresses_K_to_the_N_products(K, N):
    D = 4
    vq = make_vq(K, D)
    combos = list(itertools.product(range(K), repeat=N))  # every element of X_s x ... x X_s
    noise = 0.01 * torch.randn(len(combos), N, D, dtype=torch.float64)
    tokens = torch.stack([vq.codebook.detach()[list(c)] for c in combos]) + noise  # (K**N, N, D)
    pq, out = product_quantize(vq, tokens)
    distinct = {tuple(row.tolist()) for row in pq}
    assert len(distinct) == K ** N
    for j, c in enumerate(combos):  # each product is the concatenation of its codewords
        assert out.indices[j].tolist() == list(c)
        assert torch.equal(pq[j], torch.cat([vq.codebook.detach()[k] for k in c]))
    # Contrast: one VQ with the same K words over the whole (N*D)-vector gives at most K outputs.
    whole = make_vq(K, N * D, seed=1)
    whole_out = whole(tokens.flatten(1))
    assert len({tuple(row.tolist()) for row in whole_out.quantized}) <= K


# ---------------------------------------------------------------------------------------------
# eq. (2): PQ(x) = VQ_s(x_1) (+) ... (+) VQ_s(x_N)
# ---------------------------------------------------------------------------------------------

def test_eq02_product_quantization_equals_per_token_loop():
    B, T, N, D, K = 2, 3, 4, 5, 7
    vq = make_vq(K, D)
    torch.manual_seed(1)
    tokens = torch.randn(B, T, N, D, dtype=torch.float64)
    pq, out = product_quantize(vq, tokens)
    assert isinstance(out, QuantizerOutput)
    assert pq.shape == (B, T, N * D) and out.quantized.shape == (B, T, N, D)
    assert out.indices.shape == (B, T, N) and out.indices.dtype == torch.int64
    cb = vq.codebook.detach()
    for b in range(B):
        for t in range(T):
            for i in range(N):
                k = brute_force_nearest(tokens[b, t, i].tolist(), cb.tolist())
                assert out.indices[b, t, i].item() == k
                assert torch.equal(pq[b, t, i * D:(i + 1) * D], cb[k])  # token i at channels [iD, (i+1)D)
                assert torch.equal(out.quantized[b, t, i], cb[k])
    # the local path chooses the same codewords
    pq_local, out_local = product_quantize(vq, tokens, update_codebook=False)
    assert torch.equal(pq_local, pq) and torch.equal(out_local.indices, out.indices)


def test_eq02_nearest_code_float32_matches_cdist_and_survives_bf16_autocast():
    torch.manual_seed(0)
    K, D, M = 128, 256, 300
    vq = VectorQuantizer(K, D)
    x = torch.nn.functional.layer_norm(torch.randn(M, D), (D,))  # (M, D)
    idx = vq(x).indices
    ref_d = torch.cdist(x.double(), vq.codebook.detach().double())  # (M, K) float64 reference
    chosen = ref_d.gather(1, idx[:, None]).squeeze(1)
    assert torch.allclose(chosen, ref_d.min(1).values, rtol=0, atol=1e-4)  # nearest up to fp32 rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx_amp = vq(x).indices
    assert torch.equal(idx_amp, idx)


def test_codebook_init_matches_layernormed_tokens():
    K, D = 64, 32
    cb = VectorQuantizer(K, D).codebook.detach().double()
    assert torch.allclose(cb.mean(1), torch.zeros(K, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(cb.pow(2).sum(1), torch.full((K,), float(D), dtype=torch.float64), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# eq. (9): the three terms and their stop-gradients
# ---------------------------------------------------------------------------------------------

def hand_sq_error(x, codebook):
    """Sum over vectors of ||e_nearest - x||^2, by loops."""
    flat = x.reshape(-1, x.shape[-1]).tolist()
    cb = codebook.tolist()
    total = 0.0
    for v in flat:
        k = brute_force_nearest(v, cb)
        total += sum((a - b) ** 2 for a, b in zip(v, cb[k]))
    return total


def test_eq09_terms_equal_hand_computation():
    B, T, N, D, K = 2, 3, 3, 4, 5
    vq = make_vq(K, D)
    torch.manual_seed(2)
    g = torch.randn(B, N, D, dtype=torch.float64)
    l = torch.randn(B, T, N, D, dtype=torch.float64)
    g_out = vq(g)
    l_out = vq(l, update_codebook=False)
    losses = quantization_loss(g_out, l_out)
    assert set(losses) == {"quant_codebook", "quant_commit_global", "quant_commit_local"}
    cb = vq.codebook.detach()
    sum_g, sum_l = hand_sq_error(g, cb), hand_sq_error(l, cb)
    # mean over elements; the paper's sum over tokens is mean * (number of elements)
    assert math.isclose(losses["quant_codebook"].item(), sum_g / (B * N * D), rel_tol=1e-12)
    assert math.isclose(losses["quant_commit_global"].item(), sum_g / (B * N * D), rel_tol=1e-12)
    assert math.isclose(losses["quant_commit_local"].item(), sum_l / (B * T * N * D), rel_tol=1e-12)
    assert math.isclose(losses["quant_codebook"].item() * B * N * D, sum_g, rel_tol=1e-12)
    assert l_out.codebook_loss.item() == 0.0 and not l_out.codebook_loss.requires_grad
    assert set(quantization_loss(g_out)) == {"quant_codebook", "quant_commit_global"}


def test_eq09_codebook_gets_gradient_only_from_first_term():
    M, D, K = 6, 3, 4
    vq = make_vq(K, D)
    torch.manual_seed(3)
    x = torch.randn(M, D, dtype=torch.float64, requires_grad=True)
    e = vq.codebook.detach()
    idx = torch.tensor([brute_force_nearest(v, e.tolist()) for v in x.tolist()])

    # commitment term alone: gradient to x only, 2/(M D) (x - e)
    vq(x).commitment_loss.backward()
    assert vq.codebook.grad is None or torch.count_nonzero(vq.codebook.grad) == 0
    assert torch.allclose(x.grad, 2.0 / (M * D) * (x.detach() - e[idx]), atol=1e-14)

    # codebook term alone: gradient to the codebook only, 2/(M D) sum_{i: idx_i = k} (e_k - x_i)
    x.grad = None
    vq.zero_grad(set_to_none=True)
    vq(x).codebook_loss.backward()
    assert x.grad is None or torch.count_nonzero(x.grad) == 0
    expected = torch.zeros(K, D, dtype=torch.float64)
    for i in range(M):
        expected[idx[i]] += 2.0 / (M * D) * (e[idx[i]] - x.detach()[i])
    assert torch.allclose(vq.codebook.grad, expected, atol=1e-14)

    # the straight-through output carries nothing to the codebook either
    vq.zero_grad(set_to_none=True)
    vq(x).quantized.pow(3).sum().backward()
    assert vq.codebook.grad is None or torch.count_nonzero(vq.codebook.grad) == 0


def test_eq09_straight_through_gradient_is_identity():
    M, D, K = 3, 4, 5
    vq = make_vq(K, D)
    torch.manual_seed(4)
    x = torch.randn(M, D, dtype=torch.float64)
    out = vq(x)
    assert torch.equal(out.quantized, vq.codebook.detach()[out.indices])  # value = codeword
    jac = torch.autograd.functional.jacobian(lambda v: vq(v).quantized, x)  # (M, D, M, D)
    assert torch.equal(jac.reshape(M * D, M * D), torch.eye(M * D, dtype=torch.float64))


def test_eq09_local_path_never_changes_codebook():
    T, N, D, K = 4, 3, 4, 5
    vq = make_vq(K, D)
    vq.train()
    torch.manual_seed(5)
    l = torch.nn.Parameter(torch.randn(T, N, D, dtype=torch.float64))
    opt = torch.optim.AdamW(list(vq.parameters()) + [l], lr=0.1, weight_decay=0.1)
    before = vq.codebook.detach().clone()
    l_before = l.detach().clone()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        pq, out = product_quantize(vq, l, update_codebook=False)
        no_global = QuantizerOutput(*[torch.zeros((), dtype=torch.float64)] * 4)
        loss = (sum(quantization_loss(no_global, out).values())  # eq. (9), third term
                + pq.pow(2).sum() + out.quantized.pow(2).sum())  # anything downstream
        loss.backward()
        assert vq.codebook.grad is None  # the selected codewords are detached on the local path
        opt.step()
    assert torch.equal(vq.codebook.detach(), before)  # bit-identical
    assert not torch.equal(l.detach(), l_before)  # the local tokens did move
    # contrast: one step on the global path moves the codebook
    opt.zero_grad(set_to_none=True)
    g_out = vq(l)
    (g_out.codebook_loss + 0.5 * g_out.commitment_loss).backward()
    opt.step()
    assert not torch.equal(vq.codebook.detach(), before)


def test_eq09_shared_codebook_rejects_a_local_path_that_updates_it():
    vq = make_vq(4, 3)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="update_codebook=False"):
        quantization_loss(vq(x), vq(x, update_codebook=True))


# ---------------------------------------------------------------------------------------------
# Warm-up and the k-means codebook (not in the paper; every train.py recipe uses them)
# ---------------------------------------------------------------------------------------------

def test_warmup_passes_tokens_through_and_remembers_the_last_R():
    K, D, R = 4, 3, 5
    vq = make_vq(K, D, warmup_memory=R)
    start = vq.codebook.detach().clone()
    vq.set_warmup(True)
    vq.train()
    seen = []
    for step in range(3):
        x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)  # (2, D)
        out = vq(x, update_codebook=(step != 1))  # global and local paths are both remembered
        assert torch.equal(out.quantized, x)  # VQ(x) = x
        out.quantized.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
        assert out.codebook_loss.item() == 0.0 and out.commitment_loss.item() == 0.0
        assert out.indices.tolist() == [brute_force_nearest(r, vq.codebook.detach()) for r in x.detach()]
        seen += list(x.detach())
    vq.eval()
    vq(torch.randn(7, D, dtype=torch.float64))  # evaluation is not remembered
    assert vq.warmup_seen.item() == 6
    # ring of R = 5 by hand: token number j sits in slot j % R, the newest overwrite the oldest
    for j in range(1, 6):
        assert torch.equal(vq.warmup_tokens[j % R], seen[j])
    vq.set_warmup(False)  # the switch alone: the codebook is still the initial one
    assert torch.equal(vq.codebook.detach(), start)
    # end_warmup: k-means of the whole ring once it has wrapped around
    copy = make_vq(K, D, warmup_memory=R)
    copy.init_from_tokens(torch.stack([seen[5]] + seen[1:5]))  # (R, D) in slot order
    vq.end_warmup()
    assert torch.equal(vq.codebook.detach(), copy.codebook.detach())


def test_kmeans_init_recovers_separated_clusters():
    D = 2
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)  # (3, D)
    sizes = [7, 3, 5]
    g = torch.Generator().manual_seed(1)
    points = torch.cat([c + 0.1 * torch.randn(n, D, generator=g, dtype=torch.float64)
                        for c, n in zip(centres, sizes)])  # (15, D)
    vq = make_vq(3, D)
    got = vq.init_from_tokens(points)
    # closed form: each codeword is the mean of one cluster, each size the cluster's size
    means = torch.stack([chunk.mean(0) for chunk in points.split(sizes)])  # (3, D)
    order = [int(torch.cdist(m[None], vq.codebook.detach()).argmin()) for m in means]
    assert sorted(order) == [0, 1, 2]
    torch.testing.assert_close(vq.codebook.detach()[order], means)
    assert got[order].tolist() == sizes

    # fewer distinct tokens than codes: the codes that nothing seeds keep their value
    vq = make_vq(4, D)
    before = vq.codebook.detach().clone()
    vq.init_from_tokens(torch.tensor([[1.0, 1.0], [1.0, 1.0], [5.0, 5.0]], dtype=torch.float64))
    rows = {tuple(r) for r in vq.codebook.detach()[:2].tolist()}
    assert rows == {(1.0, 1.0), (5.0, 5.0)}
    assert torch.equal(vq.codebook.detach()[2:], before[2:])


def test_end_warmup_sets_the_kmeans_codebook_and_survives_a_checkpoint():
    K, D = 3, 2
    vq = make_vq(K, D, warmup_memory=64)
    vq.train()
    vq.set_warmup(True)
    g = torch.Generator().manual_seed(2)
    for c in ([0.0, 0.0], [8.0, 0.0], [0.0, 8.0]):
        vq(torch.tensor(c, dtype=torch.float64) + 0.1 * torch.randn(6, D, generator=g, dtype=torch.float64))
    copy = make_vq(K, D, warmup_memory=64)
    copy.load_state_dict(vq.state_dict())  # the ring travels in the state_dict
    expected_sizes = copy.init_from_tokens(vq.warmup_tokens[:18])
    initial = vq.codebook.detach().clone()
    vq.set_warmup(False)  # only the switch
    assert torch.equal(vq.codebook.detach(), initial)
    vq.end_warmup()  # k-means on the ring
    assert torch.equal(vq.codebook.detach(), copy.codebook.detach())
    assert sorted(expected_sizes.tolist()) == [6, 6, 6]
    out = vq(torch.tensor([[8.1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.quantized, vq.codebook.detach()[out.indices], rtol=0, atol=0)
    assert out.codebook_loss.item() > 0  # eq. (9) is back
    # switching the warm-up on and off again does not initialise again
    with torch.no_grad():
        vq.codebook.add_(1.0)
    moved = vq.codebook.detach().clone()
    vq.set_warmup(True)
    vq.set_warmup(False)
    assert torch.equal(vq.codebook.detach(), moved)
    # without a warm-up (--quant-warmup-steps 0, the paper's reading) end_warmup changes nothing
    plain = make_vq(K, D)
    before = plain.codebook.detach().clone()
    plain.set_warmup(False)
    plain.end_warmup()
    assert torch.equal(plain.codebook.detach(), before)


def test_valid_mask_averages_the_losses_over_valid_tokens_only():
    """valid=(...) bool: eq. (9)'s terms are the mean squared error over the valid tokens' elements,
    by an explicit loop; invalid tokens are still quantized (same indices as without a mask)."""
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 4)
    x = torch.randn(2, 3, 4)
    valid = torch.tensor([[True, False, True], [False, False, True]])
    out = vq(x, valid=valid)
    plain = vq(x)
    assert torch.equal(out.indices, plain.indices)
    e = vq.codebook.detach()
    errs = [((x[b, n] - e[out.indices[b, n]]) ** 2).mean() for b in range(2) for n in range(3) if valid[b, n]]
    expected = sum(errs) / len(errs)
    torch.testing.assert_close(out.commitment_loss, expected)
    torch.testing.assert_close(out.codebook_loss, expected)
    local = vq(x, update_codebook=False, valid=valid)
    torch.testing.assert_close(local.commitment_loss, expected)
    # in the warm-up only the valid tokens are remembered
    vq.set_warmup(True)
    vq(x, valid=valid)
    assert int(vq.warmup_seen) == int(valid.sum())
    torch.testing.assert_close(vq.warmup_tokens[:3], x[valid])
