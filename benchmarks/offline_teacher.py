"""Training throughput with the teacher online vs from the offline top-k cache, side by side in one process.

    python benchmarks/offline_teacher.py [--out /tmp/offline_teacher_bench] [--steps 10] [--seq 256] [--threads 1]
                                         [--zero_stage 3] [--teacher_cost 4.0 | --teacher_intermediate 1792]

What it does, all at world size 1 on whatever device DeepSpeed picks (CPU here: fp32):
1. builds a tokenizer (byte-level BPE, 1000 tokens) and two Qwen3 models from configs, and text data whose samples
   all fill --seq tokens. The teacher has 2x the student's hidden size and the same depth; its MLP width is
   calibrated on the machine (`calibrate_teacher`) so that the measured CPU-time ratio of a teacher forward to a
   student forward reaches --teacher_cost (default 4.0, the issue's "about 4x"): FLOPs do not fix it (a teacher
   with 4x the student's layer FLOPs measures 3.5-3.6x, and one shape measured 4.0x on one machine, 3.5x on
   another). --teacher_intermediate fixes the width instead;
2. writes the teacher cache (k = 64, fp16) with launch/cache_teacher.py's `write_cache`, timed;
3. builds two runs with trainer.build from one config: online (teacher.path, loss.impl topk, k = 64) and cached
   (teacher.cache, same loss), and alternates optimizer steps between them (online, cached, online, ...) so both see
   the same background load; tokens/s is the median over steps after --warmup of trainer.train_step's wall time,
   and tokens per CPU-second the same from the process's CPU time (with --threads 1 it equals wall time on an idle
   machine, and stays stable when other jobs share the cores).
Prints a table and writes <out>/results.json. Record results in docs/BENCHMARKS.md ("Offline teacher").
"""
import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDENT = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
TEACHER = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1792)  # MLP width: calibrated unless given


def build_assets(out: Path, seq: int, n_samples: int, teacher_cost: float | None) -> dict:
    """Tokenizer, student, data and teacher. With `teacher_cost` the teacher's MLP width is calibrated on this
    machine (see `calibrate_teacher`); otherwise TEACHER is used as it is."""
    from ds_distill.tiny import build_model, build_tokenizer, stdlib_files

    tok = build_tokenizer(out / "tokenizer", vocab_size=1000, files=stdlib_files(limit=60))
    rows = (len(tok) + 63) // 64 * 64
    build_model(out / "student", tok, vocab_rows=rows, tie=True, seed=2, **STUDENT)
    # text samples long enough to fill `seq` tokens (about 3 characters per token): every micro-batch is full
    texts, buf = [], ""
    for f in stdlib_files()[60:]:
        buf += f.read_text(encoding="utf-8", errors="replace")
        while len(buf) > 6 * seq:
            texts.append(buf[:6 * seq])
            buf = buf[6 * seq:]
        if len(texts) >= n_samples:
            break
    with open(out / "train.jsonl", "w") as f:
        for t in texts[:n_samples]:
            f.write(json.dumps({"text": t}) + "\n")
    assets = {"tokenizer": str(out / "tokenizer"), "teacher": str(out / "teacher"), "student": str(out / "student"),
              "train": str(out / "train.jsonl")}

    def build_teacher():
        build_model(out / "teacher", tok, vocab_rows=rows, tie=False, seed=1, **TEACHER)

    if teacher_cost is None:
        build_teacher()
        assets["ratio"], assets["calibration"] = forward_cost_ratio(assets, seq), []
    else:
        assets["ratio"], assets["calibration"] = calibrate_teacher(assets, seq, teacher_cost, build_teacher)
    return assets


def calibrate_teacher(assets: dict, seq: int, target: float, build_teacher) -> tuple[float, list]:
    """Widen the teacher's MLP (TEACHER["intermediate"], in steps of 256 from 1536 = 3x its hidden size) until its
    forward's measured CPU time reaches `target` x the student's, and keep the width whose ratio is closest to the
    target (in log terms). The issue defines the teacher by its cost, not its shape; the same shape measured 4.0-4.1x
    on one machine and 3.5x on another. Returns (ratio, [(width, ratio), ...] tried) and leaves that teacher built."""
    tried = []
    for width in range(1536, 4096 + 1, 256):
        TEACHER["intermediate"] = width
        build_teacher()
        tried.append((width, forward_cost_ratio(assets, seq)))
        print(f"teacher MLP {width}: forward {tried[-1][1]:.2f}x the student's", flush=True)
        if tried[-1][1] >= target:
            break
    width, ratio = min(tried, key=lambda wr: abs(math.log(wr[1] / target)))
    if width != tried[-1][0]:
        TEACHER["intermediate"] = width
        build_teacher()
    return ratio, tried


