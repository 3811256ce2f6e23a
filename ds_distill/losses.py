"""Distillation losses over large vocabularies: exact, memory-bounded, pure tensor code.

No deepspeed, no torch.distributed, no config import: the trainer passes flat arguments and divides the returned
SUMS by its global token count once per step (so gradient accumulation and data parallelism are exact).

Conventions
-----------
p is the teacher, q the student, both over the REAL vocabulary [0, vocab_size) at temperature T:
``p = softmax(teacher_logits / T)``, ``q = softmax(student_logits / T)``. lm_head rows >= vocab_size are padding
(Qwen pads 151,665 tokens to 151,936 or 152,064 rows): they are sliced off before any softmax, so they never get
probability in either model and their weight rows get exactly zero gradient. They are never zero-padded (a zero
logit would receive mass).

Per valid token (labels != -100)::

    total = alpha * T**2 * D(p_T, q_T) + (1 - alpha) * CE(q_1, label)

T^2 convention (Hinton et al., 2015): the gradient of D w.r.t. the logits shrinks like 1/T (and like 1/T^2 for
T >> logit spread), so the KD term is multiplied by T^2 to keep its weight comparable across temperatures. The
temperature applies to both distributions in D; CE always uses T = 1. ``LossSums.kd`` is the raw divergence
(no T^2), ``LossSums.total`` includes it.

Divergences (``divergence=``), sums over the real vocabulary:

- ``forward_kl``       KL(p || q)
- ``reverse_kl``       KL(q || p)
- ``jsd``              generalised JSD of GKD (Agarwal et al., 2024), exactly as TRL's GKDTrainer and Liger's JSD:
  beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q. It behaves like beta * KL(p||q)
  near beta = 0 and like (1 - beta) * KL(q||p) near beta = 1 (it vanishes at both ends), so, like TRL and Liger,
  beta = 0 is defined as exactly forward_kl and beta = 1 as exactly reverse_kl. beta = 0.5 is the symmetric JSD.
- ``skew_forward_kl``  KL(p || lam * p + (1 - lam) * q)  (DistiLLM, lam = skew_lambda; lam = 0 is forward_kl)
- ``skew_reverse_kl``  KL(q || lam * q + (1 - lam) * p)  (lam = 0 is reverse_kl)
- ``tv``               0.5 * sum |p - q| (subgradient 0 where p == q)

Implementations (``impl=``)
---------------------------
- ``full``: materialises the [N, V] logits of both models and differentiates `token_divergence` with autograd.
  The reference for tests and small vocabularies; memory O(N * V).
- ``chunked``: exact. A torch.autograd.Function walks the tokens in chunks of ``chunk_size`` rows (never vocabulary
  slices: every softmax is over the whole vocabulary). Per chunk, two GEMMs give the [c, V] student and teacher
  logits (in the inputs' dtype, then fp32); softmax statistics, the loss and the exact gradient of ``total`` w.r.t.
  the student logits are computed in fp32, in place, a few rows at a time; two more GEMMs turn that gradient into
  the hidden-state rows' gradient and accumulate the lm_head gradient. Gradients are therefore computed DURING
  forward (as Liger's fused linear losses do) and backward only multiplies them by grad_output: under ZeRO-3 the
  lm_head is gathered only around the module's forward, and no [N, V] tensor lives until backward.
  Working memory: two [c, V] fp32 buffers (plus a bf16 copy of one for bf16 matmuls), six [8, V] temporaries
  (CPU; [128, V] on GPU), the lm_head gradient [V_rows, H] (fp32 accumulator when bf16 and more than one chunk)
  and the hidden gradient [N, H]. No tensor larger than c x V exists.
  ``compiled=True`` runs each dense slab's element-wise part (softcaps, statistics, divergence, logit gradient) as
  one torch.compile'd function (`compiled_slabs`, `_dense_slab_math`: the eager formulas written out of place)
  instead of `_dense_slab`'s in-place ops; the eager path stays the reference (tests/test_compiled_loss.py).
- ``topk``: the teacher keeps its top ``top_k`` tokens per position, computed chunked from the teacher hidden states
  (the teacher's [c, V] logits exist one chunk at a time) or read from an offline cache (``teacher_topk``: ids and
  full-vocabulary-normalised log-probs at the loss temperature T, then the teacher needs no logits at all).

  Remaining mass: a TAIL BUCKET, not renormalisation. Both distributions are coarse-grained onto k + 1 categories:
  the k teacher tokens and one bucket holding everything else, p_tail = 1 - sum_k p and q_tail = 1 - sum_k q. The
  student's probabilities are exact (its logsumexp is over the full vocabulary, and q_tail is computed as the
  logsumexp of its non-top-k logits, not as 1 - sum), and the chosen divergence is evaluated on the two
  (k + 1)-category distributions. Why: it works for every divergence (renormalising the teacher makes reverse KL,
  JSD and TV undefined or biased because p would be 0 where q is not), it is a lower bound of the full divergence
  (coarse-graining never increases an f-divergence) that tightens as k grows, it equals ``full`` when k = V, and
  its gradient still pushes the student's tail mass towards the teacher's. A cache holds log-probs already at the
  training temperature (its tail mass at T is 1 - sum of them, exact): a T = 1 top-k cannot give the tail at
  another T, so the trainer refuses a cache written at another temperature. A cache whose top-k sums to >= 1 after
  rounding gets p_tail = float32 tiny when k < V.

Masked tokens (labels == -100) are dropped before any matmul (one host sync per call), so prompt tokens cost
nothing, and an all-masked call returns exact zero sums with zero gradients, still delivered as real tensors to
every input that requires grad (so ZeRO-3's per-parameter gradient hooks fire on every rank).

KD health metrics (detached fp32 sums over valid tokens, cheap by-products of the same pass): ``agree`` (teacher
argmax == student argmax; ties broken by the maximum shared position), ``teacher_entropy`` and
``student_entropy`` (of p_T and q_T; in topk mode of the (k + 1)-category distributions; with alpha = 0
only the student's, at T = 1), ``topk_mass`` (topk
only: sum_k p_T, the teacher mass the top-k covers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .heads import IDENTITY, HeadTransform, softcap_

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
IMPLS = ("full", "chunked", "topk")
IGNORE_INDEX = -100
# KD health: sums over the trained tokens (top-1 agreement, both entropies, the cached top-k's mass), as kd/<name>
HEALTH_METRICS = ("agree", "teacher_entropy", "student_entropy", "topk_mass")
_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny
# Elements (rows x V) processed together by the element-wise part of the chunked passes. On CPU, 8 rows x 151,936
# fp32 = 4.9 MB per temporary keeps a slab's working set in L3, so the ~15 element-wise passes after each GEMM cost
# L3, not DRAM, bandwidth. On GPU, larger slabs amortise kernel launches. Sized in elements, not rows: at a small
# vocabulary a fixed 8 rows would mean hundreds of slabs per chunk, each paying ~50 ops' dispatch overhead (on a
# 1000-token vocabulary that overhead was ~20% of a whole training step).
_SLAB_ELEMS_CPU = 8 * 151936
_SLAB_ELEMS_GPU = 128 * 151936
LAYOUTS = ("auto", "token_major", "vocab_major")


def chunk_layout(layout: str = "auto") -> str:
    """The memory layout of a chunk's [c, V] logits: "token_major" ([c, V], rows are tokens) or "vocab_major"
    ([V, c], the logits GEMM written as lm_head @ hidden^T).

    "auto" is token_major on every device: no copies, the element-wise slabs work in place on the logits' rows.
    vocab_major (loss.layout) is a CPU option: there the [V, H] x [H, c] GEMM can run faster than [c, H] x [H, V]
    and, at c <= 128, MKL does not keep a chunk-sized buffer for it, but every slab's token columns must be copied
    into contiguous rows and the gradient written back. Which wins depends on the CPU and the model's hidden size
    (measurements on two machines disagreed: docs/BENCHMARKS.md, "KD loss"), so auto stays with the simpler layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if layout != "auto":
        return layout
    return "token_major"


