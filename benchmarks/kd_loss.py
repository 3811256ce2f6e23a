"""KD loss benchmark at Qwen's vocabulary: wall time and peak memory of forward + backward, each method in a fresh
process.

    python benchmarks/kd_loss.py                       # the default plan (about 20 min on the 2-core CPU box)
    python benchmarks/kd_loss.py --n 1024 --methods chunked matmul chunked@256   # method@chunk_size overrides
    python benchmarks/kd_loss.py --n 4096 --methods matmul@128 chunked@128 --layout vocab_major   # loss.layout

Setup: V = 151,936, student hidden 1024, teacher hidden 2560, N tokens (all trained), fp32 on CPU (bf16 matmuls are
emulated there), torch.set_num_threads(2), alpha = 0.5, T = 1, forward KL unless the method says otherwise.

Each method runs in its own subprocess: inputs are built first (hidden states, lm_heads, labels; student ones
require grad), the peak-RSS mark is reset (`/proc/self/clear_refs` = 5), then one forward + backward runs, timed.
"peak above inputs" = VmHWM after the step - VmRSS before it: everything the step allocated, the returned
gradients included (the student lm_head's fp32 gradient alone is V x 1024 x 4 B = 622 MB for every method).

Methods:
  naive       seed 000's DistillationLoss on materialised [N, V] logits of both models
  seed_topk   seed 000's DistillationLossWithTopK (teacher masked to -inf outside its top-64, still [N, V] tensors)
  full        ds_distill impl=full (the reference)
  chunked     ds_distill impl=chunked (exact)
  topk        ds_distill impl=topk, teacher top-64 computed online from its hidden states
  topk_cache  ds_distill impl=topk with an offline cache (ids + log-probs): no teacher matmul at all
  chunked_jsd ds_distill impl=chunked, generalised JSD beta = 0.5 (the same loss as Liger's below)
  chunked_compiled, chunked_jsd_compiled
              the same with loss.compile (the element-wise slab math through torch.compile); one untimed warm-up
              call on 64 rows compiles it first (dynamic shapes: the timed step reuses it), its time is `warmup_s`.
              The report's "x eager" column is the ratio to the eager method of the same name, N and chunk size.
  liger       liger_kernel LigerFusedLinearJSDLoss (beta 0.5, torch.compile; one warm-up call compiles it first)
  matmul      the loss's own GEMMs alone, chunked like `chunked`: teacher + student logits, grad hidden, grad weight
              (in the chunk layout the loss uses, --layout / losses.chunk_layout, so the ratio to it is the
              element-wise part's cost, not a layout difference)
  matmul2     the two lm_head GEMMs alone (teacher + student logits), chunked like `chunked`

GPU (--device cuda): bf16 inputs and lm_heads (fp32 softmax statistics inside the losses), one untimed warm-up
step per method, then one timed step (synchronised); peak = torch.cuda.max_memory_allocated above the inputs.
The naive and seed_topk losses are skipped where their [N, V] tensors would not fit in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

V, HS, HT = 151936, 1024, 2560
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLAN = {  # N -> methods; about 20 minutes on the 2-core CPU box
    1024: ["matmul", "naive", "seed_topk", "full", "chunked", "chunked_compiled", "topk", "chunked_jsd",
           "chunked_jsd_compiled", "liger"],
    4096: ["matmul", "matmul@96", "naive", "seed_topk", "chunked", "chunked_compiled", "chunked@96", "topk",
           "topk@96", "topk_cache", "liger"],
    8192: ["matmul@96", "chunked@96"],
}
NAIVE_LIKE = ("naive", "seed_topk", "full")


# ---------------------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------------------

def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _seed_losses():
    """Seed 000's two losses (tutorial code, kept verbatim in behaviour) as callables on [N, V] logits."""
    import torch
    import torch.nn as nn

    class DistillationLoss(nn.Module):
        def __init__(self, alpha=0.5, temperature=1.0):
            super().__init__()
            self.alpha, self.temperature = alpha, temperature
            self.kl_loss = nn.KLDivLoss(reduction="batchmean")
            self.ce_loss = nn.CrossEntropyLoss()

        def forward(self, student_logits, teacher_logits, labels):
            soft_teacher = torch.softmax(teacher_logits / self.temperature, dim=-1)
            soft_student = torch.log_softmax(student_logits / self.temperature, dim=-1)
            kl = self.kl_loss(soft_student, soft_teacher) * (self.temperature ** 2)
            ce = self.ce_loss(student_logits.view(-1, student_logits.size(-1)), labels.view(-1))
            return self.alpha * kl + (1 - self.alpha) * ce

    class DistillationLossWithTopK(DistillationLoss):
        def __init__(self, alpha=0.5, temperature=1.0, topk=64):
            super().__init__(alpha, temperature)
            self.topk = topk

        def forward(self, student_logits, teacher_logits, labels):
            student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
            topk_vals, topk_idx = torch.topk(teacher_logits, self.topk, dim=-1)
            mask = torch.full_like(teacher_logits, float("-inf"))
            mask.scatter_(1, topk_idx, topk_vals)
            return super().forward(student_logits, mask, labels)

    return DistillationLoss(), DistillationLossWithTopK()


