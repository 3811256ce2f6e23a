"""The chunked loss with its element-wise slab math compiled (loss.compile) against the eager path and fp64.

Compiling costs seconds per specialisation on CPU: the tests share one specialisation per (divergence, T), and
each runs both layouts, several slabs per chunk (the last one short) and the padded GEMM width through it.
"""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import ds_distill.losses as losses_mod
from ds_distill.heads import HeadTransform
from ds_distill.losses import COMPILED_SLAB_TEMPS, DIVERGENCES, CompiledLossError, distill_loss

V = 50  # real vocabulary; lm_heads of 56 and 60 rows: the GEMMs run 56 columns wide, the slabs see 50 of them
S_ROWS, T_ROWS = 56, 60
N, HS, HT = 29, 16, 24
STUDENT_HEAD, TEACHER_HEAD = HeadTransform(softcap=4.0), HeadTransform(scale=0.8, softcap=6.0)
COMMON = dict(vocab_size=V, alpha=0.6, beta=0.3, skew_lambda=0.2, impl="chunked", chunk_size=11,
              student_transform=STUDENT_HEAD, teacher_transform=TEACHER_HEAD)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64)
    ws = torch.randn(S_ROWS, HS, generator=g, dtype=torch.float64) * 0.9
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(T_ROWS, HT, generator=g, dtype=torch.float64) * 0.8
    ws[V:] = 1e4  # padded rows: never part of a distribution, zero gradient
    wt[V:] = -1e4
    bs = torch.randn(S_ROWS, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::6] = -100
    return [x.to(dtype) for x in (hs, ws, ht, wt, bs)] + [labels]


def run(inputs, **kw):
    hs, ws, ht, wt, bs, labels = inputs
    h, w, b = (x.clone().requires_grad_(True) for x in (hs, ws, bs))
    out = distill_loss(h, w, labels, teacher_hidden=ht, teacher_weight=wt, student_bias=b, **{**COMMON, **kw})
    (0.5 * out.total).backward()
    return out, (h.grad, w.grad, b.grad)


def assert_close_rel(actual, expected, rtol):
    """Closeness with the tolerance scaled to the tensor's largest magnitude."""
    actual, expected = actual.detach().double(), expected.detach().double()
    atol = rtol * expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=float(atol))


@pytest.fixture
def three_row_slabs(monkeypatch):
    """Several slabs per chunk of 11 rows (3 + 3 + 3 + 2): the compiled function sees varying row counts."""
    monkeypatch.setattr(losses_mod, "_SLAB_ELEMS_CPU", 3 * V)
    assert losses_mod.slab_rows("cpu", V) == 3


VOCAB_MAJOR_CASES = (("forward_kl", 1.0),)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_compiled_equals_eager_and_fp64(divergence, temperature, three_row_slabs):
    inputs = make_inputs()
    kw = dict(divergence=divergence, temperature=temperature)
    # vocab_major's contiguous slab rows are a second compile (a row stride of V instead of the GEMM width): one
    # case only
    layouts = ("token_major", "vocab_major") if (divergence, temperature) in VOCAB_MAJOR_CASES else ("token_major",)
    for layout in layouts:
        eager, g_eager = run(inputs, layout=layout, **kw)
        # the first compiled call of this specialisation compiles it: its generated code is kept to count buffers
        (fused, g_fused), codes = run_and_get_code(run, inputs, layout=layout, compiled=True, **kw)
        if layout == "token_major":
            assert len(codes) == 1, "one compile per specialisation, shared by every slab size"
            # [rows, V] buffers inductor allocates (2-D, not [rows, 1]): what the planner counts per slab
            allocs = re.findall(r"buf\d+ = empty_strided_cpu\(\(([^)]*)\)", codes[0])
            big = [a for a in allocs if len([d for d in a.split(",") if d.strip()]) == 2
                   and a.split(",")[1].strip() != "1"]
            assert 1 <= len(big) <= COMPILED_SLAB_TEMPS, big
        for name in ("total", "ce", "kd"):
            assert_close_rel(getattr(fused, name), getattr(eager, name), 1e-6)
        for k in eager.metrics:
            assert_close_rel(fused.metrics[k], eager.metrics[k], 1e-6)
        for gf, ge in zip(g_fused, g_eager):
            assert_close_rel(gf, ge, 1e-6)
        assert g_fused[1][V:].abs().max() == 0 and g_fused[2][V:].abs().max() == 0  # padded rows
    # fp64 reference: the same loss through impl=full on fp64 inputs (plain autograd through the heads)
    hs, ws, ht, wt, bs, labels = make_inputs(torch.float64)
    h, w, b = (x.clone().requires_grad_(True) for x in (hs, ws, bs))
    ref = distill_loss(h, w, labels, teacher_hidden=ht, teacher_weight=wt, student_bias=b,
                       **{**COMMON, "impl": "full"}, **kw)
    (0.5 * ref.total).backward()
    for name in ("total", "ce", "kd"):
        assert_close_rel(getattr(fused, name), getattr(ref, name), 1e-5)
    for gf, gr in zip(g_fused, (h.grad, w.grad, b.grad)):
        assert_close_rel(gf, gr, 1e-5)


def test_compile_choice_and_a_failing_compiler():
    """loss.compile resolved per device, and a compiler that cannot run stops the run naming the key (exit 2)."""
    from ds_distill.config import LossConfig
    from ds_distill.errors import DistillError
    from ds_distill.losses import compile_choice
    from ds_distill.trainer import compiled_loss

    assert compile_choice("auto", "cpu") == (False, "auto: off on cpu")
    assert compile_choice(True, "cpu")[0] and compile_choice("on", "cpu")[0]
    assert not compile_choice(False, "cuda")[0] and not compile_choice("off", "cuda")[0]
    with pytest.raises(ValueError, match="compile="):
        compile_choice("maybe", "cpu")

    class Cfg:  # what compiled_loss reads
        loss = LossConfig(alpha=0.55, compile=True)

    kwargs = dict(vocab_size=V, alpha=0.55, temperature=1.0, divergence="forward_kl", impl="chunked",
                  chunk_size=64, layout="auto")
    Cfg.loss.compile = "auto"
    assert compiled_loss(Cfg, kwargs, torch.device("cpu")) == (False, "loss element-wise part: eager (loss.compile: "
                                                                      "auto: off on cpu)")
    Cfg.loss.compile = True
    # a specialisation no other test compiles (alpha 0.55), with a C++ compiler that does not exist
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(DistillError, match=r"loss.compile: True: the compiled loss .* failed(.|\n)*/nonexistent/c++"
                                               r"(.|\n)*-> run the eager path instead \(loss.compile: off"):
            compiled_loss(Cfg, kwargs, torch.device("cpu"))
        with pytest.raises(CompiledLossError):  # never a silent fall back to the eager path
            run(make_inputs(), compiled=True, alpha=0.55, divergence="forward_kl", temperature=1.0)
    # with a working compiler: compiled, and checked against the eager path at start-up (the specialisation of the
    # forward_kl / T = 1 case above: no second compile when the whole file runs)
    Cfg.loss.alpha = 0.6
    on, message = compiled_loss(Cfg, {**COMMON, "divergence": "forward_kl", "temperature": 1.0}, torch.device("cpu"))
    assert on and message.startswith("loss element-wise part: compiled with torch.compile (loss.compile: on;"), message
