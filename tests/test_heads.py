"""Model heads (ds_distill.heads) inside every loss path: bias + scale + softcap, in fp64 against an autograd
reference built from the transformed logits, gradients included; the family table against HF forwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_distill import heads
from ds_distill.heads import HeadTransform
from ds_distill.losses import distill_loss, token_divergence

V, S_ROWS, T_ROWS, N, HS, HT = 40, 44, 48, 29, 12, 20

TRANSFORMS = {
    "plain": HeadTransform(),
    "scale": HeadTransform(scale=4.0),  # Cohere-like
    "divide": HeadTransform(scale=1 / 3.0),  # Granite-like
    "softcap": HeadTransform(softcap=3.0),  # Gemma-2-like: the logits below reach about +-15, the cap bites
    "scale+softcap": HeadTransform(scale=2.0, softcap=5.0),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64) * 2
    ws = torch.randn(S_ROWS, HS, generator=g, dtype=torch.float64)
    bs = torch.randn(S_ROWS, generator=g, dtype=torch.float64)
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64) * 2
    wt = torch.randn(T_ROWS, HT, generator=g, dtype=torch.float64)
    bt = torch.randn(T_ROWS, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return hs, ws, bs, ht, wt, bt, labels


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _reference(hs, ws, bs, ht, wt, bt, labels, st, tt, alpha, T, divergence):
    """total from the models' own logits, written out with autograd: transform(h @ W^T + b) sliced to V."""
    keep = labels != -100
    s = st(hs[keep] @ ws[:V].T + (bs[:V] if bs is not None else 0))
    t = tt(ht[keep] @ wt[:V].T + (bt[:V] if bt is not None else 0))
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    kd = token_divergence(s, t, divergence, T).sum()
    return alpha * T * T * kd + (1 - alpha) * ce, ce, kd


@pytest.mark.parametrize("impl", ["full", "chunked", "topk"])
@pytest.mark.parametrize("pair", [("plain", "softcap"), ("softcap", "scale"), ("divide", "scale+softcap"),
                                  ("scale+softcap", "plain")])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["token_major", "vocab_major"])
def test_transformed_heads_equal_reference_fp64(impl, pair, bias, layout, monkeypatch):
    import ds_distill.losses as losses_mod

    monkeypatch.setattr(losses_mod, "slab_rows", lambda dev, v: 5)  # several slabs per chunk
    hs, ws, bs, ht, wt, bt, labels = _inputs()
    if not bias:
        bs = bt = None
    st, tt = TRANSFORMS[pair[0]], TRANSFORMS[pair[1]]
    for alpha, T, div in ((0.5, 1.0, "forward_kl"), (1.0, 2.0, "reverse_kl"), (0.3, 0.7, "jsd"), (0.0, 1.0, "tv")):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        b = bs.clone().requires_grad_(True) if bias else None
        out = distill_loss(h, w, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=alpha,
                           temperature=T, divergence=div, impl=impl, chunk_size=7, top_k=V, layout=layout,
                           student_bias=b, teacher_bias=bt, student_transform=st, teacher_transform=tt)
        (0.5 * out.total).backward()
        h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        b2 = bs.clone().requires_grad_(True) if bias else None
        ref, ce, kd = _reference(h2, w2, b2, ht, wt, bt, labels, st, tt, alpha, T, div)
        (0.5 * ref).backward()
        # the fused impls do their softmax math in fp32 whatever the inputs (losses.py): 1e-5 relative, as
        # test_losses' fp64 parity; a missing transform derivative or bias term is off by O(1)
        assert rel_err(out.total, ref) <= 1e-5 and rel_err(out.ce, ce) <= 1e-5
        if alpha > 0:
            assert rel_err(out.kd, kd) <= 1e-5
        assert rel_err(h.grad, h2.grad) <= 1e-5 and rel_err(w.grad, w2.grad) <= 1e-5
        if bias:
            assert rel_err(b.grad, b2.grad) <= 1e-5
            assert b.grad[V:].abs().max() == 0  # padded rows never take part


def test_transform_changes_the_numbers():
    """The fixture above must make the transforms matter (else the test above would pass for a plain head)."""
    hs, ws, bs, ht, wt, bt, labels = _inputs()
    plain = distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=0.5)
    for name in ("softcap", "scale", "divide"):
        o = distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=0.5,
                         student_transform=TRANSFORMS[name], teacher_transform=TRANSFORMS[name])
        assert abs(float(o.ce) - float(plain.ce)) > 0.05 * float(plain.ce), name


def test_head_transform_values():
    x = torch.tensor([-100.0, -1.0, 0.0, 2.0, 100.0], dtype=torch.float64)
    z = HeadTransform(scale=0.5, softcap=3.0)(x)
    torch.testing.assert_close(z, 3.0 * torch.tanh(0.5 * x / 3.0))
    y, d = x.clone() * 0.5, torch.empty_like(x)
    heads.softcap_(y, 3.0, d)
    torch.testing.assert_close(y, z)
    torch.testing.assert_close(d, 1 - torch.tanh(0.5 * x / 3.0) ** 2)
    with pytest.raises(ValueError):
        HeadTransform(softcap=0.0)


def test_family_table_matches_hf_forward():
    """transform_of + the lm_head equals each tested family's own HF forward on a tiny random model (CPU, fp32)."""
    from tests.scripts.family_driver import build_model

    for family in heads.TESTED:
        torch.manual_seed(0)
        model = build_model(family, role="teacher").eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 9))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            hidden = base.get_decoder()(input_ids=ids).last_hidden_state
            ours = heads.of_model(model).logits(hidden)
            plain = hidden @ model.get_output_embeddings().weight.T
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=family)
        if family in ("gemma2", "gemma3_text", "cohere", "granite"):  # the fixture makes the transform bite
            assert (plain - ref).abs().max() > 0.1 * ref.abs().max(), family


def test_moe_aux_equals_hf_and_moe_blocks_become_zero3_leaves():
    """MoeAux (what the student wrapper adds) equals the HF forward's aux_loss; MoE blocks are marked as ZeRO-3
    leaves, dense models get none."""
    from ds_distill import engines
    from ds_distill.models import MoeAux
    from tests.scripts.family_driver import build_model

    moe = build_model("qwen3_moe", role="student").eval()
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is excluded by the mask, as in the HF forward
    with torch.no_grad():
        ref = moe(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
        out = moe.get_decoder()(input_ids=ids, attention_mask=mask, output_router_logits=True)
        ours = MoeAux.of(moe)(out.router_logits, mask)
    torch.testing.assert_close(ours, ref)
    assert MoeAux.of(moe).coef == 0.1 and MoeAux.of(build_model("qwen3", role="student")) is None
    assert engines.mark_moe_leaves(moe) == ["Qwen3MoeSparseMoeBlock"]
    assert all(getattr(m, "_z3_leaf", False) == (type(m).__name__ == "Qwen3MoeSparseMoeBlock")
               for m in moe.modules())
    assert engines.mark_moe_leaves(build_model("llama", role="student")) == []