def worker(method: str, n: int, chunk_size: int, top_k: int, device: str = "cpu", layout: str = "auto") -> dict:
    import torch

    sys.path.insert(0, ROOT)
    from ds_distill.losses import chunk_layout, distill_loss

    layout = chunk_layout(layout)
    vocab_major = layout == "vocab_major"

    gpu = device != "cpu"
    dt_in = torch.bfloat16 if gpu else torch.float32  # GPU: bf16 inputs and matmuls, fp32 softmax statistics
    if not gpu:
        torch.set_num_threads(2)
    torch.manual_seed(0)
    hs = torch.randn(n, HS, device=device, dtype=dt_in).requires_grad_(True)
    ws = (torch.randn(V, HS, device=device) * 0.05).to(dt_in).requires_grad_(True)
    ht = torch.randn(n, HT, device=device, dtype=dt_in)
    wt = (torch.randn(V, HT, device=device) * 0.05).to(dt_in)
    labels = torch.randint(0, V, (n,), device=device)
    kw = dict(vocab_size=V, alpha=0.5, temperature=1.0, chunk_size=chunk_size, top_k=top_k, layout=layout)
    extra = {}

    if method == "topk_cache":  # what launch/cache_teacher.py would have stored: ids + log-probs at T = 1
        ids, lps = [], []
        with torch.no_grad():
            for c0 in range(0, n, 512):
                lp = torch.log_softmax((ht[c0:c0 + 512] @ wt.T).float(), -1)
                v, i = lp.topk(top_k, dim=1)
                ids.append(i)
                lps.append(v)
        extra["teacher_topk"] = (torch.cat(ids), torch.cat(lps))
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0,
                                        compiled=True, chunk_size=1024)
        t0 = time.perf_counter()
        m = min(n, 1024)  # warm-up: compiles the per-chunk graph for the same [1024, .] chunk shapes
        liger(hs[:m].detach().requires_grad_(True), ws, ht[:m], wt, labels[:m]).backward()
        ws.grad = None
        extra["warmup_s"] = time.perf_counter() - t0
    compiled = method.endswith("_compiled")
    method_base = method.removesuffix("_compiled")
    if compiled:  # warm-up: compiles the slab function (dynamic shapes: every slab and chunk size reuses it)
        t0 = time.perf_counter()
        m = min(n, 64)
        div = "jsd" if method_base == "chunked_jsd" else "forward_kl"
        distill_loss(hs[:m].detach().requires_grad_(True), ws, labels[:m], teacher_hidden=ht[:m], teacher_weight=wt,
                     impl="chunked", divergence=div, beta=0.5, compiled=True, **kw).total.backward()
        ws.grad = None
        extra["warmup_s"] = time.perf_counter() - t0
    naive, seed_topk = _seed_losses()

    def step():
        if method in ("naive", "seed_topk"):
            s = hs @ ws.T  # [N, V]
            with torch.no_grad():
                t = ht @ wt.T  # [N, V]
            loss = (naive if method == "naive" else seed_topk)(s, t, labels)
            loss.backward()
            return loss
        if method == "liger":
            loss = liger(hs, ws, ht, wt, labels)
            loss.backward()
            return loss
        if method == "matmul2":  # the two lm_head GEMMs alone (student and teacher logits), chunked
            with torch.no_grad():
                for c0 in range(0, n, chunk_size):
                    if vocab_major:
                        s, t = ws @ hs[c0:c0 + chunk_size].T, wt @ ht[c0:c0 + chunk_size].T
                    else:
                        s, t = hs[c0:c0 + chunk_size] @ ws.T, ht[c0:c0 + chunk_size] @ wt.T
                    del s, t
            return hs[0, 0]
        if method == "matmul":
            grad_w = torch.zeros(V, HS, device=device, dtype=dt_in)
            grad_h = torch.empty(n, HS, device=device, dtype=dt_in)
            with torch.no_grad():
                for c0 in range(0, n, chunk_size):
                    h_c = hs[c0:c0 + chunk_size]
                    if vocab_major:  # the layout distill_loss uses (losses.chunk_layout)
                        g = (ws @ h_c.T).T
                        t = wt @ ht[c0:c0 + chunk_size].T
                    else:
                        g = h_c @ ws.T
                        t = ht[c0:c0 + chunk_size] @ wt.T
                    del t
                    torch.mm(g, ws, out=grad_h[c0:c0 + chunk_size])
                    grad_w.addmm_(g.T, h_c)
                    del g
            return grad_w[0, 0]
        if method == "topk_cache":
            out = distill_loss(hs, ws, labels, impl="topk", teacher_topk=extra["teacher_topk"], **kw)
        else:
            impl = {"chunked_jsd": "chunked"}.get(method_base, method_base)
            div = "jsd" if method_base == "chunked_jsd" else "forward_kl"
            out = distill_loss(hs, ws, labels, teacher_hidden=ht, teacher_weight=wt, impl=impl, divergence=div,
                               beta=0.5, compiled=compiled, **kw)
        (out.total / n).backward()
        return out.total / n

    if gpu:  # one untimed step first (kernel selection, compilation, allocator), then time a second one
        step()
        hs.grad = ws.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime  # the host's share (launches, Python)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        res = dict(method=method, n=n, chunk_size=chunk_size, layout=layout, seconds=round(dt, 4),
                   cpu_seconds=round(cpu, 4), peak_mb=round(peak), loss=float(loss.detach().float()),
                   inputs_mb=round(base / 2**20), device=torch.cuda.get_device_name())
        return res
    rss0 = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loss = step()
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime  # all threads: less sensitive to a busy box
    peak = _status_mb("VmHWM") - rss0
    res = dict(method=method, n=n, chunk_size=chunk_size, layout=layout, seconds=round(dt, 2),
               cpu_seconds=round(cpu, 2), peak_mb=round(peak), loss=float(loss.detach()), inputs_mb=round(rss0))
    if "warmup_s" in extra:
        res["warmup_s"] = round(extra["warmup_s"], 1)
    return res


