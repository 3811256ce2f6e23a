"""The teacher on its own ranks (teacher.placement: separate) against the colocated teacher, in one invocation.

    python benchmarks/teacher_apart.py --served_bytes [--hidden 4096] [--vocab 151936] [--k 64] [--tokens 1024]
    python benchmarks/teacher_apart.py [--out /tmp/teacher_apart_bench] [--steps 8] [--warmup 2] [--seq 128]
                                       [--teacher_cost 4.0 | --teacher_intermediate N] [--students 2]

0. --served_bytes: only the served teacher's wire cost (no training runs): what one token costs when the teacher is
   behind a server (top-k ids + log-probs), as the JSON answer of the protocol actually spoken (vLLM's completions
   with prompt_logprobs: ds_distill/served_teacher.py) and as ds_distill's binary answer, measured by serialising an
   answer for --tokens tokens with realistic ids (up to --vocab) next to hidden states (--hidden x 2 bytes, bf16)
   and full logits; plus the host time to build and parse them. --json writes the numbers.
1. Bytes per token the student side receives from its teacher, by payload: final hidden states (H x dtype, what
   separate ranks send), the top-k of an offline cache or a served teacher (k x (4-byte id + 2-byte fp16 log-prob))
   and full logits (V x dtype): for this benchmark's teacher and for a Qwen3-32B-sized teacher (H 5120, V 151936,
   bf16). Arithmetic from the shapes; the separate run's own timeline confirms the hidden-state shape it sent.
2. Two training runs of the same config through the deepspeed launcher, one after the other: colocated on
   --students ranks, and separate on --students + 1 ranks (one ZeRO-3 teacher rank). The teacher is the
   offline_teacher benchmark's, calibrated to --teacher_cost x the student's forward (default 4x). Per optimizer
   step, the time a student rank spends waiting for the teacher: colocated, the teacher's forward and head gather
   inside the step (timed by this script's driver around teachers.EngineTeacher.side); separate, `wait_s` of the
   student's timeline (output_dir/teacher_apart). Medians over steps after --warmup, mean over student ranks; the
   ratio separate / colocated; and each run's median tokens/s from metrics.jsonl.
On CPU the separate run's teacher rank competes with the students for the same cores (one process per rank), so its
tokens/s is not the GPU picture: on GPUs the teacher has its own devices. Record results in docs/BENCHMARKS.md
("The teacher on its own ranks").
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

QWEN3_32B = {"hidden": 5120, "vocab": 151936, "bytes": 2}


def payload_bytes(hidden: int, vocab: int, dtype_bytes: int, top_k: int = 64) -> dict:
    """Bytes per token of each teacher payload."""
    return {"hidden": hidden * dtype_bytes, "topk": top_k * (4 + 2), "logits": vocab * dtype_bytes}


def driver(timing_dir: str, argv: list[str]) -> int:
    """One rank of a colocated run: time the teacher's side of every micro-batch (forward + head gather, until the
    student forward may start), then run launch/train.py's main."""
    import torch

    from ds_distill import teachers

    rank = int(os.environ.get("RANK", "0"))
    log = open(os.path.join(timing_dir, f"colocated_rank{rank}.jsonl"), "a")
    original = teachers.EngineTeacher.side

    @contextlib.contextmanager
    def timed(self, batch, payload, dev):
        t0 = time.perf_counter()
        with original(self, batch, payload, dev) as kwargs:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            log.write(json.dumps({"wait_s": time.perf_counter() - t0}) + "\n")
            log.flush()
            yield kwargs

    teachers.EngineTeacher.side = timed
    sys.argv = [str(ROOT / "launch" / "train.py")] + argv
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_main", ROOT / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def per_step(waits: list[float], accum: int, warmup: int) -> float:
    """Median over steps (after warmup) of the summed waits of each step's micro-batches."""
    steps = [sum(waits[i:i + accum]) for i in range(0, len(waits) - accum + 1, accum)]
    return statistics.median(steps[warmup:])