# [slab, V] fp32 buffers the compiled slab function allocates per call: the most over every divergence and T,
# softcapped (jsd and skew_reverse_kl at T != 1), in inductor's CPU code, counted by tests/test_compiled_loss.py;
# the same as the eager path's six. Triton's code is not counted here (no GPU): gpu_check measures peak memory.
COMPILED_SLAB_TEMPS = 6


def _workspace_rows(layout: str, compiled: bool) -> int:
    """[slab, V] fp32 rows preallocated per call: the eager math's six (none when compiled: inductor allocates its
    own), plus, in vocab_major, the slab's student and teacher rows and a staging block for the transposing copies."""
    return (0 if compiled else 6) + (3 if chunk_layout(layout) == "vocab_major" else 0)


def slab_temps(layout: str = "auto", compiled: bool = False) -> int:
    """[slab, V] fp32 temporaries the chunked passes hold at once (the planner counts the same): the preallocated
    workspace plus, compiled, what the compiled function allocates inside (`COMPILED_SLAB_TEMPS`). A softcapped
    student adds one more on the eager path (its derivative), counted by the caller."""
    return _workspace_rows(layout, compiled) + (COMPILED_SLAB_TEMPS if compiled else 0)


GEMM_WIDTH_MULTIPLE = 64


def gemm_width(vocab_size: int, *weights: Tensor | None) -> int:
    """Rows of the lm_heads the logits GEMMs use: the real vocabulary rounded up to a multiple of 64 (151,669 ->
    151,680), within the rows every weight has. An odd width (Qwen3's tokenizer: 151,669) gives logits rows that
    are not 16-byte aligned, which sends cuBLAS to slower kernels; the extra columns are padding (never part of a
    distribution: the element-wise part reads the first vocab_size columns only, and their gradient is zero)."""
    rows = min([w.shape[0] for w in weights if w is not None] or [vocab_size])
    return max(vocab_size, min(-(-vocab_size // GEMM_WIDTH_MULTIPLE) * GEMM_WIDTH_MULTIPLE, rows))


_MM_OUT_DTYPE: dict = {}  # (device type, dtype) -> whether torch.mm(..., out_dtype=float32) runs there


def mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b as fp32. For bf16 / fp16 operands the fp32 accumulator is kept instead of rounding the logits to bf16
    before the softmax: torch's mm with an fp32 output on accelerators (no fp32 copy of an lm_head), on the CPU (which
    lacks it) the same math by upcasting the operands; an accelerator without it rounds the product, then converts."""
    if a.dtype in (torch.bfloat16, torch.float16):
        if a.device.type == "cpu":
            return torch.mm(a.float(), b.float())
        key = (a.device.type, a.dtype)
        if _MM_OUT_DTYPE.get(key, True):
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                _MM_OUT_DTYPE[key] = False
    return torch.mm(a, b).float()


def slab_rows(device_type: str, vocab_size: int) -> int:
    """Rows per element-wise slab on `device_type` ("cpu", or any accelerator); the planner counts the same."""
    elems = _SLAB_ELEMS_CPU if device_type == "cpu" else _SLAB_ELEMS_GPU
    return max(1, elems // max(vocab_size, 1))


@dataclass
class LossSums:
    """Sums over the valid tokens of one call; the trainer divides by its global token count."""

    total: Tensor  # fp32 scalar with grad: alpha * T**2 * kd + (1 - alpha) * ce
    ce: Tensor  # detached fp32: sum of CE at T = 1
    kd: Tensor  # detached fp32: sum of the divergence at temperature T (no T^2)
    tokens: Tensor  # detached int64: number of valid tokens
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached fp32 sums (see module docstring)


# ----------------------------------------------------------------------------------------------------------------
# Per-token reference (autograd-friendly)
# ----------------------------------------------------------------------------------------------------------------

def _plogratio(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Element-wise a * (log_a - log_b) with 0 * log 0 = 0: NaN-free values and gradients where a == 0."""
    zero = a == 0
    return a * (torch.where(zero, 0.0, log_a) - torch.where(zero, 0.0, log_b))


def _log_mix(log_x: Tensor, log_y: Tensor, w: float) -> Tensor:
    """log(w * x + (1 - w) * y) for 0 < w < 1, NaN-free (also in backward) where x == y == 0."""
    both_zero = (log_x == _NEG_INF) & (log_y == _NEG_INF)
    lx = torch.where(both_zero, 0.0, log_x)
    ly = torch.where(both_zero, 0.0, log_y)
    m = torch.logaddexp(lx + math.log(w), ly + math.log1p(-w))
    return torch.where(both_zero, _NEG_INF, m)


def divergence_from_logprobs(log_p: Tensor, log_q: Tensor, divergence: str, beta: float = 0.5,
                             skew_lambda: float = 0.1) -> Tensor:
    """Per-row divergence [..., V] -> [...] between teacher log-probs `log_p` and student log-probs `log_q`.

    Both must be normalised over the last dimension; -inf entries (probability 0) are allowed. Differentiable.
    """
    p, q = log_p.exp(), log_q.exp()
    divergence = _canonical(divergence, beta, skew_lambda)
    if divergence == "forward_kl":
        return _plogratio(p, log_p, log_q).sum(-1)
    if divergence == "reverse_kl":
        return _plogratio(q, log_q, log_p).sum(-1)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _plogratio(p, log_p, log_m).sum(-1) + (1 - beta) * _plogratio(q, log_q, log_m).sum(-1)
    if divergence in ("skew_forward_kl", "skew_reverse_kl") and skew_lambda == 1.0:
        return (log_q * 0.0).sum(-1)  # KL(x || x) = 0, kept in the graph
    if divergence == "skew_forward_kl":
        return _plogratio(p, log_p, _log_mix(log_p, log_q, skew_lambda)).sum(-1)
    if divergence == "skew_reverse_kl":
        return _plogratio(q, log_q, _log_mix(log_q, log_p, skew_lambda)).sum(-1)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str, temperature: float = 1.0,
                     beta: float = 0.5, skew_lambda: float = 0.1, vocab_size: int | None = None) -> Tensor:
    """Per-token divergence D(p_T || q_T) [N] from [N, V] logits (the reference; differentiable).

    Computed and returned in fp32 (fp64 for fp64 logits, for references).

    `vocab_size` slices both logits to the real vocabulary first (needed when the two lm_heads have different
    padded row counts); without it both must already have the same width.
    """
    if vocab_size is not None:
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student logits have {student_logits.shape[-1]} columns, teacher {teacher_logits.shape[-1]}"
                         " -> pass vocab_size (the real tokenizer vocabulary) to slice off padded rows")
    log_q = F.log_softmax(_at_least_fp32(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_at_least_fp32(teacher_logits) / temperature, dim=-1)
    return divergence_from_logprobs(log_p, log_q, divergence, beta, skew_lambda)


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Opts:
    vocab_size: int
    alpha: float
    temperature: float
    divergence: str
    beta: float
    skew_lambda: float
    chunk_size: int
    top_k: int
    impl: str
    need_grad_hidden: bool
    need_grad_weight: bool
    layout: str = "token_major"
    need_grad_bias: bool = False
    student_transform: HeadTransform = IDENTITY
    teacher_transform: HeadTransform = IDENTITY
    compiled: bool = False  # dense slabs through torch.compile (`compiled_slabs`)

    @property
    def uses_compiled(self) -> bool:
        """Whether this call's slabs run the compiled math: dense KD slabs only (CE-only and top-k stay eager)."""
        return self.compiled and self.impl == "chunked" and self.alpha > 0

    @property
    def want_grad(self) -> bool:
        return self.need_grad_hidden or self.need_grad_weight or self.need_grad_bias


@dataclass(frozen=True)
class LossSpec:
    """A run's loss settings, built once from the config (trainer.build) and held by the student wrapper
    (models.StudentWithLoss.loss_spec): every `distill_loss` argument that is not a tensor. `distill_loss(...,
    **spec.kwargs())` is the loss of that run."""
    vocab_size: int
    alpha: float
    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew_lambda: float = 0.1
    impl: str = "chunked"
    chunk_size: int = 1024
    top_k: int = 64
    layout: str = "auto"
    teacher_transform: HeadTransform = IDENTITY
    compiled: bool = False  # the dense slabs' element-wise part through torch.compile (loss.compile resolved)

    def kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    vocab_size: int,
    alpha: float,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew_lambda: float = 0.1,
    impl: str = "chunked",
    chunk_size: int = 1024,
    top_k: int = 64,
    layout: str = "auto",
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    student_transform: HeadTransform = IDENTITY,
    teacher_transform: HeadTransform = IDENTITY,
    rows: Tensor | None = None,
    compiled: bool = False,
) -> LossSums:
    """Distillation + CE loss sums for N positions (see the module docstring for every convention).

    student_hidden [N, Hs] final hidden states of the positions predicting `labels` [N] (already shifted, -100 =
    not trained); student_weight [Vs_rows, Hs] the student lm_head; teacher_hidden [N, Ht] / teacher_weight
    [Vt_rows, Ht] likewise for the teacher, or teacher_topk = (ids [N, k], logprobs [N, k]) from an offline cache
    (impl="topk" only). alpha == 0 trains CE only and needs no teacher. `layout` (chunked / topk) is the chunk
    logits' memory layout, see `chunk_layout`; it changes speed only, never the result beyond fp32 rounding.

    The model's head (heads.py): each model's logits are `transform(hidden @ weight^T + bias)`, with an optional
    bias [V_rows] (trained, for the student: it gets its gradient) and the family's `HeadTransform` (scale,
    softcap). Every impl applies them, chunk by chunk in the fused ones, with the transform's derivative in the
    gradient; plain heads (no bias, identity transform) take exactly the code path they took without them.
    `rows` [n]: the indices of the trained labels when the caller found them and checked the labels (and top-k
    ids) against the vocabulary on the host; the loss then reads no value on the device (no host synchronisation).
    `compiled` (impl="chunked", alpha > 0): the element-wise part of each slab runs as one torch.compile'd function
    (`compiled_slabs`) instead of the eager in-place ops; same math, same results to fp32 rounding.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}: expected one of {DIVERGENCES}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if not (0.0 <= beta <= 1.0 and 0.0 <= skew_lambda <= 1.0):
        raise ValueError(f"beta={beta} and skew_lambda={skew_lambda} must be in [0, 1]")
    if chunk_size <= 0 or top_k <= 0:
        raise ValueError(f"chunk_size={chunk_size} and top_k={top_k} must be > 0")
    if student_hidden.dim() != 2 or labels.dim() != 1 or labels.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"expected student_hidden [N, H] and labels [N], got {tuple(student_hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if student_weight.shape[0] < vocab_size:
        raise ValueError(f"student lm_head has {student_weight.shape[0]} rows < vocab_size {vocab_size}")
    kd = alpha > 0
    if kd:
        if teacher_topk is not None and (impl != "topk" or teacher_hidden is not None):
            raise ValueError("teacher_topk (an offline cache) is used only with impl='topk' and no teacher_hidden")
        if teacher_topk is None and (teacher_hidden is None or teacher_weight is None):
            raise ValueError("alpha > 0 needs teacher_hidden and teacher_weight (or teacher_topk with impl='topk')")
        if teacher_hidden is not None:
            if teacher_hidden.shape[0] != student_hidden.shape[0]:
                raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, "
                                 f"student {student_hidden.shape[0]}")
            if teacher_weight.shape[0] < vocab_size:
                raise ValueError(f"teacher lm_head has {teacher_weight.shape[0]} rows < vocab_size {vocab_size}")
    else:  # CE only: the teacher is not used at all
        teacher_hidden = teacher_weight = teacher_topk = teacher_bias = None

    grad_on = torch.is_grad_enabled()
    opts = _Opts(vocab_size=vocab_size, alpha=float(alpha), temperature=float(temperature), divergence=divergence,
                 beta=float(beta), skew_lambda=float(skew_lambda), chunk_size=int(chunk_size), top_k=int(top_k),
                 impl=impl, need_grad_hidden=grad_on and student_hidden.requires_grad,
                 need_grad_weight=grad_on and student_weight.requires_grad,
                 layout=chunk_layout(layout),
                 need_grad_bias=grad_on and student_bias is not None and student_bias.requires_grad,
                 student_transform=student_transform, teacher_transform=teacher_transform, compiled=bool(compiled))
    for name, b, w in (("student_bias", student_bias, student_weight), ("teacher_bias", teacher_bias, teacher_weight)):
        if b is not None and (w is None or b.dim() != 1 or b.shape[0] != w.shape[0]):
            raise ValueError(f"{name} must be [rows of its lm_head], got {tuple(b.shape)}")

    checked = rows is not None
    if checked:
        lab = labels.index_select(0, rows)
    else:  # drop untrained positions before any matmul (host syncs: nonzero, the label check)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        lab = labels.index_select(0, rows)
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab_size):
            raise ValueError(f"labels must be -100 or in [0, {vocab_size}); got values in [{int(lab.min())}, "
                             f"{int(lab.max())}]")

    if impl == "full":
        return _full_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          rows, lab, opts)
    topk_ids = topk_lp = None
    if teacher_topk is not None:
        ids, lps = teacher_topk
        if ids.shape != lps.shape or ids.dim() != 2 or ids.shape[0] != labels.shape[0]:
            raise ValueError(f"teacher_topk must be (ids [N, k], logprobs [N, k]) with N={labels.shape[0]}, got "
                             f"{tuple(ids.shape)} and {tuple(lps.shape)}")
        if rows.numel() != labels.shape[0]:
            ids, lps = ids.index_select(0, rows), lps.index_select(0, rows)
        topk_ids, topk_lp = ids.long(), lps.float()
        if not checked and topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= vocab_size):
            raise ValueError(f"teacher_topk ids must be in [0, {vocab_size}) (padded rows never get probability)")
    t_hidden = teacher_hidden
    if teacher_hidden is not None and rows.numel() != labels.shape[0]:
        t_hidden = teacher_hidden.index_select(0, rows)
    total, stats = _FusedLinearDistill.apply(student_hidden, student_weight, student_bias, rows, lab, t_hidden,
                                             teacher_weight, teacher_bias, topk_ids, topk_lp, opts)
    return _pack(total, stats, rows.numel(), opts)


_STATS = ("ce", "kd") + HEALTH_METRICS


def _pack(total: Tensor, stats: Tensor, n_tokens: int, opts: _Opts) -> LossSums:
    stats = stats.detach().float()
    metrics = {k: stats[i] for i, k in enumerate(_STATS) if i >= 2}
    if opts.impl != "topk":
        metrics.pop("topk_mass")
    if opts.alpha == 0:  # no teacher: teacher-side metrics do not exist
        for k in ("agree", "teacher_entropy", "topk_mass"):
            metrics.pop(k, None)
    tokens = torch.full((), n_tokens, dtype=torch.int64, device=total.device)  # a fill, not a host-to-device copy
    return LossSums(total=total, ce=stats[0], kd=stats[1], tokens=tokens, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------------
# impl = "full": the reference
# ----------------------------------------------------------------------------------------------------------------

def _raw_logits(h: Tensor, weight: Tensor, bias: Tensor | None, V: int) -> Tensor:
    raw = h @ weight[:V].T
    return _at_least_fp32(raw + bias[:V] if bias is not None else raw)


def _full_loss(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, rows, lab,
               o: _Opts) -> LossSums:
    V, T = o.vocab_size, o.temperature
    h = student_hidden.index_select(0, rows)
    s = o.student_transform(_raw_logits(h, student_weight, student_bias, V))  # [n, V] the model's logits, fp32
    ce_tok = F.cross_entropy(s, lab, reduction="none")
    stats = torch.zeros(len(_STATS), dtype=torch.float64, device=s.device)
    stats[0] = ce_tok.detach().sum()
    total = (1 - o.alpha) * ce_tok.sum()
    if o.alpha > 0:
        with torch.no_grad():
            t = o.teacher_transform(_raw_logits(teacher_hidden.index_select(0, rows), teacher_weight, teacher_bias,
                                                V))  # [n, V]
        kd_tok = token_divergence(s, t, o.divergence, T, o.beta, o.skew_lambda)
        total = total + o.alpha * T * T * kd_tok.sum()
        with torch.no_grad():
            log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
            stats[1] = kd_tok.detach().sum()
            stats[2] = (s.argmax(-1) == t.argmax(-1)).sum()
            stats[3] = -_plogratio(log_p.exp(), log_p, torch.zeros_like(log_p)).sum()
            stats[4] = -_plogratio(log_q.exp(), log_q, torch.zeros_like(log_q)).sum()
    else:
        with torch.no_grad():  # CE only: student entropy at T = 1
            log_q = F.log_softmax(s, -1)
            stats[4] = -_plogratio(log_q.exp(), log_q, torch.zeros_like(log_q)).sum()
    total = total.float()
    if rows.numel() == 0:  # keep the graph (zero grads) for every input that requires grad
        total = total + 0.0 * student_hidden.sum() + 0.0 * student_weight.sum()
        if student_bias is not None:
            total = total + 0.0 * student_bias.sum()
    return _pack(total, stats, rows.numel(), o)


# ----------------------------------------------------------------------------------------------------------------
# impl = "chunked" / "topk": fused linear + loss, gradients computed in forward
# ----------------------------------------------------------------------------------------------------------------

class _FusedLinearDistill(torch.autograd.Function):
    """Forward computes the loss sums AND d(total)/d(student_hidden), d(total)/d(student_weight) (and the bias),
    chunk by chunk.

    Backward multiplies the stored gradients by grad_output (a scalar) and returns them. The teacher gets no grad.
    Head transforms (heads.py): a scale is folded into the [c, H] hidden rows (z = (scale h) @ W^T + scale b, so
    dz/dh = scale W and dz/dW = (scale h)^T: no [c, V] pass); a softcap is applied slab by slab in `_chunk_slabs`,
    which multiplies the logit gradient by its derivative there.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, rows, lab, t_hidden, t_weight, t_bias, topk_ids,
                topk_lp, o: _Opts):
        N, Hs = student_hidden.shape
        dev, V = student_hidden.device, o.vocab_size
        Vg = gemm_width(V, student_weight, t_weight)  # the GEMMs' width (aligned); columns >= V are masked below
        w_s = student_weight[:Vg]  # [Vg, Hs] view
        w_t = t_weight[:Vg] if t_weight is not None else None
        n = rows.numel()
        compact = n != N  # the trainer usually passes trained positions only: then no copy at all
        h = student_hidden.index_select(0, rows) if compact else student_hidden  # [n, Hs]
        grad_h = (torch.zeros_like(h) if compact else torch.empty_like(h)) if o.need_grad_hidden else None
        # lm_head gradient: accumulated in fp32 across chunks (a bf16 accumulator would round at every chunk); a
        # single chunk writes it directly in the weight's dtype
        accumulate_fp32 = student_weight.dtype != torch.float32 and n > o.chunk_size
        grad_w = (torch.zeros(student_weight.shape, dtype=torch.float32 if accumulate_fp32 else student_weight.dtype,
                              device=dev) if o.need_grad_weight else None)
        stats = torch.zeros(len(_STATS), dtype=torch.float64, device=dev)
        slab = slab_rows(dev.type, V)
        vocab_major = o.layout == "vocab_major"
        # preallocated element-wise temporaries, reused by every slab (fresh [slab, V] allocations would page-fault
        # on every slab on CPU); vocab_major adds two for the slab's student and teacher rows
        work = torch.empty(_workspace_rows(o.layout, o.uses_compiled), min(slab, max(n, 1)), V,
                           dtype=torch.float32, device=dev)
        want_grad = o.want_grad
        has_t = o.alpha > 0 and t_hidden is not None
        s_scale, t_scale = o.student_transform.scale, o.teacher_transform.scale
        # biases in fp32, with the scale folded in ([V]); their gradient is the column sum of the logit gradient
        b_s = student_bias[:V].detach().float() * s_scale if student_bias is not None else None
        b_t = t_bias[:V].float() * t_scale if t_bias is not None and has_t else None
        grad_b = (torch.zeros(student_bias.shape, dtype=torch.float32, device=dev) if o.need_grad_bias else None)
        # d(softcap)/d(input) of a slab's student logits: one more [slab, V] temporary, only for softcapped students
        dwork = (torch.empty(min(slab, max(n, 1)), V, dtype=torch.float32, device=dev)
                 if o.student_transform.softcap is not None and want_grad and not o.uses_compiled else None)
        for c0 in range(0, n, o.chunk_size):
            c1 = min(c0 + o.chunk_size, n)
            h_c = h[c0:c1] if s_scale == 1.0 else h[c0:c1] * s_scale  # [c, Hs]
            t_c = None
            if has_t:
                t_c = t_hidden[c0:c1] if t_scale == 1.0 else t_hidden[c0:c1] * t_scale
            # student logits ([c, Vg] or [Vg, c]) in fp32, overwritten in place with d(total)/d(logits); teacher
            # logits. The element-wise part sees the first V columns (rows in vocab_major) only.
            if vocab_major:
                s_g = mm_fp32(w_s, h_c.T)
                t = mm_fp32(w_t, t_c.T)[:V] if has_t else None
                s = s_g[:V]
                if b_s is not None:
                    s.add_(b_s[:, None])
                if b_t is not None:
                    t.add_(b_t[:, None])
            else:
                s_g = mm_fp32(h_c, w_s.T)
                t = mm_fp32(t_c, w_t.T)[:, :V] if has_t else None
                s = s_g[:, :V]
                if b_s is not None:
                    s.add_(b_s)
                if b_t is not None:
                    t.add_(b_t)
            ids_c = topk_ids[c0:c1] if topk_ids is not None else None
            lp_c = topk_lp[c0:c1] if topk_lp is not None else None
            stats += _chunk_slabs(s, t, ids_c, lp_c, lab[c0:c1], o, work, dwork)
            del t, t_c  # no view of it survives (_chunk_slabs owns them): freed before the next chunk allocates
            if want_grad:
                if grad_b is not None:  # d/d(bias) = scale * column sums of d/d(scaled raw logits)
                    grad_b[:V] += (s.sum(1) if vocab_major else s.sum(0)).mul_(s_scale)
                if Vg > V:  # padded columns: zero gradient (they still hold raw logits)
                    (s_g[V:] if vocab_major else s_g[:, V:]).zero_()
                # d(total)/d(student logits) in the matmul dtype; for bf16 the fp32 buffer is dropped here
                s = s_g.to(h_c.dtype)
                g = s.T if vocab_major else s  # [c, V] view either way
                if grad_h is not None:
                    torch.mm(g, w_s, out=grad_h[c0:c1])
                    if s_scale != 1.0:
                        grad_h[c0:c1].mul_(s_scale)
                if grad_w is not None:
                    if accumulate_fp32:
                        grad_w[:Vg] += (g.T @ h_c).float()
                    else:
                        grad_w[:Vg].addmm_(g.T, h_c)
                del g  # a view of s: it would keep the chunk alive while the next one allocates
            del s, s_g
        total = (o.alpha * o.temperature ** 2 * stats[1] + (1 - o.alpha) * stats[0]).float()
        if grad_h is not None and compact:
            full = torch.zeros_like(student_hidden)
            full.index_copy_(0, rows, grad_h)
            grad_h = full
        if grad_w is not None and accumulate_fp32:
            grad_w = grad_w.to(student_weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(student_bias.dtype)
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total, grad_stats):
        if ctx.grads is None:
            raise RuntimeError("distill_loss gradients were already consumed: backward through it only once")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None  # scaled in place below: a second backward must not reuse them
        # no `if grad_total == 1` shortcut: it would be a host sync on GPU; one pass over grad_w is cheap
        grad_h = grad_h.mul_(grad_total.to(grad_h.dtype)) if grad_h is not None else None
        grad_w = grad_w.mul_(grad_total.to(grad_w.dtype)) if grad_w is not None else None
        grad_b = grad_b.mul_(grad_total.to(grad_b.dtype)) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def _chunk_slabs(s: Tensor, t: Tensor | None, ids: Tensor | None, lp: Tensor | None, lab: Tensor, o: _Opts,
                 work: Tensor, dwork: Tensor | None = None) -> Tensor:
    """Run the element-wise part over one chunk, `work.shape[1]` rows at a time; returns the summed stats row.

    Softcapped heads: each slab's logits are capped here (in cache, right before their use), and, for the student,
    the gradient w.r.t. the capped logits is multiplied by the cap's derivative (kept in `dwork` [slab, V], given
    when gradients are wanted), so what leaves is d(total)/d(logits before the cap).

    token_major: s, t are [c, V] and the slabs work in place on their rows. vocab_major: s, t are [V, c]; each slab's
    token columns are copied into the last two work rows (contiguous [r, V]), processed there, and the gradient is
    written back into s's columns.
    """
    stats = torch.zeros(len(_STATS), dtype=torch.float64, device=s.device)
    slab = work.shape[1]
    vocab_major = o.layout == "vocab_major"
    n = s.shape[1] if vocab_major else s.shape[0]
    staging = work[-1].view(-1) if vocab_major else None  # scratch for the transposing copies
    fused = compiled_slabs(o) if o.uses_compiled else None
    for r0 in range(0, n, slab):
        r1 = min(r0 + slab, n)
        w = work[:, :r1 - r0]
        if vocab_major:  # two steps: [V, c] columns -> [V, r] block (streaming) -> [r, V] rows (in cache); on CPU
            # 2x faster than one strided gather
            block = staging[:s.shape[0] * (r1 - r0)].view(s.shape[0], r1 - r0)
            s_r = w[-3].copy_(block.copy_(s[:, r0:r1]).T)
            t_r = w[-2].copy_(block.copy_(t[:, r0:r1]).T) if t is not None else None
        else:
            s_r = s[r0:r1]
            t_r = t[r0:r1] if t is not None else None
        if fused is not None:  # softcaps, statistics and the gradient in one compiled function, in place in s_r
            stats[:5] += fused(s_r, t_r, lab[r0:r1])
            if vocab_major:
                s[:, r0:r1].T.copy_(s_r)
            continue
        d_r = None
        if o.student_transform.softcap is not None:
            d_r = dwork[:r1 - r0] if dwork is not None else None
            softcap_(s_r, o.student_transform.softcap, d_r)
        if t_r is not None and o.teacher_transform.softcap is not None:
            softcap_(t_r, o.teacher_transform.softcap)
        if o.alpha == 0:
            stats += _ce_only_slab(s_r, lab[r0:r1], w)
        elif o.impl == "topk":
            stats += _topk_slab(s_r, t_r, ids[r0:r1] if ids is not None else None,
                                lp[r0:r1] if lp is not None else None, lab[r0:r1], o, w)
        else:
            stats += _dense_slab(s_r, t_r, lab[r0:r1], o, w)
        if d_r is not None:
            s_r.mul_(d_r)
        if vocab_major:
            s[:, r0:r1].T.copy_(s_r)
    return stats