# ---------------------------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------------------------

def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _fits(method: str, n: int, device: str = "cpu") -> tuple[bool, str]:
    if method not in NAIVE_LIKE or device != "cpu":
        return True, ""
    inputs = (V * (HS + HT) + n * (HS + HT)) * 4 / 2**20
    need = inputs + 6.5 * n * V * 4 / 2**20  # ~6 live [N, V] fp32 tensors at the peak (14.3 GB at N = 4096)
    avail = _mem_available_mb()
    if need > avail - 1024:
        return False, f"needs ~{need / 1024:.0f} GB, {avail / 1024:.0f} GB available"
    return True, ""


def run_one(spec: str, n: int, args) -> dict:
    """spec = method or method@chunk_size (e.g. chunked@256)."""
    method, _, chunk = spec.partition("@")
    ok, why = _fits(method, n, args.device)
    if not ok:
        return dict(method=spec, n=n, skipped=why)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n),
           "--chunk-size", chunk or str(args.chunk_size), "--top-k", str(args.top_k), "--device", args.device,
           "--layout", args.layout]
    load = os.getloadavg()[0]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(method=spec, n=n, skipped=f"timed out after {args.timeout} s")
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return dict(method=spec, n=n, skipped=f"failed (rc {p.returncode}): {' | '.join(tail)}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["method"] = spec
    res["load_before"] = round(load, 1)
    return res


def report(results: list[dict]) -> str:
    flops = {n: 2 * n * V * (HT + 3 * HS) for n in {r["n"] for r in results}}
    base = {(r["n"], r["method"]): r for r in results if "seconds" in r}
    # time ratios are taken to the matmul-only run at the same N (and the same chunk size when there is one)
    mm_by_chunk = {(r["n"], r["chunk_size"]): r for r in results
                   if r.get("method", "").split("@")[0] == "matmul" and "seconds" in r}
    gpu = any("device" in r for r in results)
    lines = ["| N | method | wall s | CPU s | x naive wall | x matmul-only wall (CPU) | x 2 lm_head GEMMs wall |"
             " x eager wall (CPU) | peak MB above inputs | x naive peak | peak minus the lm_head grad"
             " | load avg before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    grad_mb = V * HS * (2 if gpu else 4) / 2**20
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r['n']} | {r['method']} | - | - | - | - | - | - | - | - | - | {r['skipped']} |")
            continue
        naive = base.get((r["n"], "naive"))
        mm = mm_by_chunk.get((r["n"], r["chunk_size"]), base.get((r["n"], "matmul")))
        mm2 = base.get((r["n"], "matmul2"))
        tn = f"{r['seconds'] / naive['seconds']:.2f}" if naive else "-"
        tm = f"{r['seconds'] / mm['seconds']:.2f} ({r['cpu_seconds'] / mm['cpu_seconds']:.2f})" if mm else "-"
        t2 = f"{r['seconds'] / mm2['seconds']:.2f}" if mm2 else "-"
        pn = f"1/{naive['peak_mb'] / max(r['peak_mb'], 1):.1f}" if naive else "-"
        name, _, chunk = r["method"].partition("@")
        eager = base.get((r["n"], name.removesuffix("_compiled") + ("@" + chunk if chunk else "")))
        te = (f"{r['seconds'] / eager['seconds']:.2f} ({r['cpu_seconds'] / eager['cpu_seconds']:.2f})"
              if eager and name.endswith("_compiled") else "-")
        lines.append(f"| {r['n']} | {r['method']} | {r['seconds']:.4g} | {r['cpu_seconds']:.4g} | {tn} | {tm} | {t2} |"
                     f" {te} | {r['peak_mb']} | {pn} | {r['peak_mb'] - grad_mb:.0f} | {r.get('load_before', '-')} |")
    lines.append("")
    for n, f in sorted(flops.items()):
        mm = base.get((n, "matmul"))
        rate = f"{f / mm['seconds'] / 1e9:.0f} GFLOP/s measured by `matmul`" if mm else "no matmul run"
        lines.append(f"- N={n}: the loss's GEMMs are {f / 1e12:.2f} TFLOP ({rate}).")
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, ROOT)
    from ds_distill.losses import LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", help="token counts (default: the plan in DEFAULT_PLAN)")
    ap.add_argument("--methods", nargs="*", help="methods to run at every N (default: the plan)")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per method run")
    ap.add_argument("--json", help="append every result as a JSON line to this file")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 inputs; CUDA events timing, "
                    "torch.cuda peak memory above the inputs; one warm-up step per method)")
    ap.add_argument("--layout", default="auto", choices=LAYOUTS,
                    help="chunk logits layout of ds_distill's chunked/topk losses and of the matmul rows "
                         "(loss.layout, losses.chunk_layout); auto = token_major")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n[0], args.chunk_size, args.top_k, args.device, args.layout)))
        return
    plan = {n: (args.methods or DEFAULT_PLAN.get(n, DEFAULT_PLAN[4096])) for n in (args.n or DEFAULT_PLAN)}
    results = []
    t0 = time.time()
    for n, methods in plan.items():
        for m in methods:
            r = run_one(m, n, args)
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    print(f"\ntotal wall time {time.time() - t0:.0f} s, chunk_size {args.chunk_size}, top_k {args.top_k}\n")
    print(report(results))


if __name__ == "__main__":
    main()
