"""What the model heads (ds_distill/heads.py) cost in the chunked fused loss, side by side in one process.

    python benchmarks/head_overhead.py [--baseline_ref main] [--n 512] [--hidden 256] [--vocab 151936] [--pairs 7]

Times forward+backward of `distill_loss(impl="chunked")` (alpha 0.5, T 2, forward KL, fp32, the trainer
benchmark's student/teacher hidden sizes 256/512 and the Qwen vocabulary) for:
  baseline   the losses.py of git ref --baseline_ref (before heads existed), plain head
  plain      this checkout, plain head (no bias, identity transform): must cost the same as the baseline
  softcap    Gemma-2-like softcap on both models; scale: Cohere-like scale; bias: a student lm_head bias
Runs are alternated (baseline, plain, softcap, scale, bias) `--pairs` times; medians and ratios to the baseline.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def baseline_module(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:ds_distill/losses.py"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    if "from .heads" in src:
        raise SystemExit(f"--baseline_ref {ref} already has heads: give a ref from before them")
    path = Path(tempfile.mkdtemp()) / "baseline_losses.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_losses", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_losses"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline_ref", default="main")
    ap.add_argument("--n", type=int, default=512, help="trained positions per call")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--teacher_hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--chunk_size", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=7)
    args = ap.parse_args()

    from ds_distill import losses
    from ds_distill.heads import HeadTransform

    base = baseline_module(args.baseline_ref)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(args.n, args.hidden, generator=g)
    ws = torch.randn(args.vocab, args.hidden, generator=g) * 0.05
    ht = torch.randn(args.n, args.teacher_hidden, generator=g)
    wt = torch.randn(args.vocab, args.teacher_hidden, generator=g) * 0.05
    bias = torch.randn(args.vocab, generator=g) * 0.1
    labels = torch.randint(0, args.vocab, (args.n,), generator=g)
    common = dict(teacher_hidden=ht, teacher_weight=wt, vocab_size=args.vocab, alpha=0.5, temperature=2.0,
                  impl="chunked", chunk_size=args.chunk_size)
    cap, scale = HeadTransform(softcap=30.0), HeadTransform(scale=0.0625)
    variants = {
        "baseline": lambda h, w, b: base.distill_loss(h, w, labels, **common),
        "plain": lambda h, w, b: losses.distill_loss(h, w, labels, **common),
        "softcap": lambda h, w, b: losses.distill_loss(h, w, labels, student_transform=cap, teacher_transform=cap,
                                                       **common),
        "scale": lambda h, w, b: losses.distill_loss(h, w, labels, student_transform=scale,
                                                     teacher_transform=scale, **common),
        "bias": lambda h, w, b: losses.distill_loss(h, w, labels, student_bias=b, **common),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.pairs + 1):  # the first round warms up and is dropped
        for name, fn in variants.items():
            h, w, b = (x.clone().requires_grad_(True) for x in (hs, ws, bias))
            t0 = time.perf_counter()
            fn(h, w, b).total.backward()
            if i:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["baseline"])
    print(f"N {args.n}, hidden {args.hidden}/{args.teacher_hidden}, V {args.vocab}, chunk {args.chunk_size}, "
          f"{torch.get_num_threads()} threads, {args.pairs} alternated rounds (median s, ratio to baseline):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:9s} {med:7.3f} s  {med / ref:5.3f}x   (min {min(ts):.3f}, max {max(ts):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
