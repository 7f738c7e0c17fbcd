"""Wiring tests: what each part of Fig. 3 actually receives inside SQD.forward.

The equation tests check each module on its own; these check what the model feeds into it. A
forward pre-hook records the arguments a module is called with, and a forward hook what another
module returned, so a test compares the two without trusting what the model reports about
itself. Each test was checked by rewiring the model on purpose (for example passing the raw
l_{i,t} to the mask decoder instead of VQ(l_{i,t})) and watching it fail.
"""
import pytest
import torch

from matcher import SetCriterion, track_batch
from sqd import SQD
from test_sqd import random_batch, tiny_cfg


class Recorder:
    """Records the positional and keyword arguments of every call of the hooked modules, and the
    outputs of the modules hooked with `output`."""

    def __init__(self):
        self.calls, self.outputs, self.handles = {}, {}, []

    def inputs(self, name, module):
        def hook(mod, args, kwargs):
            self.calls.setdefault(name, []).append((args, kwargs))
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def output(self, name, module):
        def hook(mod, args, out):
            self.outputs.setdefault(name, []).append(out)
        self.handles.append(module.register_forward_hook(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


def _model_and_batch(**cfg):
    torch.manual_seed(0)
    model = SQD(tiny_cfg(**cfg)).eval()
    return model, random_batch(B=2, T=5)


def test_mask_decoder_queries_are_the_codewords_chosen_for_the_local_tokens():
    """TrD_segm(VQ(l_{i,t}) | f_t): the queries are exactly codebook[index of l_{i,t}], not l_{i,t}."""
    model, batch = _model_and_batch()
    rec = Recorder()
    rec.inputs("mask", model.mask_decoder)
    rec.output("local", model.local_asd)
    with torch.no_grad():
        out = model(batch)
    queries = rec.calls["mask"][0][0][0]                                   # (B, T, N, C)
    B, T, N, C = queries.shape
    l = rec.outputs["local"][0].view(B, T, N, C)                            # l_{i,t}
    # the nearest codeword of each l_{i,t}, by brute force over the codebook
    e = model.vq.codebook.detach()                                    # (K, C)
    nearest = torch.cdist(l.reshape(-1, C), e).argmin(1).view(B, T, N)      # (B, T, N)
    assert torch.equal(nearest, out["indices"]["local"])
    assert torch.equal(queries, e[nearest])
    assert not torch.allclose(queries, l)


def test_avsr_filters_come_from_the_quantized_global_tokens():
    """Eq. (5)'s w_i = MLP(e_i): the filter MLP of every level reads VQ(g_i) = codebook[index]."""
    model, batch = _model_and_batch()
    rec = Recorder()
    for k, avsr in enumerate(model.avsr):
        rec.inputs(f"filters{k}", avsr.filters)
    rec.output("global", model.global_asd)
    with torch.no_grad():
        out = model(batch)
    g = rec.outputs["global"][0]                                            # (B, N, C) g_i
    e = model.vq.codebook.detach()
    nearest = torch.cdist(g.flatten(0, 1), e).argmin(1).view(g.shape[:2])   # (B, N)
    assert torch.equal(nearest, out["indices"]["global"])
    for k in range(3):
        drive = rec.calls[f"filters{k}"][0][0][0]                           # (B, N, C)
        assert torch.equal(drive, e[nearest])


def test_eq3_memory_is_the_clips_visual_tokens_and_its_queries_the_frames_audio():
    """MCA(F_a, F_v): the keys/values are every encoded visual token of every frame of the clip
    (before recombination), frame-major then level by level; the queries are F_a."""
    model, batch = _model_and_batch()
    rec = Recorder()
    rec.inputs("fusion", model.fusion)
    rec.output("visual", model.visual_encoder)
    rec.output("audio", model.audio_encoder)
    with torch.no_grad():
        model(batch)
    args, kwargs = rec.calls["fusion"][0]
    audio_q, visual_mem = args[0], args[1]
    levels = rec.outputs["visual"][0]["levels"]                             # 3 x (B, T, C, H_l, W_l)
    B, T, C = audio_q.shape
    expected = torch.stack([torch.cat([lv[b, t].flatten(1).t() for t in range(T) for lv in levels])
                            for b in range(B)])                              # (B, T*S, C)
    assert torch.equal(visual_mem, expected)
    assert torch.equal(audio_q, rec.outputs["audio"][0])                    # F_a, one token per frame


def test_eq6_memory_is_the_frames_own_audio_vector_only():
    """TrD_local(p_i | f_{a,t}): one memory token per (clip, frame), equal to that frame's F_a
    vector, with no positional embedding and nothing from the video or other frames."""
    model, batch = _model_and_batch()
    rec = Recorder()
    rec.inputs("local", model.local_asd)
    rec.output("audio", model.audio_encoder)
    with torch.no_grad():
        model(batch)
    args, kwargs = rec.calls["local"][0]
    memory = args[0]
    f_a = rec.outputs["audio"][0]                                           # (B, T, C)
    B, T, C = f_a.shape
    assert memory.shape == (B * T, 1, C)
    for b in range(B):
        for t in range(T):
            assert torch.equal(memory[b * T + t, 0], f_a[b, t])
    extra = list(args[1:]) + [v for v in kwargs.values()]
    assert all(x is None for x in extra), "eq. (6) takes no memory position or mask"
    # and the local tokens do not move when the video or another frame's audio changes
    rec.remove()
    rec = Recorder()
    rec.output("local", model.local_asd)
    other = {k: v.clone() for k, v in batch.items()}
    other["frames"] = torch.randn_like(other["frames"])
    other["audio"][:, 1:] = torch.randn_like(other["audio"][:, 1:])
    with torch.no_grad():
        model(batch)
        model(other)
    a, b = rec.outputs["local"]
    torch.testing.assert_close(a.view(2, 5, -1)[:, 0], b.view(2, 5, -1)[:, 0])


@pytest.mark.parametrize("local_only", [False, True])
def test_local_path_never_changes_the_codebook(local_only):
    """The codebook's gradient comes from eq. (9)'s first term alone: the full loss gives exactly
    the gradient of that term, and the local terms (commitment, and the mask decoder's losses
    through VQ(l_{i,t})) give none."""
    model, batch = _model_and_batch()
    model.train()
    crit = SetCriterion(model.cfg.num_classes)
    out = model(batch)
    tracks = track_batch(batch["labels"], batch["label_valid"], model.cfg.num_classes,
                         out["pred_masks"].shape[-2:])  # as train.forward_loss: at the mask resolution
    total, _ = crit(out, tracks)
    book = model.vq.codebook
    if local_only:
        grad = torch.autograd.grad(out["quant"]["quant_commit_local"], book, allow_unused=True)[0]
        assert grad is None or torch.count_nonzero(grad) == 0
        return
    (g_total,) = torch.autograd.grad(total, book, retain_graph=True)
    (g_first,) = torch.autograd.grad(crit.lambda_quant * out["quant"]["quant_codebook"], book)
    torch.testing.assert_close(g_total, g_first, rtol=1e-6, atol=1e-8)
    assert torch.count_nonzero(g_first) > 0


@pytest.mark.parametrize("slots", [False, True])
def test_slot_positions_are_the_query_positions_of_every_segm_layer(slots):
    """slot_positions: each layer of TrD_segm receives the learned (N, C) slot_pos, the same rows
    for every frame, as query positions; without the switch it receives none."""
    model, batch = _model_and_batch(slot_positions=slots)
    rec = Recorder()
    for k, layer in enumerate(model.mask_decoder.decoder.layers):
        rec.inputs(f"layer{k}", layer)
    with torch.no_grad():
        model(batch)
    B, T, N = 2, 5, model.cfg.num_tokens
    for k in range(len(model.mask_decoder.decoder.layers)):
        args, kwargs = rec.calls[f"layer{k}"][0]
        query_pos = args[2] if len(args) > 2 else kwargs.get("query_pos")    # (B*T, N, C) or None
        if not slots:
            assert query_pos is None
            continue
        pos = model.mask_decoder.slot_pos.detach()                          # (N, C)
        assert query_pos.shape == (B * T, N, model.cfg.dim)
        assert torch.equal(query_pos, pos[None].expand(B * T, N, -1))
