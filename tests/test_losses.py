"""ds_distill.losses against references: full == chunked == topk(k=V), fp64 parity, tail bucket, padding, masks."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ds_distill.losses import DIVERGENCES, chunk_layout, divergence_from_logprobs, distill_loss, token_divergence

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread hand-offs cost more than they save, badly so on a busy 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, params=["vocab_major", "token_major"])
def layout(request, monkeypatch):
    """Every test runs with both chunk layouts ("auto" is token_major; vocab_major is the loss.layout option)."""
    import ds_distill.losses as losses_mod

    real = losses_mod.chunk_layout
    monkeypatch.setattr(losses_mod, "chunk_layout",
                        lambda layout="auto": real(request.param if layout == "auto" else layout))
    return request.param


def test_chunk_layout_choice():
    real = chunk_layout  # imported before the fixture patches the module attribute
    assert real() == real("auto") == real("token_major") == "token_major"
    assert real("vocab_major") == "vocab_major"
    with pytest.raises(ValueError, match="layout="):
        real("rows")


V = 50  # real vocabulary
S_ROWS, T_ROWS = 56, 60  # padded lm_head rows differ between student and teacher (like 151,936 vs 152,064)
N, HS, HT = 37, 16, 24


def make_inputs(seed=0, dtype=torch.float32, n=N, masked_every=5):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, HS, generator=g, dtype=torch.float64)
    ws = torch.randn(S_ROWS, HS, generator=g, dtype=torch.float64) * 0.7
    ht = torch.randn(n, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(T_ROWS, HT, generator=g, dtype=torch.float64) * 0.5
    ws[V:] = 1e4  # padded rows with huge weights: must never get probability nor gradient
    wt[V:] = -1e4
    labels = torch.randint(0, V, (n,), generator=g)
    if masked_every:
        labels[::masked_every] = -100
    return [x.to(dtype) for x in (hs, ws, ht, wt)] + [labels]


def run(impl, hs, ws, ht, wt, labels, scale=0.5, **kw):
    """distill_loss + backward of scale * total; returns (LossSums, grad hidden, grad weight)."""
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    out = distill_loss(h, w, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, impl=impl, **kw)
    (scale * out.total).backward()
    return out, h.grad, w.grad


def assert_close_rel(actual, expected, rtol):
    """Element-wise closeness with the tolerance scaled to the tensor's magnitude (so tiny entries do not fail)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    atol = rtol * expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=float(atol))


CASES = [dict(temperature=1.0, alpha=0.5), dict(temperature=2.0, alpha=1.0), dict(temperature=0.7, alpha=0.2)]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("slab_rows", [None, 3])
def test_chunked_and_topk_full_vocab_equal_full(divergence, case, slab_rows, monkeypatch):
    if slab_rows:  # several element-wise slabs per chunk, the last one short (at V = 151,936 the default is 8 rows)
        import ds_distill.losses as losses_mod

        monkeypatch.setattr(losses_mod, "_SLAB_ELEMS_CPU", slab_rows * V)
        assert losses_mod.slab_rows("cpu", V) == slab_rows
    hs, ws, ht, wt, labels = make_inputs()
    kw = dict(divergence=divergence, beta=0.3, skew_lambda=0.2, **CASES[case])
    ref, gh_ref, gw_ref = run("full", hs, ws, ht, wt, labels, **kw)
    for impl, extra in (("chunked", dict(chunk_size=7)), ("chunked", dict(chunk_size=1000)),
                        ("topk", dict(chunk_size=5, top_k=V))):
        out, gh, gw = run(impl, hs, ws, ht, wt, labels, **kw, **extra)
        for name in ("total", "ce", "kd"):
            assert_close_rel(getattr(out, name), getattr(ref, name), 1e-5)
        assert out.tokens.item() == ref.tokens.item() == int((labels != -100).sum())
        assert_close_rel(gh, gh_ref, 1e-5)
        assert_close_rel(gw, gw_ref, 1e-5)
        assert gw[V:].abs().max() == 0  # padded rows: exactly zero gradient
        for k in ("agree", "teacher_entropy", "student_entropy"):
            assert_close_rel(out.metrics[k], ref.metrics[k], 1e-5)
        if impl == "topk":
            assert out.metrics["topk_mass"].item() == pytest.approx(ref.tokens.item(), rel=1e-6)