def forward_cost_ratio(assets: dict, seq: int, reps: int = 11) -> float:
    """CPU seconds of a teacher forward / a student forward on the same [4, seq] batch (plain HF, no DeepSpeed),
    alternating the two models `reps` times and taking each one's median."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 900, (4, seq))
    models = {name: AutoModelForCausalLM.from_pretrained(assets[name], dtype=torch.float32).eval()
              for name in ("teacher", "student")}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(reps + 1):
            for name, m in models.items():
                t0 = time.process_time()
                m.model(input_ids=ids)
                times[name].append(time.process_time() - t0)
    return statistics.median(times["teacher"][1:]) / statistics.median(times["student"][1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/offline_teacher_bench")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per mode (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="tokens per sample (max_length)")
    ap.add_argument("--micro_batch_size", type=int, default=4)
    ap.add_argument("--grad_accum_steps", type=int, default=2)
    ap.add_argument("--top_k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zero_stage", type=int, default=3, choices=[0, 1, 2, 3], help="the student's ZeRO stage")
    ap.add_argument("--teacher_layers", type=int, default=TEACHER["layers"],
                    help="teacher depth (4: ~4x the student's forward FLOPs; 8: ~8x)")
    ap.add_argument("--teacher_intermediate", type=int, default=None,
                    help="teacher MLP width; default: calibrated on this machine to --teacher_cost")
    ap.add_argument("--teacher_cost", type=float, default=4.0,
                    help="target CPU-time ratio of a teacher forward to a student forward (the issue's 'about 4x'); "
                         "the teacher's MLP is widened until it is met (ignored with --teacher_intermediate)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29731")
    from ds_distill import cache_writer, engines, trainer
    from ds_distill.config import parse_config

    TEACHER["layers"] = args.teacher_layers
    if args.teacher_intermediate:
        TEACHER["intermediate"] = args.teacher_intermediate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total_steps = args.steps + args.warmup
    n_samples = total_steps * args.micro_batch_size * args.grad_accum_steps
    assets = build_assets(out, args.seq, n_samples, None if args.teacher_intermediate else args.teacher_cost)
    ratio = assets["ratio"]

    def cfg(name: str, teacher: dict):
        d = {"teacher": teacher, "student": {"path": assets["student"]}, "tokenizer_path": assets["tokenizer"],
             "data": {"train_files": [assets["train"]], "format": "text", "max_length": args.seq},
             "loss": {"alpha": 0.5, "temperature": 1.0, "impl": "topk", "top_k": args.top_k, "chunk_size": 1024},
             "train": {"micro_batch_size": args.micro_batch_size, "grad_accum_steps": args.grad_accum_steps,
                       "max_steps": total_steps, "lr": 1e-3, "zero_stage": args.zero_stage},
             "checkpoint": {"resume": "never"}, "output_dir": str(out / name), "overwrite_output_dir": True}
        path = out / f"{name}.json"
        path.write_text(json.dumps(d))
        return parse_config(["--config", str(path)])

    online_cfg = cfg("online", {"path": assets["teacher"], "ds_config": str(Path(__file__).resolve().parents[1]
                                                                            / "ds_configs" / "teacher_zero3.json")})
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # always a fresh write: its time is measured (and the teacher may
    # differ from the last run's, which write_cache would rightly refuse)
    t0 = time.perf_counter()
    manifest = cache_writer.write_cache(online_cfg, str(cache_dir), top_k=args.top_k, dtype="fp16")
    cache_s = time.perf_counter() - t0
    cached_cfg = cfg("cached", {"cache": str(cache_dir)})

    runs = {"online": trainer.build(online_cfg), "cached": trainer.build(cached_cfg)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    cpu_seconds: dict[str, list[float]] = {k: [] for k in runs}
    tokens: dict[str, float] = {}
    for step in range(total_steps):
        for name, run in runs.items():
            mbs = [next(run.stream) for _ in range(args.grad_accum_steps)]
            t0, c0 = time.perf_counter(), time.process_time()
            sums = trainer.train_step(run, mbs)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if step >= args.warmup:
                seconds[name].append(dt)
                cpu_seconds[name].append(dc)
            tokens[name] = sums.global_seq_tokens
            print(f"step {step + 1} {name:>6}: {dt:6.2f} s wall, {dc:6.2f} s CPU, loss "
                  f"{sums.total / sums.tokens:.4f}", flush=True)

    res = {"tokens_per_step": tokens["online"], "seq": args.seq, "micro_batch_size": args.micro_batch_size,
           "grad_accum_steps": args.grad_accum_steps, "top_k": args.top_k, "threads": args.threads,
           "student_zero_stage": args.zero_stage,
           "device": str(engines.device()), "teacher_over_student_forward": ratio,
           "teacher_calibration": assets["calibration"],
           "student": STUDENT, "teacher": TEACHER,
           "cache_write_s": manifest["seconds_last_run"], "cache_write_s_with_startup": cache_s,
           "cache_tokens": manifest["num_positions"] + manifest["num_samples"],
           "cache_bytes_per_token": manifest["bytes_per_token"], "cache_bytes_on_disk": manifest["bytes_on_disk"]}
    for name in runs:
        med, cmed = statistics.median(seconds[name]), statistics.median(cpu_seconds[name])
        res[name] = {"median_step_s": med, "tokens_per_s": tokens[name] / med, "median_step_cpu_s": cmed,
                     "tokens_per_cpu_s": tokens[name] / cmed, "steps_s": seconds[name],
                     "steps_cpu_s": cpu_seconds[name]}
    res["speedup"] = res["cached"]["tokens_per_s"] / res["online"]["tokens_per_s"]
    res["speedup_cpu"] = res["cached"]["tokens_per_cpu_s"] / res["online"]["tokens_per_cpu_s"]
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"\nteacher forward / student forward: {ratio:.2f}x (measured, plain HF, [4, {args.seq}] batch)")
    write_s = manifest["seconds_last_run"]
    print(f"cache write: {res['cache_tokens']} tokens in {write_s:.1f} s ({res['cache_tokens'] / write_s:.0f} "
          f"tokens/s; {cache_s:.1f} s with engine start-up), {manifest['bytes_per_token']} B/token")
    print(f"{'mode':>8} {'s/step':>8} {'tokens/s':>9} {'CPU s/step':>11} {'tokens/CPU-s':>13}   (medians)")
    for name in runs:
        r = res[name]
        print(f"{name:>8} {r['median_step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['median_step_cpu_s']:11.3f} "
              f"{r['tokens_per_cpu_s']:13.0f}")
    print(f"speedup cached / online: {res['speedup']:.2f}x wall, {res['speedup_cpu']:.2f}x CPU time")
    engines.shutdown()


if __name__ == "__main__":
    main()