def _rowdot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise dot product [r, V] x [r, V] -> [r], through a preallocated [r, V] scratch buffer."""
    return torch.mul(a, b, out=scratch).sum(1)


def _ce_only_slab(s: Tensor, lab: Tensor, w: Tensor) -> Tensor:
    """CE at T = 1 for a slab; s [r, V] raw logits -> overwritten with softmax - onehot. Returns the stats row."""
    lab_logit = s.gather(1, lab[:, None])  # [r, 1]
    m = s.amax(1, keepdim=True)
    s.sub_(m)
    q = torch.exp(s, out=w[0])
    z = q.sum(1, keepdim=True)
    log_z = z.log()
    h_q = log_z.squeeze(1) - _rowdot(q, s, w[1]) / z.squeeze(1)  # student entropy at T = 1
    torch.div(q, z, out=s)
    s.scatter_add_(1, lab[:, None], torch.full_like(lab_logit, -1.0))
    out = torch.zeros(len(_STATS), dtype=torch.float64, device=s.device)
    out[0], out[4] = (m + log_z - lab_logit).sum(), h_q.sum()
    return out


def _canonical(divergence: str, beta: float, skew_lambda: float) -> str:
    """The divergences that reduce exactly to forward / reverse KL at their endpoints."""
    if divergence == "jsd" and beta == 0.0 or divergence == "skew_forward_kl" and skew_lambda == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0 or divergence == "skew_reverse_kl" and skew_lambda == 0.0:
        return "reverse_kl"
    return divergence


def _dense_slab(s: Tensor, t: Tensor, lab: Tensor, o: _Opts, w: Tensor) -> Tensor:
    """All divergences, chunked impl, one slab of rows.

    s [r, V] raw student logits (fp32) -> overwritten with d(total)/d(logits); t [r, V] raw teacher logits
    (clobbered); w [6, r, V] workspace. Returns the stats row [ce, kd, agree, H(p), H(q), 0] summed over the slab
    (fp64). Every pass over [r, V] counts (they are most of the cost beyond the GEMMs): forward and reverse KL work from
    the unnormalised exponentials and row dot products, about 16 passes; the other divergences normalise first.
    """
    a, T = o.alpha, o.temperature
    c_kd = a * T  # d(total)/d(raw logits) = alpha * T * dD/dz + (1 - alpha) * (q_1 - onehot), z = logits / T
    lab_logit = s.gather(1, lab[:, None])  # [r, 1] raw logit of the label (CE at T = 1)
    s_max = s.amax(1, keepdim=True)
    t_max = t.amax(1, keepdim=True)
    s.sub_(s_max)
    t.sub_(t_max)
    if T != 1.0:
        s.mul_(1.0 / T)
        t.mul_(1.0 / T)
    # s = z - max z, t = u - max u: both <= 0 and exactly 0 at their maxima, so a shared 0 means the argmaxes
    # agree (ties: any shared maximum counts)
    agree = (torch.add(s, t, out=w[3]).amax(1) == 0).sum()
    e_s, e_t = torch.exp(s, out=w[0]), torch.exp(t, out=w[1])  # [r, V] unnormalised q and p
    zq, zp = e_s.sum(1, keepdim=True), e_t.sum(1, keepdim=True)
    log_zq, log_zp = zq.log(), zp.log()
    h_q = log_zq.squeeze(1) - _rowdot(e_s, s, w[3]) / zq.squeeze(1)  # [r] entropy of q: log zq - <q, s>
    h_p = log_zp.squeeze(1) - _rowdot(e_t, t, w[3]) / zp.squeeze(1)
    if T == 1.0:  # CE at T = 1: the softmax is q itself
        lse1, q1u, z1 = s_max + log_zq, e_s, zq
    else:  # raw - max = T * s
        q1u = torch.mul(s, T, out=w[2]).exp_()
        z1 = q1u.sum(1, keepdim=True)
        lse1 = s_max + z1.log()
    ce = (lse1 - lab_logit).sum()

    div = _canonical(o.divergence, o.beta, o.skew_lambda)
    if div == "forward_kl":
        # D = <p, log p> - <p, log q> = -H(p) - <p, s> + log zq ;  dD/dz = q - p
        d = -h_p - _rowdot(e_t, s, w[3]) / zp.squeeze(1) + log_zq.squeeze(1)
        coef_q = c_kd / zq
        if T == 1.0 and a < 1.0:  # fold the CE softmax term into the same pass
            coef_q = coef_q + (1 - a) / zq
            q1u = None
        torch.mul(e_s, coef_q, out=s)
        s.addcmul_(e_t, -c_kd / zp)
    elif div == "reverse_kl":
        torch.sub(s, t, out=t)  # t = log q - log p + (log zq - log zp)
        shift = log_zq - log_zp
        d = _rowdot(e_s, t, w[3]) / zq.squeeze(1) - shift.squeeze(1)  # <q, log q - log p>
        # dD/dz = q * (log q - log p - D)
        t.sub_(shift + d[:, None]).mul_(e_s)
        torch.mul(t, c_kd / zq, out=s)
        if T == 1.0 and a < 1.0:
            s.addcmul_(e_s, (1 - a) / zq)
            q1u = None
    else:
        q, p = e_s.div_(zq), e_t.div_(zp)  # normalised in place
        if T == 1.0:
            z1 = torch.ones_like(zq)  # q1u is e_s, now already normalised
        log_q, log_p = s.sub_(log_zq), t.sub_(log_zp)
        if div == "jsd":
            b = o.beta
            # log m = logsumexp(log p + log b, log q + log(1 - b)): exact for a tiny b, where log(b p + (1 - b) q)
            # of the probabilities loses the b p term to rounding. Both KLs are row dot products of log-ratios (not
            # -H - <x, log m>, whose two terms of size log V cancel to a KL of size ~b)
            log_qm = _log_mix_into(log_p, log_q, b, w[4], w[5]).neg_().add_(log_q)  # log q - log m
            kl_qm = _rowdot(q, log_qm, w[3])
            kl_pm = _rowdot(p, torch.sub(log_p, log_q, out=w[5]).add_(log_qm), w[3])  # <p, log p - log m>
            d = b * kl_pm + (1 - b) * kl_qm
            # dD/dz = (1 - b) q (log q - log m - KL(q || m))
            g = log_qm.sub_(kl_qm[:, None]).mul_(q).mul_(1 - b)
        elif div in ("skew_forward_kl", "skew_reverse_kl") and o.skew_lambda == 1.0:
            d = torch.zeros_like(h_p)
            g = w[4].zero_()
        elif div == "skew_forward_kl":
            lam = o.skew_lambda
            mix = torch.mul(p, lam, out=w[4]).add_(q, alpha=1 - lam).clamp_min_(_TINY)  # m
            d = -h_p - _rowdot(p, torch.log(mix, out=w[5]), w[3])
            # G = dD/dlog q = -(1 - lam) p q / m ;  dD/dz = G - q * sum(G)
            gq = mix.reciprocal_().mul_(p).mul_(q).mul_(-(1 - lam))
            g = gq.addcmul_(q, -gq.sum(1, keepdim=True))
        elif div == "skew_reverse_kl":
            lam = o.skew_lambda
            mix = torch.mul(q, lam, out=w[4]).add_(p, alpha=1 - lam).clamp_min_(_TINY)  # m
            log_m = torch.log(mix, out=w[5])
            d = -h_q - _rowdot(q, log_m, w[3])
            # G = q (log q - log m - lam q / m) (+ q, which the projection removes)
            gq = torch.div(q, mix, out=w[4]).mul_(-lam).sub_(log_m).add_(log_q).mul_(q)
            g = gq.addcmul_(q, -gq.sum(1, keepdim=True))
        elif div == "tv":
            diff = torch.sub(q, p, out=w[4])
            d = 0.5 * torch.abs(diff, out=w[3]).sum(1)
            gq = diff.sign_().mul_(q).mul_(0.5)
            g = gq.addcmul_(q, -gq.sum(1, keepdim=True))
        else:
            raise ValueError(f"unknown divergence {div!r}")
        torch.mul(g, c_kd, out=s)
    if a < 1.0:
        if q1u is not None:
            s.addcmul_(q1u, (1 - a) / z1)
        s.scatter_add_(1, lab[:, None], torch.full_like(lab_logit, -(1 - a)))
    out = torch.zeros(len(_STATS), dtype=torch.float64, device=s.device)
    out[0], out[1], out[2], out[3], out[4] = ce, d.sum(), agree, h_p.sum(), h_q.sum()
    return out


# ----------------------------------------------------------------------------------------------------------------
# The dense slab as one compiled function (impl = "chunked", compiled=True)
# ----------------------------------------------------------------------------------------------------------------

def _dense_slab_math(s: Tensor, t: Tensor, lab: Tensor, div: str, a: float, T: float, beta: float, lam: float,
                     s_cap: float | None, t_cap: float | None) -> tuple[Tensor, Tensor]:
    """`_dense_slab` (with the softcaps of `_chunk_slabs`) written out of place, for torch.compile: the same
    formulas in the same order, so inductor's fused kernels round like the eager ops. s, t [r, V] raw fp32 logits
    (any row stride); returns d(total)/d(s) [r, V] and the stats [ce, kd, agree, H(p), H(q)] (fp32). `div` is
    canonical (`_canonical`); every float is a compile-time constant."""
    c_kd = a * T
    dcap = None
    if s_cap is not None:  # softcap_: cap * tanh(s / cap), derivative 1 - tanh^2
        th = torch.tanh(s / s_cap)
        dcap = -(th * th) + 1.0
        s = th * s_cap
    if t_cap is not None:
        t = torch.tanh(t / t_cap) * t_cap
    lab_logit = s.gather(1, lab[:, None])
    s_max = s.amax(1, keepdim=True)
    t_max = t.amax(1, keepdim=True)
    s = s - s_max
    t = t - t_max
    if T != 1.0:
        s = s * (1.0 / T)
        t = t * (1.0 / T)
    agree = ((s + t).amax(1) == 0).sum()
    e_s, e_t = torch.exp(s), torch.exp(t)
    zq, zp = e_s.sum(1, keepdim=True), e_t.sum(1, keepdim=True)
    log_zq, log_zp = zq.log(), zp.log()
    h_q = log_zq.squeeze(1) - (e_s * s).sum(1) / zq.squeeze(1)
    h_p = log_zp.squeeze(1) - (e_t * t).sum(1) / zp.squeeze(1)
    if T == 1.0:
        lse1, q1u, z1 = s_max + log_zq, e_s, zq
    else:
        q1u = torch.exp(s * T)
        z1 = q1u.sum(1, keepdim=True)
        lse1 = s_max + z1.log()
    ce = (lse1 - lab_logit).sum()
    if div == "forward_kl":
        d = -h_p - (e_t * s).sum(1) / zp.squeeze(1) + log_zq.squeeze(1)
        coef_q = c_kd / zq
        if T == 1.0 and a < 1.0:
            coef_q = coef_q + (1 - a) / zq
            q1u = None
        g = e_s * coef_q + e_t * (-c_kd / zp)
    elif div == "reverse_kl":
        lr = s - t
        shift = log_zq - log_zp
        d = (e_s * lr).sum(1) / zq.squeeze(1) - shift.squeeze(1)
        g = ((lr - (shift + d[:, None])) * e_s) * (c_kd / zq)
        if T == 1.0 and a < 1.0:
            g = g + e_s * ((1 - a) / zq)
            q1u = None
    else:
        q, p = e_s / zq, e_t / zp
        if T == 1.0:
            q1u, z1 = q, torch.ones_like(zq)
        log_q, log_p = s - log_zq, t - log_zp
        if div == "jsd":
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            log_qm = -log_m + log_q
            kl_qm = (q * log_qm).sum(1)
            kl_pm = (p * ((log_p - log_q) + log_qm)).sum(1)
            d = beta * kl_pm + (1 - beta) * kl_qm
            g = ((log_qm - kl_qm[:, None]) * q) * (1 - beta)
        elif div in ("skew_forward_kl", "skew_reverse_kl") and lam == 1.0:
            d = torch.zeros_like(h_p)
            g = torch.zeros_like(q)
        elif div == "skew_forward_kl":
            mix = (p * lam + q * (1 - lam)).clamp_min(_TINY)
            d = -h_p - (p * torch.log(mix)).sum(1)
            gq = ((mix.reciprocal() * p) * q) * (-(1 - lam))
            g = gq + q * (-gq.sum(1, keepdim=True))
        elif div == "skew_reverse_kl":
            mix = (q * lam + p * (1 - lam)).clamp_min(_TINY)
            log_m = torch.log(mix)
            d = -h_q - (q * log_m).sum(1)
            gq = ((((q / mix) * (-lam)) - log_m) + log_q) * q
            g = gq + q * (-gq.sum(1, keepdim=True))
        elif div == "tv":
            diff = q - p
            d = 0.5 * diff.abs().sum(1)
            gq = (diff.sign() * q) * 0.5
            g = gq + q * (-gq.sum(1, keepdim=True))
        else:
            raise ValueError(f"unknown divergence {div!r}")
        g = g * c_kd
    if a < 1.0:
        if q1u is not None:
            g = g + q1u * ((1 - a) / z1)
        # the label's -(1 - a) as an element-wise select, which fuses (a scatter would be its own kernel)
        col = torch.arange(g.shape[1], device=g.device)
        g = g + torch.where(col[None, :] == lab[:, None], -(1 - a), 0.0)
    if dcap is not None:
        g = g * dcap
    return g, torch.stack([ce, d.sum(), agree.to(ce.dtype), h_p.sum(), h_q.sum()])


_COMPILED: dict = {}  # specialisation key -> compiled slab function
# one cache entry per key (dynamic shapes: the rows, width and row stride of every slab share it); the same code
# object serves every key, so the recompile limit is raised (and a hit fails loudly under fullgraph)
_RECOMPILE_LIMIT = 64


class CompiledLossError(RuntimeError):
    """torch.compile could not build or run the compiled slab function on this device."""


def compiled_slabs(o: _Opts):
    """The compiled dense slab function for `o`'s specialisation: fn(s [r, V], t [r, V], lab [r]) -> stats [5]
    (fp32), writing d(total)/d(s) into s in place. Compiled once per (divergence, alpha, T, beta, lambda,
    softcaps); with dynamic shapes, so slabs of any row count and logits of any width or row stride (the padded
    GEMM width) reuse it. What it allocates per call: `COMPILED_SLAB_TEMPS` [r, V] fp32 buffers at most."""
    div = _canonical(o.divergence, o.beta, o.skew_lambda)
    key = (div, o.alpha, o.temperature, o.beta, o.skew_lambda, o.student_transform.softcap,
           o.teacher_transform.softcap)
    fn = _COMPILED.get(key)
    if fn is None:
        import torch._dynamo  # noqa: F401  (imported on first use: eager-only runs never load the compiler)
        import torch._inductor.exc  # noqa: F401

        def slab(s: Tensor, t: Tensor, lab: Tensor) -> Tensor:
            g, stats = _dense_slab_math(s, t, lab, *key)
            s.copy_(g)  # inductor stores the last fused kernel's output straight into s
            return stats

        compiled = torch.compile(slab, fullgraph=True, dynamic=True)

        def fn(s: Tensor, t: Tensor, lab: Tensor) -> Tensor:
            try:
                with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    return compiled(s, t, lab)
            except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as e:
                raise CompiledLossError(
                    f"the compiled loss (torch.compile of the element-wise slab math, on {s.device.type}) failed: "
                    f"{type(e).__name__}: {str(e).strip()[:2000]}\n-> run the eager path instead (loss.compile: off; "
                    "same results), or give torch.compile what it needs (a C++ compiler on CPU, Triton on GPUs)"
                ) from e
        _COMPILED[key] = fn
    return fn


COMPILE_SETTINGS = ("auto", "on", "off", True, False)


def compile_choice(setting: str | bool, device_type: str) -> tuple[bool, str]:
    """Whether the dense slabs run compiled (`compiled_slabs`), and why, for a loss.compile `setting` on
    `device_type`. auto = on for CUDA devices when Triton (inductor's GPU code generator) imports, off on CPU:
    compiling costs seconds to tens of seconds per process start there, which short CPU runs and the test suite's
    many launches would pay, while it is the GPU where the unfused passes cost most (docs/BENCHMARKS.md)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"compile={setting!r}: expected one of {COMPILE_SETTINGS}")
    if setting != "auto":
        on = setting in ("on", True)
        return on, "on" if on else "off"
    if device_type != "cuda":
        return False, f"auto: off on {device_type}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "auto: off, triton is not installed (torch.compile needs it on GPUs)"
    return True, "auto: on for cuda"