def fp64_reference(hs, ws, ht, wt, labels, divergence, alpha, temperature, beta=0.5, skew_lambda=0.1):
    """total and its gradients, everything in float64 with plain autograd."""
    h = hs.double().requires_grad_(True)
    w = ws.double().requires_grad_(True)
    keep = labels != -100
    s = h[keep] @ w[:V].T
    t = ht.double()[keep] @ wt.double()[:V].T
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)
    kd = divergence_from_logprobs(log_p, log_q, divergence, beta, skew_lambda)  # fp64 throughout
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    total = alpha * temperature ** 2 * kd.sum() + (1 - alpha) * ce
    total.backward()
    return total.detach(), h.grad, w.grad


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fp64_parity_fp32_inputs(divergence):
    hs, ws, ht, wt, labels = make_inputs(seed=1)
    kw = dict(divergence=divergence, alpha=0.6, temperature=1.5)
    ref_total, ref_gh, ref_gw = fp64_reference(hs, ws, ht, wt, labels, **kw)
    for impl in ("chunked", "full"):
        out, gh, gw = run(impl, hs, ws, ht, wt, labels, scale=1.0, chunk_size=8, **kw)
        assert rel_err(out.total, ref_total) <= 1e-5
        assert rel_err(gh, ref_gh) <= 1e-5
        assert rel_err(gw, ref_gw) <= 1e-5


@pytest.mark.parametrize("divergence,chunk_size", [("forward_kl", 8), ("reverse_kl", 8), ("jsd", 8),
                                                   ("forward_kl", 64)])  # 64: one chunk, bf16 grad written directly
def test_fp64_parity_bf16_inputs(divergence, chunk_size):
    # bf16 matmuls are emulated (slow) on CPU: tiny sizes only
    hs, ws, ht, wt, labels = make_inputs(seed=2, dtype=torch.bfloat16, n=16)
    kw = dict(divergence=divergence, alpha=0.6, temperature=1.0)
    ref_total, ref_gh, ref_gw = fp64_reference(hs, ws, ht, wt, labels, **kw)
    out, gh, gw = run("chunked", hs, ws, ht, wt, labels, scale=1.0, chunk_size=chunk_size, **kw)
    assert out.total.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert rel_err(out.total, ref_total) <= 1e-2
    assert rel_err(gh, ref_gh) <= 1e-2
    assert rel_err(gw, ref_gw) <= 1e-2


def coarse_reference(hs, ws, ht, wt, labels, k, divergence, alpha, temperature):
    """Top-k tail-bucket loss written independently: full fp64 distributions coarse-grained onto k + 1 buckets."""
    h = hs.double().requires_grad_(True)
    w = ws.double().requires_grad_(True)
    keep = labels != -100
    s = h[keep] @ w[:V].T
    t = ht.double()[keep] @ wt.double()[:V].T
    ids = t.topk(k, dim=1).indices
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t / temperature, -1)

    def coarse(lp):
        top = lp.gather(1, ids)
        rest = lp.scatter(1, ids, float("-inf")).logsumexp(1, keepdim=True)
        return torch.cat([top, rest], 1)

    kd = divergence_from_logprobs(coarse(log_p), coarse(log_q), divergence, 0.3, 0.2)
    ce = F.cross_entropy(s, labels[keep], reduction="sum")
    total = alpha * temperature ** 2 * kd.sum() + (1 - alpha) * ce
    total.backward()
    return total.detach(), kd.detach().sum(), h.grad, w.grad, log_p.detach(), ids


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_tail_bucket_matches_independent_reference(divergence, temperature):
    hs, ws, ht, wt, labels = make_inputs(seed=3)
    k = 7
    kw = dict(divergence=divergence, alpha=0.7, temperature=temperature, beta=0.3, skew_lambda=0.2)
    ref_total, ref_kd, ref_gh, ref_gw, _, _ = coarse_reference(hs, ws, ht, wt, labels, k, divergence, 0.7,
                                                               temperature)
    out, gh, gw = run("topk", hs, ws, ht, wt, labels, scale=1.0, chunk_size=6, top_k=k, **kw)
    assert rel_err(out.total, ref_total) <= 1e-5
    assert rel_err(out.kd, ref_kd) <= 1e-5
    assert rel_err(gh, ref_gh) <= 1e-5
    assert rel_err(gw, ref_gw) <= 1e-5
    assert gw[V:].abs().max() == 0
    # the coarse divergence is a lower bound of the full one (coarse-graining never increases an f-divergence)
    full, _, _ = run("full", hs, ws, ht, wt, labels, **kw)
    assert out.kd.item() <= full.kd.item() * (1 + 1e-6)