def served_bytes_per_token(hidden: int, vocab: int, k: int, tokens: int = 1024, seed: int = 0) -> dict:
    """Bytes per token: hidden states (bf16), full logits (bf16), top-k binary (int32 ids + fp16 / fp32 log-probs,
    the offline cache's layout), and the served protocol's JSON answer and request (measured)."""
    import torch

    from ds_distill.served_protocol import binary_answer, parse_prompt_logprobs, read_binary_answer
    from ds_distill.teacher_server import completion_response

    g = torch.Generator().manual_seed(seed)
    n_prompts = max(1, tokens // 256)
    per = tokens // n_prompts
    prompts = [torch.randint(0, vocab, (per,), generator=g).tolist() for _ in range(n_prompts)]
    rows = []
    for _ in prompts:  # [per-1, k]: distinct ids below V, log-probs of total mass < 1 (fp32 values, full length)
        ids = torch.randint(0, vocab - 64 * 37, (per - 1, 1), generator=g) + torch.arange(k) * 37
        lps = torch.log_softmax(torch.randn(per - 1, k, generator=g) * 3, -1) - 0.5
        rows.append((ids, lps))
    t0 = time.perf_counter()  # the server's cost: build and serialise the answer
    answer = json.dumps(completion_response("teacher", prompts, rows)).encode()
    serve_s = time.perf_counter() - t0
    request = json.dumps({"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k}).encode()
    n_rows = sum(per - 1 for _ in prompts)

    t0 = time.perf_counter()  # the client's cost: decode the JSON and read every prompt's rows
    choices = json.loads(answer)["choices"]
    for p, c in zip(prompts, choices):
        parse_prompt_logprobs(c["prompt_logprobs"], len(p), k, "bench")
    parse_us = (time.perf_counter() - t0) / n_rows * 1e6
    t0 = time.perf_counter()  # the same rows as ds_distill's binary answer (serve_teacher's default for our client)
    binary = binary_answer(rows, k)
    read_binary_answer(binary, prompts, k)
    binary_us = (time.perf_counter() - t0) / n_rows * 1e6
    return {
        "hidden_bf16": hidden * 2, "logits_bf16": vocab * 2,
        "topk_fp16": k * (4 + 2), "topk_fp32": k * (4 + 4),
        "served_json_answer": len(answer) / n_rows, "served_json_request": len(request) / (n_prompts * per),
        "served_binary_answer": len(binary) / n_rows,
        "client_parse_us_per_token": parse_us, "server_json_us_per_token": serve_s / n_rows * 1e6,
        "binary_both_sides_us_per_token": binary_us,
    }


def served_main(args) -> int:
    b = served_bytes_per_token(args.hidden, args.vocab, args.k, args.tokens)
    print(f"bytes per token, H={args.hidden}, V={args.vocab}, k={args.k} (ratio: / hidden states bf16)")
    for name, v in b.items():
        if name.endswith("_us_per_token"):
            print(f"  {name:22s} {v:12.1f}   (microseconds of host time per token, not bytes)")
            continue
        print(f"  {name:22s} {v:12.1f}   x {v / b['hidden_bf16']:.3g}")
    print(f"  full logits / hidden states: {b['logits_bf16'] / b['hidden_bf16']:.1f}x; JSON answer / binary top-k "
          f"fp16: {b['served_json_answer'] / b['topk_fp16']:.1f}x; JSON / binary answer: "
          f"{b['served_json_answer'] / b['served_binary_answer']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bytes_per_token": b}, f, indent=1)
    return 0


def main(argv=None) -> int:
    if argv is None and "--driver" in sys.argv:  # a rank of the colocated run (deepspeed puts --local_rank first)
        i = sys.argv.index("--driver")
        return driver(sys.argv[i + 1], sys.argv[1:i] + sys.argv[i + 2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/teacher_apart_bench")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro_batch_size", type=int, default=2)
    ap.add_argument("--grad_accum_steps", type=int, default=2)
    ap.add_argument("--students", type=int, default=2)
    ap.add_argument("--teacher_intermediate", type=int, default=None)
    ap.add_argument("--teacher_cost", type=float, default=4.0)
    ap.add_argument("--served_bytes", action="store_true", help="only part 0: the served protocol's bytes per token")
    ap.add_argument("--hidden", type=int, default=4096, help="--served_bytes: teacher hidden size H (Qwen3-8B: 4096)")
    ap.add_argument("--vocab", type=int, default=151936, help="--served_bytes: lm_head rows V (Qwen3: 151936)")
    ap.add_argument("--k", type=int, default=64, help="--served_bytes: top-k of the served / cached teacher")
    ap.add_argument("--tokens", type=int, default=1024, help="--served_bytes: tokens in the measured JSON answer")
    ap.add_argument("--json", default=None, help="--served_bytes: write the numbers here")
    args = ap.parse_args(argv)
    if args.served_bytes:
        return served_main(args)

    import offline_teacher as ot

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.teacher_intermediate:
        ot.TEACHER["intermediate"] = args.teacher_intermediate
    total = args.steps + args.warmup
    n = total * args.micro_batch_size * args.grad_accum_steps * args.students
    assets = ot.build_assets(out, args.seq, n, None if args.teacher_intermediate else args.teacher_cost)

    def config(name: str, teacher: dict) -> str:
        d = {"teacher": {"path": assets["teacher"], "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json"),
                         **teacher},
             "student": {"path": assets["student"]}, "tokenizer_path": assets["tokenizer"],
             "data": {"train_files": [assets["train"]], "format": "text", "max_length": args.seq},
             "loss": {"alpha": 0.5, "temperature": 1.0, "impl": "chunked", "chunk_size": 1024},
             "train": {"micro_batch_size": args.micro_batch_size, "grad_accum_steps": args.grad_accum_steps,
                       "max_steps": total, "lr": 1e-3, "zero_stage": 3},
             "eval": {"generations": 0}, "checkpoint": {"resume": "never"}, "output_dir": str(out / name),
             "overwrite_output_dir": True}
        path = out / f"{name}.json"
        path.write_text(json.dumps(d))
        return str(path)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ds = str(Path(sys.executable).parent / "deepspeed")
    timing = out / "timing"
    timing.mkdir(exist_ok=True)
    for f in timing.glob("*.jsonl"):
        f.unlink()
    res: dict = {"teacher_over_student_forward": assets["ratio"], "teacher": ot.TEACHER, "student": ot.STUDENT,
                 "seq": args.seq, "micro_batch_size": args.micro_batch_size,
                 "grad_accum_steps": args.grad_accum_steps, "students": args.students}
    for name, nprocs, cmd in (
            ("colocated", args.students, [__file__, "--driver", str(timing), "--config", config("colocated", {})]),
            ("separate", args.students + 1,
             [str(ROOT / "launch" / "train.py"), "--config", config("separate", {"placement": "separate",
                                                                                 "ranks": 1})])):
        t0 = time.time()
        proc = subprocess.run([ds, "--num_gpus", str(nprocs), "--master_port", str(29800 + nprocs), *cmd], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            raise SystemExit(f"{name} run failed (exit {proc.returncode})")
        rows = [json.loads(line) for line in open(out / name / "metrics.jsonl") if '"loss/total"' in line]
        res[name] = {"launch_s": time.time() - t0,
                     "median_tokens_per_s": statistics.median(r["tokens_per_sec"] for r in rows[args.warmup:])}
        if name == "colocated":
            files = sorted(timing.glob("colocated_rank*.jsonl"))
        else:
            files = sorted((out / name / "teacher_apart").glob("student_rank*.jsonl"))
        waits = [[json.loads(line)["wait_s"] for line in open(f)] for f in files]
        res[name]["wait_s_per_step"] = statistics.mean(per_step(w, args.grad_accum_steps, args.warmup) for w in waits)
        res[name]["loss_last"] = rows[-1]["loss/total"]
    res["wait_ratio_separate_over_colocated"] = res["separate"]["wait_s_per_step"] / res["colocated"]["wait_s_per_step"]
    res["tokens_per_s_ratio_separate_over_colocated"] = (res["separate"]["median_tokens_per_s"]
                                                         / res["colocated"]["median_tokens_per_s"])
    t_cfg = json.load(open(Path(assets["teacher"]) / "config.json"))
    res["bytes_per_token"] = {"this teacher (fp32)": payload_bytes(t_cfg["hidden_size"], t_cfg["vocab_size"], 4),
                              "Qwen3-32B (bf16)": payload_bytes(QWEN3_32B["hidden"], QWEN3_32B["vocab"], 2)}
    (out / "results.json").write_text(json.dumps(res, indent=1))

    print(f"teacher forward / student forward: {assets['ratio']:.2f}x (measured, plain HF)")
    print(f"{'bytes/token':>20} {'hidden':>8} {'top-64':>8} {'logits':>9} {'logits/hidden':>14} {'hidden/top-k':>13}")
    for name, b in res["bytes_per_token"].items():
        print(f"{name:>20} {b['hidden']:8d} {b['topk']:8d} {b['logits']:9d} {b['logits'] / b['hidden']:14.1f} "
              f"{b['hidden'] / b['topk']:13.2f}")
    print(f"{'placement':>10} {'wait s/step':>12} {'tokens/s':>9}   (medians after {args.warmup} warmup steps)")
    for name in ("colocated", "separate"):
        r = res[name]
        print(f"{name:>10} {r['wait_s_per_step']:12.4f} {r['median_tokens_per_s']:9.0f}")
    print(f"student wait, separate / colocated: {res['wait_ratio_separate_over_colocated']:.3f}; "
          f"tokens/s separate / colocated: {res['tokens_per_s_ratio_separate_over_colocated']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