def compiled_selfcheck(device: torch.device | str, **loss_kwargs) -> float:
    """Compile the slab function for these loss settings and compare it with the eager path on small random inputs
    on `device` (padded GEMM width, several slabs, the given head transforms); returns the largest relative
    difference of the total and the hidden gradient. Raises CompiledLossError when compiling fails or the two
    differ by more than 1e-5. The real run's slabs reuse what this compiled (dynamic shapes)."""
    kw = {k: v for k, v in loss_kwargs.items() if k not in ("vocab_size", "chunk_size", "compiled")}
    g = torch.Generator().manual_seed(0)
    V, rows, n, hid = 200, 256, 24, 16
    hs, ws = torch.randn(n, hid, generator=g), torch.randn(rows, hid, generator=g) * 0.5
    ht, wt = torch.randn(n, hid, generator=g), torch.randn(rows, hid, generator=g) * 0.5
    labels = torch.randint(0, V, (n,), generator=g)
    out = []
    for compiled in (False, True):
        h = hs.to(device, copy=True).requires_grad_(True)
        res = distill_loss(h, ws.to(device), labels.to(device), teacher_hidden=ht.to(device),
                           teacher_weight=wt.to(device), vocab_size=V, chunk_size=16, compiled=compiled, **kw)
        res.total.backward()
        out.append((res.total.detach().double().cpu(), h.grad.double().cpu()))
    (t0, g0), (t1, g1) = out
    diff = max(float((t1 - t0).abs() / t0.abs().clamp_min(1e-30)),
               float((g1 - g0).abs().max() / g0.abs().max().clamp_min(1e-30)))
    if not diff <= 1e-5:
        raise CompiledLossError(f"the compiled loss differs from the eager one by {diff:.3g} (relative) on "
                                f"{device}\n-> run the eager path (loss.compile: off) and report this")
    return diff