def teacher_cache(ht, wt, labels, k, temperature=1.0):
    """What an offline cache holds: the teacher's top-k ids and full-vocabulary log-probs at the loss temperature."""
    t = ht.double() @ wt.double()[:V].T
    lp = F.log_softmax(t / temperature, -1)
    vals, ids = lp.topk(k, dim=1)
    return ids, vals.float()


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_from_cache_equals_online(divergence):
    hs, ws, ht, wt, labels = make_inputs(seed=4)
    kw = dict(divergence=divergence, alpha=0.5, temperature=1.0, beta=0.3, skew_lambda=0.2, impl="topk",
              chunk_size=9)
    for k in (5, V):
        online, gh_on, gw_on = run(impl="topk", hs=hs, ws=ws, ht=ht, wt=wt, labels=labels, top_k=k,
                                   **{x: y for x, y in kw.items() if x != "impl"})
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        cached = distill_loss(h, w, labels, teacher_topk=teacher_cache(ht, wt, labels, k), vocab_size=V, **kw)
        (0.5 * cached.total).backward()
        assert_close_rel(cached.total, online.total, 1e-5)
        assert_close_rel(h.grad, gh_on, 1e-5)
        assert_close_rel(w.grad, gw_on, 1e-5)
        assert_close_rel(cached.metrics["topk_mass"], online.metrics["topk_mass"], 1e-5)
        if k == V:
            full, _, _ = run("full", hs, ws, ht, wt, labels, **{x: y for x, y in kw.items() if x != "impl"})
            assert_close_rel(cached.total, full.total, 1e-5)