def _log_mix_into(log_x: Tensor, log_y: Tensor, w: float, out: Tensor, scratch: Tensor) -> Tensor:
    """log(w * x + (1 - w) * y) [r, V] from log-probs as one log-sum-exp, in `out` (0 < w < 1; `scratch` is
    clobbered)."""
    torch.add(log_x, math.log(w), out=out)
    return torch.logaddexp(out, torch.add(log_y, math.log1p(-w), out=scratch), out=out)


def _topk_slab(s: Tensor, t: Tensor | None, ids: Tensor | None, lp1: Tensor | None, lab: Tensor,
               o: _Opts, w: Tensor) -> Tensor:
    """Top-k with a tail bucket, one slab of rows.

    s [r, V] raw student logits -> overwritten with d(total)/d(logits). The teacher is either t [r, V] raw logits
    (online; clobbered) or (ids [r, k], lp1 [r, k]) log-probs at T (the loss temperature) from a cache.
    """
    a, T = o.alpha, o.temperature
    inv_t = 1.0 / T
    r, V = s.shape
    # ---- teacher: top-k log-probs at T and the tail bucket, [r, k + 1]
    if t is not None:
        k = min(o.top_k, V)
        t_max = t.amax(1, keepdim=True)
        t.sub_(t_max)
        if T != 1.0:
            t.mul_(inv_t)
        vals, ids = t.topk(k, dim=1, sorted=False)  # [r, k] scaled logits - max
        t.scatter_(1, ids, _NEG_INF)
        log_tail = _masked_lse(t, w[0])  # [r, 1] logsumexp of the non-top-k scaled logits
        log_z = torch.logaddexp(log_tail, vals.logsumexp(1, keepdim=True))
        lp = torch.cat([vals, log_tail], 1) - log_z  # [r, k + 1]
    else:
        k = ids.shape[1]
        lp_k = lp1.float()
        mass = lp_k.double().exp().sum(1, keepdim=True)
        # k == V: the cache holds the whole vocabulary, the tail is exactly empty (whatever the rounding says)
        tail = (1.0 - mass).clamp_min(_TINY) if k < V else torch.zeros_like(mass)
        lp = torch.cat([lp_k, tail.log().float()], 1)  # already at T: the cache was written at T
    # teacher argmax among its top-k
    t_arg = ids.gather(1, lp[:, :k].argmax(1, keepdim=True))  # [r, 1]

    # ---- student: exact full-vocabulary normaliser, top-k logits and the tail bucket
    lab_logit = s.gather(1, lab[:, None])
    s_max = s.amax(1, keepdim=True)
    s.sub_(s_max)
    agree = (s.gather(1, t_arg) == 0).sum()  # teacher argmax is a student maximum
    q1 = None
    if T != 1.0:
        q1 = torch.exp(s, out=w[1])  # CE at T = 1 needs the raw softmax
        z1 = q1.sum(1, keepdim=True)
        q1.div_(z1)
        lse1 = s_max + z1.log()
        s.mul_(inv_t)
    zk = s.gather(1, ids)  # [r, k] scaled logits - max
    s.scatter_(1, ids, _NEG_INF)
    tail_max = s.amax(1, keepdim=True)
    tail_max = torch.where(torch.isfinite(tail_max), tail_max, 0.0)  # k == V: no tail
    s.sub_(tail_max).exp_()  # exp(z_j - tail_max) for j outside the top-k, 0 inside
    z_tail = s.sum(1, keepdim=True)
    log_tail = tail_max + z_tail.log()  # -inf when k == V
    log_z = torch.logaddexp(log_tail, zk.logsumexp(1, keepdim=True))
    if T == 1.0:
        lse1 = s_max + log_z
    ce = (lse1 - lab_logit).sum()

    # ---- the divergence on the (k + 1)-category distributions and its gradient w.r.t. their log-probs
    with torch.enable_grad():
        lq = (torch.cat([zk, log_tail], 1) - log_z).detach().requires_grad_(True)  # [r, k + 1]
        d = divergence_from_logprobs(lp, lq, o.divergence, o.beta, o.skew_lambda)
        (G,) = torch.autograd.grad(d.sum(), lq)
    lq = lq.detach()
    G = torch.nan_to_num(G)  # G is 0 on zero-probability buckets; guards 0 * inf in exotic underflow
    qc = lq.exp()
    sum_g = G.sum(1, keepdim=True)
    q_tail = qc[:, k:]
    # dD/dz_j: for j in top-k: G_j - q_j sum(G); outside: (q_j / q_tail) * (G_tail - q_tail * sum(G))
    #   with q_j / q_tail = exp(z_j - tail_max) / z_tail (what s holds, / z_tail): stable even for a tiny tail
    tail_coef = a * T * (G[:, k:] - q_tail * sum_g)
    top_grad = a * T * (G[:, :k] - qc[:, :k] * sum_g)
    if T == 1.0 and a < 1.0:  # CE gradient q_j folded in: q_j = (q_j / q_tail) * q_tail
        tail_coef = tail_coef + (1 - a) * q_tail
        top_grad = top_grad + (1 - a) * qc[:, :k]
    coef = torch.where(z_tail > 0, tail_coef / z_tail.clamp_min(_TINY), 0.0)
    s.mul_(coef)
    s.scatter_(1, ids, top_grad)
    if a < 1.0:
        if q1 is not None:
            s.add_(q1, alpha=1 - a)
        s.scatter_add_(1, lab[:, None], torch.full_like(lab_logit, -(1 - a)))

    p = lp.exp()
    out = torch.zeros(len(_STATS), dtype=torch.float64, device=s.device)
    out[0], out[1], out[2] = ce, d.detach().sum(), agree
    out[3] = -_plogratio(p, lp, torch.zeros_like(lp)).sum()
    out[4] = -_plogratio(qc, lq, torch.zeros_like(lq)).sum()
    out[5] = p[:, :k].sum()
    return out


def _masked_lse(x: Tensor, scratch: Tensor) -> Tensor:
    """Row logsumexp [r, V] -> [r, 1] of x, which may hold -inf (whole rows of -inf give -inf, not NaN)."""
    m = x.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m + torch.sub(x, m, out=scratch).exp_().sum(1, keepdim=True).log()