@pytest.mark.parametrize("impl", ["full", "chunked", "topk"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero(impl, divergence):
    hs, ws, _, _, labels = make_inputs(seed=5)
    # the teacher IS the student (same hidden states, same weights, same padded row count)
    out, gh, gw = run(impl, hs, ws, hs, ws, labels, divergence=divergence, alpha=1.0, temperature=2.0,
                      chunk_size=8, top_k=10)
    assert abs(out.kd.item()) < 1e-5 * out.tokens.item()
    assert gh.abs().max() < 1e-5 and gw.abs().max() < 1e-5
    assert out.metrics["agree"].item() == out.tokens.item()
    assert_close_rel(out.metrics["teacher_entropy"], out.metrics["student_entropy"], 1e-5)


@pytest.mark.parametrize("impl", ["full", "chunked", "topk"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_all_masked_gives_exact_zero_and_zero_grads(impl, divergence):
    hs, ws, ht, wt, labels = make_inputs(seed=6)
    labels = torch.full_like(labels, -100)
    out, gh, gw = run(impl, hs, ws, ht, wt, labels, divergence=divergence, alpha=0.5, temperature=2.0,
                      chunk_size=8)
    for x in [out.total, out.ce, out.kd, *out.metrics.values()]:
        assert x.item() == 0.0
    assert out.tokens.item() == 0
    assert gh is not None and gw is not None  # real zero tensors: ZeRO-3 gradient hooks fire on every rank
    assert gh.abs().max() == 0 and gw.abs().max() == 0
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


@pytest.mark.parametrize("impl", ["full", "chunked", "topk"])
def test_padded_rows_get_no_probability(impl):
    hs, ws, ht, wt, labels = make_inputs(seed=7)
    kw = dict(divergence="forward_kl", alpha=0.5, temperature=1.0, chunk_size=8, top_k=V)
    padded, gh_p, gw_p = run(impl, hs, ws, ht, wt, labels, **kw)
    # the same models without any padded row: identical results (padding had no probability at all)
    unpadded, gh_u, gw_u = run(impl, hs, ws[:V].clone(), ht, wt[:V].clone(), labels, **kw)
    assert torch.isfinite(padded.total)
    assert_close_rel(padded.total, unpadded.total, 1e-6)
    assert_close_rel(gh_p, gh_u, 1e-6)
    assert_close_rel(gw_p[:V], gw_u, 1e-6)
    assert gw_p[V:].abs().max() == 0
    # zero-padding (what Liger does) would be different: padded ids would get probability
    zero_pad = ws.clone()
    zero_pad[V:] = 0
    s = hs @ zero_pad.T
    assert F.softmax(s, -1)[:, V:].sum() > 0


@pytest.mark.parametrize("impl", ["full", "chunked", "topk"])
def test_alpha_zero_is_cross_entropy(impl):
    hs, ws, _, _, labels = make_inputs(seed=8)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    out = distill_loss(h, w, labels, vocab_size=V, alpha=0.0, impl=impl, chunk_size=6)  # no teacher at all
    out.total.backward()
    h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = F.cross_entropy(h2 @ w2[:V].T, labels, ignore_index=-100, reduction="sum")
    ref.backward()
    assert_close_rel(out.total, ref.detach(), 1e-6)
    assert_close_rel(out.ce, ref.detach(), 1e-6)
    assert out.kd.item() == 0.0
    assert_close_rel(h.grad, h2.grad, 1e-5)
    assert_close_rel(w.grad, w2.grad, 1e-5)
    assert set(out.metrics) == {"student_entropy"}
    log_q = F.log_softmax(hs[labels != -100] @ ws[:V].T, -1)
    assert_close_rel(out.metrics["student_entropy"], -(log_q.exp() * log_q).sum(), 1e-5)


def test_sums_split_over_micro_batches_add_up():
    # the trainer divides by the global token count once: sums of two halves must equal the sum of the whole
    hs, ws, ht, wt, labels = make_inputs(seed=9)
    kw = dict(divergence="jsd", alpha=0.5, temperature=2.0, chunk_size=5)
    whole, gh, gw = run("chunked", hs, ws, ht, wt, labels, **kw)
    a, gh_a, gw_a = run("chunked", hs[:20], ws, ht[:20], wt, labels[:20], **kw)
    b, gh_b, gw_b = run("chunked", hs[20:], ws, ht[20:], wt, labels[20:], **kw)
    assert_close_rel(a.total + b.total, whole.total, 1e-6)
    assert a.tokens + b.tokens == whole.tokens
    assert_close_rel(torch.cat([gh_a, gh_b]), gh, 1e-6)
    assert_close_rel(gw_a + gw_b, gw, 1e-5)


def test_no_grad_call_and_errors():
    hs, ws, ht, wt, labels = make_inputs(seed=10)
    with torch.no_grad():
        out = distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=0.5)
    ref, _, _ = run("full", hs, ws, ht, wt, labels, alpha=0.5)
    assert_close_rel(out.total, ref.total, 1e-5)
    bad = labels.clone()
    bad[1] = V  # a padded id as a label
    with pytest.raises(ValueError, match="labels"):
        distill_loss(hs, ws, bad, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=0.5)
    with pytest.raises(ValueError, match="teacher"):
        distill_loss(hs, ws, labels, vocab_size=V, alpha=0.5)
    with pytest.raises(ValueError, match="divergence"):
        distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=0.5,
                     divergence="kl")


def test_jsd_beta_endpoints_and_skew_limits():
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(6, 30, generator=g, dtype=torch.float64), torch.randn(6, 30, generator=g, dtype=torch.float64)
    fkl = token_divergence(s, t, "forward_kl")
    rkl = token_divergence(s, t, "reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), rkl)
    # near the ends the interpolation behaves like beta * forward KL / (1 - beta) * reverse KL (TRL / Liger)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1e-4) / 1e-4, fkl, rtol=2e-3, atol=0)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1 - 1e-4) / 1e-4, rkl, rtol=2e-3, atol=0)
    torch.testing.assert_close(token_divergence(s, t, "skew_forward_kl", skew_lambda=0.0), fkl)
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", skew_lambda=0.0), rkl)
    assert token_divergence(s, t, "skew_forward_kl", skew_lambda=1.0).abs().max() == 0
    # skew KL by its definition: KL(p || lam p + (1 - lam) q)
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = 0.1 * p + 0.9 * q
    torch.testing.assert_close(token_divergence(s, t, "skew_forward_kl", skew_lambda=0.1),
                               (p * (p.log() - m.log())).sum(-1))
    m = 0.1 * q + 0.9 * p
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", skew_lambda=0.1),
                               (q * (q.log() - m.log())).sum(-1))
    torch.testing.assert_close(token_divergence(s, t, "tv"), 0.5 * (p - q).abs().sum(-1))


class Seed000ChunkedLoss(nn.Module):
    """The seed tutorial's `DistillationLossWithChunk` (seeds/000), KD part: one softmax PER VOCABULARY SLICE.

    Kept here only to prove it wrong; never bring it back into the package.
    """

    def __init__(self, temperature=1.0, num_chunks=4):
        super().__init__()
        self.temperature, self.num_chunks = temperature, num_chunks
        self.kl_loss = nn.KLDivLoss(reduction="batchmean")

    def forward(self, student_logits, teacher_logits):
        T, vocab = self.temperature, student_logits.size(-1)
        total = 0.0
        for s_chunk, t_chunk in zip(torch.chunk(student_logits, self.num_chunks, dim=-1),
                                    torch.chunk(teacher_logits, self.num_chunks, dim=-1)):
            soft_t = torch.softmax(t_chunk / T, dim=-1)
            log_s = torch.log_softmax(s_chunk / T, dim=-1)
            total += self.kl_loss(log_s, soft_t) * (T * T) * (s_chunk.size(-1) / vocab)
        return total


def test_seed000_vocabulary_sliced_loss_is_not_the_kl():
    hs, ws, ht, wt, labels = make_inputs(seed=12, masked_every=0)
    s, t = hs @ ws[:V].T, ht @ wt[:V].T
    true_kl = token_divergence(s, t, "forward_kl").mean()
    sliced = Seed000ChunkedLoss(num_chunks=4)(s, t)
    assert abs(sliced.item() - true_kl.item()) > 0.1 * true_kl.item()  # biased, far beyond rounding
    ours = distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, vocab_size=V, alpha=1.0,
                        impl="chunked", chunk_size=8)
    assert_close_rel(ours.kd / ours.tokens, true_kl, 1e-5)  # token chunks, full-vocabulary softmax: exact
    # with one slice the seed's loss is the KL: the bias comes from slicing the softmax, nothing else
    assert_close_rel(Seed000ChunkedLoss(num_chunks=1)(s, t), true_kl, 1e-5)


def test_jsd_small_beta_gradient_matches_fp64():
    """The chunked JSD takes log m as a log-sum-exp of the two log-probs and its KLs as dot products of log-ratios:
    at beta 1e-4 (m is almost q) the mixture of probabilities lost the beta * p term and the KLs cancelled between
    two terms of size log V (gradient error 1.2e-3 here, 2.4e-5 at beta 0.01)."""
    hs, ws, ht, wt, labels = make_inputs(seed=1)
    for beta, tol in ((1e-4, 6e-4), (1e-2, 1e-5)):
        kw = dict(divergence="jsd", alpha=1.0, temperature=1.0, beta=beta)
        ref_total, ref_gh, ref_gw = fp64_reference(hs, ws, ht, wt, labels, **kw)
        out, gh, gw = run("chunked", hs, ws, ht, wt, labels, scale=1.0, chunk_size=8, **kw)
        assert rel_err(out.total, ref_total) <= tol / 10, beta
        assert rel_err(gh, ref_gh) <= tol, (beta, rel_err(gh, ref_gh))
        assert rel_err(gw, ref_gw) <= tol, (beta, rel_err(gw, ref_gw))


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_topk_from_cache_at_temperature_2_equals_online(divergence):
    """A cache written at T = 2 (top-k log-probs at T, tail = 1 - their mass) gives online top-k's loss at T = 2.
    (A T = 1 cache tempered afterwards cannot: the tail's mass at T depends on tokens it dropped.)"""
    hs, ws, ht, wt, labels = make_inputs(seed=6)
    kw = dict(divergence=divergence, alpha=0.5, temperature=2.0, beta=0.3, chunk_size=9)
    online, gh_on, gw_on = run("topk", hs, ws, ht, wt, labels, top_k=5, **kw)
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    cached = distill_loss(h, w, labels, teacher_topk=teacher_cache(ht, wt, labels, 5, temperature=2.0),
                          vocab_size=V, impl="topk", **kw)
    (0.5 * cached.total).backward()
    assert_close_rel(cached.total, online.total, 1e-5)
    assert_close_rel(cached.kd, online.kd, 1e-5)
    assert_close_rel(h.grad, gh_on, 1e-5)
    assert_close_rel(w.grad, gw_on, 1e-5)


def test_gemm_width_rounds_up_within_the_lm_head_rows():
    from ds_distill.losses import gemm_width

    w = torch.empty(151936, 1)
    assert gemm_width(151669, w, w) == 151680  # Qwen3's tokenizer length -> a multiple of 64
    assert gemm_width(151669, torch.empty(151669, 1)) == 151669  # no padded rows: nothing to add
    assert gemm_width(151669, w, torch.empty(151672, 1)) == 151672  # the smaller lm_head bounds it
    assert gemm_width(151669, w, None) == 151680  # CE only / cached teacher: no teacher weight
    assert gemm_width(V, torch.empty(S_ROWS, 1), torch.empty(T_ROWS, 1)) == S_ROWS  # what the tests here use


@pytest.mark.parametrize("impl", ["chunked", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_width_gemms_equal_real_width(impl, dtype, monkeypatch):
    """The logits GEMMs over the padded width (columns >= V masked) give today's losses and gradients: the padded
    columns never reach a distribution and get exactly zero gradient."""
    import ds_distill.losses as losses_mod

    hs, ws, ht, wt, labels = make_inputs(dtype=dtype)
    kw = dict(alpha=0.5, temperature=2.0, chunk_size=16, top_k=7)
    assert losses_mod.gemm_width(V, ws, wt) == S_ROWS > V
    padded = run(impl, hs, ws, ht, wt, labels, **kw)
    monkeypatch.setattr(losses_mod, "GEMM_WIDTH_MULTIPLE", 1)  # GEMMs over exactly V rows, as before
    assert losses_mod.gemm_width(V, ws, wt) == V
    real = run(impl, hs, ws, ht, wt, labels, **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for a, b in ((padded[0].total.detach(), real[0].total.detach()), (padded[0].ce, real[0].ce),
                 (padded[0].kd, real[0].kd)):
        assert abs(float(a) - float(b)) <= tol * abs(float(b)), (float(a), float(b))
    assert_close_rel(padded[1], real[1], tol)
    assert_close_rel(padded[2], real[2], tol)
    assert padded[2][V:].abs().max() == 0 and real[2][V:].abs().max() == 0


def test_mm_fp32_returns_fp32_logits():
    from ds_distill.losses import mm_fp32

    a, b = torch.randn(4, 8), torch.randn(8, 3)
    torch.testing.assert_close(mm_fp32(a, b), a @ b)
    ab = mm_fp32(a.bfloat16(), b.bfloat16())  # exact bf16 products summed in fp32, not rounded to bf16
    assert ab.dtype == torch.float32
    torch.testing.assert_close(ab, a.bfloat16().float() @ b.bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_writer_topk_uses_the_loss_gemm_and_ignores_padded_rows(dtype):
    """teacher_cache.topk_logprobs (the offline cache writer): the padded-width fp32-accumulating GEMM gives the
    top-k of an fp64 softmax over the real vocabulary (the padded rows' huge logits never show up)."""
    from ds_distill.teacher_cache import topk_logprobs

    _, _, ht, wt, _ = make_inputs(dtype=dtype)
    ids, lps = topk_logprobs(ht, wt, vocab_size=V, k=5, temperature=2.0, chunk_size=16)
    ref = torch.log_softmax((ht.double() @ wt.double()[:V].T) / 2.0, dim=1)
    assert int(ids.max()) < V
    torch.testing.assert_close(lps.double(), ref.gather(1, ids.long()), rtol=0, atol=1e-5)
    assert torch.equal(ref.topk(5, dim=1).values, ref.gather(1, ids.long()))
