"""The demo: distillation beats plain training of the same student, on real text, offline, on 2 CPU cores.

    python launch/demo.py                       # about 6 minutes on an idle 2-core machine; outputs in runs/demo
    python launch/demo.py --out DIR --quick     # a reduced run (about 3 minutes) that checks the plumbing

What it does, with progress on the console:
  1. corpus: the Python standard library's own sources (present wherever Python is), split BY FILE into training
     and held-out files (every 10th file held out), cut into ~max_length-token records (8000 for training, 400
     held out, spread evenly over the files); a byte-level BPE tokenizer is trained on the training records only
  2. teacher: a small Qwen3 trained from scratch with the project's trainer, CE only (loss.alpha 0)
       deepspeed --num_gpus 2 launch/train.py --config DIR/teacher.yaml
  3. two students of the same smaller shape, same initial weights, data order and step budget:
       CE student  loss.alpha 0                                (plain training)
       KD student  loss.alpha A, loss.temperature T, teacher = step 2's export
  4. held-out evaluation of teacher, student before, CE student and KD student (launch/eval.py), generations side by
     side; prints the table and writes DIR/results.json, DIR/results.md (each run also has its report.md)

Everything runs in fp32 on CPU (bf16 matmuls are emulated on most CPUs). With a GPU the same commands run there.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_distill import tiny  # noqa: E402

# Full-size defaults (the README's numbers come from these) and the --quick overrides.
DEFAULTS = dict(vocab_size=2048, max_length=128, micro_batch_size=8, train_records=8000, eval_records=400,
                teacher_steps=400, student_steps=200, lr=3e-3, student_lr=3e-3, alpha=0.7, temperature=2.0,
                teacher_shape=dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=352),
                student_shape=dict(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=128))
QUICK = dict(vocab_size=512, max_length=64, train_records=800, eval_records=80, teacher_steps=40, student_steps=20,
             teacher_shape=dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
             student_shape=dict(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64))
HELD_OUT_EVERY = 10


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. corpus and tokenizer
# ----------------------------------------------------------------------------------------------------------------

def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """Every HELD_OUT_EVERY-th file (sorted order) is held out: no line of a held-out file is ever trained on."""
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY // 2]
    return train, held


def chunk_file(path: Path, chars: int) -> list[str]:
    """Consecutive blocks of whole lines of about `chars` characters (blank-only blocks dropped)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= chars:
            out.append("".join(cur))
            cur, n = [], 0
    if cur and n >= chars // 4:
        out.append("".join(cur))
    return [c for c in out if c.strip()]


def build_corpus(out: Path, p: dict) -> dict:
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = tiny.stdlib_files()
    train_files, held_files = split_files(files)
    chars = int(p["max_length"] * 2.4)  # ~2.6 characters per token for code with a 2k BPE: most records fit
    train = [c for f in train_files for c in chunk_file(f, chars)]
    held = [c for f in held_files for c in chunk_file(f, chars)]
    # records spread evenly over all files of each side: the training set holds about as many records as the
    # teacher's steps consume (tokenizing more would only cost start-up time on every rank of every run), the
    # held-out set a fixed number (a bounded eval cost)
    train = train[::max(1, len(train) // p["train_records"])][:p["train_records"]]
    held = held[::max(1, len(held) // p["eval_records"])][:p["eval_records"]]
    tiny.write_jsonl(data / "train.jsonl", [{"text": t} for t in train])
    tiny.write_jsonl(data / "eval.jsonl", [{"text": t} for t in held])
    (data / "tokenizer_corpus.txt").write_text("".join(train), encoding="utf-8")  # the tokenizer sees train only
    tok = tiny.build_tokenizer(out / "tokenizer", vocab_size=p["vocab_size"], files=[data / "tokenizer_corpus.txt"])
    info = {"train_files": len(train_files), "held_out_files": len(held_files), "train_records": len(train),
            "eval_records": len(held), "train_chars": sum(map(len, train)), "tokenizer_size": len(tok)}
    log(f"corpus: {info['train_files']} training files -> {info['train_records']} records "
        f"({info['train_chars'] / 1e6:.1f} M chars); {info['held_out_files']} held-out files -> "
        f"{info['eval_records']} eval records; tokenizer {info['tokenizer_size']} tokens")
    return info


def build_models(out: Path, p: dict):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    rows = (len(tok) + 63) // 64 * 64
    t = tiny.build_model(out / "init" / "teacher", tok, vocab_rows=rows, tie=True, seed=1,
                         max_pos=p["max_length"], **p["teacher_shape"])
    s = tiny.build_model(out / "init" / "student", tok, vocab_rows=rows, tie=True, seed=p["seed"] + 2,
                         max_pos=p["max_length"], **p["student_shape"])
    nt, ns = (sum(x.numel() for x in m.parameters()) for m in (t, s))
    log(f"models: teacher {nt / 1e6:.2f} M parameters {p['teacher_shape']}, students {ns / 1e6:.2f} M "
        f"{p['student_shape']} (same initial weights for both)")
    return nt, ns


# ----------------------------------------------------------------------------------------------------------------
# 2-3. training runs through the project's own launcher
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed() -> str:
    cand = Path(sys.executable).parent / "deepspeed"
    return str(cand) if cand.exists() else (shutil.which("deepspeed") or "deepspeed")


def run_config(out: Path, name: str, p: dict, *, student: Path, steps: int, lr: float, alpha: float,
               teacher: Path | None, on_policy: dict | None = None) -> dict:
    d = out / "data"
    cfg = {
        "teacher": {"path": str(teacher) if teacher else None,
                    "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json")},
        "student": {"path": str(student)},
        "tokenizer_path": str(out / "tokenizer"),
        "data": {"train_files": [str(d / "train.jsonl")], "eval_files": [str(d / "eval.jsonl")], "format": "text",
                 "max_length": p["max_length"]},
        "loss": {"alpha": alpha, "temperature": p["temperature"], "divergence": "forward_kl", "impl": "chunked",
                 "chunk_size": 512},
        "train": {"micro_batch_size": p["micro_batch_size"], "grad_accum_steps": 1, "lr": lr,
                  "warmup_steps": max(1, steps // 20), "min_lr_ratio": 0.1, "max_steps": steps, "seed": p["seed"],
                  "zero_stage": p["zero_stage"], "precision": "fp32", "log_every": 1},
        "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
        # the whole held-out set at steps 0, steps/2 and the end (students); the teacher only at 0 and the end
        "eval": {"every_steps": 0 if name == "teacher" else max(1, steps // 2), "max_batches": 0,
                 "micro_batch_size": 16, "generations": 2, "max_new_tokens": 32},
        "output_dir": str(out / name),
        "overwrite_output_dir": True,
        "wandb": {"mode": "disabled"},
    }
    if on_policy:  # the on-policy arm: reverse KL on the student's own samples, scored by the teacher (T 1)
        cfg["on_policy"] = on_policy
        cfg["loss"].update({"alpha": 1.0, "divergence": "reverse_kl", "temperature": 1.0})
    return cfg


def _watch(metrics: Path, label: str, steps: int, stop: threading.Event, t0: float) -> None:
    """Print the run's progress from its metrics.jsonl (rank 0 writes a row per step) until stopped."""
    tty = sys.stdout.isatty()
    last_print = 0.0
    while not stop.wait(2.0):
        row = None
        try:
            with open(metrics) as f:
                for line in f:
                    if '"loss/total"' in line:
                        row = line
        except OSError:
            pass
        el = time.time() - t0
        if row is None:
            msg = f"  {label}: starting ({el:.0f} s)"
        else:
            r = json.loads(row)
            msg = f"  {label}: step {r['step']}/{steps}  loss {r['loss/total']:.3f}  ({el:.0f} s)"
        if tty:
            print("\r" + msg.ljust(70), end="", flush=True)
        elif time.time() - last_print >= 15:
            print(msg, flush=True)
            last_print = time.time()
    if tty:
        print("\r" + " " * 70 + "\r", end="", flush=True)


CPU_SECONDS: dict[str, float] = {}  # CPU time of each stage's processes (wall time on a busy machine misleads)


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_run(out: Path, name: str, label: str, cfg: dict) -> float:
    """One 2-rank training run; its full console output goes to DIR/logs/NAME.log. Returns seconds."""
    import yaml

    (out / "logs").mkdir(exist_ok=True)
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)  # a fresh run (and no stale metrics for the progress line)
    cfg_path = out / f"{name}.yaml"
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [_deepspeed(), "--num_gpus", "2", "--master_port", str(_free_port()), str(ROOT / "launch" / "train.py"),
           "--config", str(cfg_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    log(f"{label}: deepspeed --num_gpus 2 launch/train.py --config {cfg_path}")
    t0 = time.time()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(Path(cfg["output_dir"]) / "metrics.jsonl", label,
                                                    cfg["train"]["max_steps"], stop, t0), daemon=True)
    watcher.start()
    cpu0 = _children_cpu()
    with open(out / "logs" / f"{name}.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    stop.set()
    watcher.join()
    sec = time.time() - t0
    CPU_SECONDS[name] = _children_cpu() - cpu0
    if rc != 0:
        tail = (out / "logs" / f"{name}.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"{label} failed (exit {rc}); last lines of {out / 'logs' / (name + '.log')}:\n{tail}")
    log(f"{label}: done in {sec:.0f} s -> {cfg['output_dir']}/final (report: {cfg['output_dir']}/report.md)")
    return sec


# ----------------------------------------------------------------------------------------------------------------
# 4. evaluation
# ----------------------------------------------------------------------------------------------------------------

def final_eval(out: Path, p: dict) -> dict:
    cmd = [sys.executable, str(ROOT / "launch" / "eval.py"), "--teacher", str(out / "teacher" / "final"),
           "--student_before", str(out / "init" / "student"),
           "--model", str(out / "ce_student" / "final"), str(out / "kd_student" / "final"),
           "--names", "CE student", "KD student", "--data", str(out / "data" / "eval.jsonl"), "--format", "text",
           "--max_length", str(p["max_length"]), "--micro_batch_size", "16", "--chunk_size", "512",
           "--dtype", "fp32", "--generations", "2", "--max_new_tokens", "48", "--out", str(out / "eval")]
    log("evaluation: python launch/eval.py --teacher ... --model CE KD --student_before ... (held-out files)")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.time()
    cpu0 = _children_cpu()
    with open(out / "logs" / "eval.log", "w") as logf:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    CPU_SECONDS["eval"] = _children_cpu() - cpu0
    if rc != 0:
        tail = (out / "logs" / "eval.log").read_text(errors="replace")[-4000:]
        raise SystemExit(f"evaluation failed (exit {rc}):\n{tail}")
    res = json.loads((out / "eval" / "eval.json").read_text())["results"]
    log(f"evaluation: done in {time.time() - t0:.0f} s")
    return res


def on_policy_settings(p: dict, lmbda: float, start_step: int) -> dict:
    return {"lmbda": lmbda, "start_step": start_step, "max_new_tokens": p["max_length"] // 4,
            "prompt_length": p["max_length"] // 4, "temperature": 1.0}


def own_sample_kls(out: Path, p: dict, students: list[tuple[str, str]], prompts_n: int = 64) -> dict:
    """Each student's samples (T 1, a fixed seed) for the first `prompts_n` held-out records' first max_length / 4
    tokens, scored by the teacher: generation.own_sample_kl; plus the on-policy student's held-out perplexity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_distill import data, generation

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ds = data.build_dataset([str(out / "data" / "eval.jsonl")], "text", tok, p["max_length"])
    plen = p["max_length"] // 4
    prompts = [ds[i]["input_ids"][:plen] for i in range(min(prompts_n, len(ds)))]
    settings = generation.SamplingSettings(max_new_tokens=p["max_length"] // 4, temperature=1.0, top_p=1.0,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                           vocab_size=len(tok))
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    teacher = load(out / "teacher" / "final")
    res = {}
    for name, d in students:
        res[name] = generation.own_sample_kl(load(out / d / "final"), teacher, prompts, settings, seed=p["seed"],
                                             dev=torch.device("cpu"))
    # its held-out perplexity from its own final eval (the trainer's eval equals launch/eval.py: tests/test_demo.py)
    res["on-policy student"]["ppl"] = _final_ppl(out / "op_student")
    log("own-sample KL (teacher-scored, held-out prompts): " + ", ".join(f"{k} {v['kl']:.4f}" for k, v in res.items()))
    return res


def _final_ppl(run_dir: Path) -> float:
    """A run's held-out perplexity from its own final eval row (the trainer's eval equals launch/eval.py)."""
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval/student_ppl"' in line]
    return evals[-1]["eval/student_ppl"]


# everything the demo writes at the top of --out
DEMO_NAMES = ("data", "tokenizer", "init", "teacher", "ce_student", "kd_student", "op_student", "kd_continued",
              "rkl_continued", "logs", "eval", "corpus.json", "results.json", "results.md")
MARKER = ".ds_distill_demo"


def clear_out(out: Path) -> None:
    """Empty `out` of an earlier demo's files, and only those: --out may be any directory (even `.`), so a
    directory holding anything else and no marker file of the demo is refused instead of deleted."""
    foreign = [p.name for p in out.iterdir() if p.name not in DEMO_NAMES] if out.exists() else []
    if foreign and not (out / MARKER).is_file():
        raise SystemExit(f"[demo] error: --out '{out}' is not empty and was not made by the demo (no {MARKER}) -> "
                         "give a new or empty directory")
    for name in DEMO_NAMES:
        p = out / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by launch/demo.py: --out may be re-used by the demo\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"),
                    help="output directory: new, empty, or an earlier demo's (only the demo's files are replaced)")
    ap.add_argument("--quick", action="store_true", help="reduced sizes (~3 min): checks the plumbing only")
    ap.add_argument("--teacher_steps", type=int)
    ap.add_argument("--student_steps", type=int)
    ap.add_argument("--alpha", type=float, help="KD student's loss.alpha")
    ap.add_argument("--temperature", type=float, help="KD student's loss.temperature")
    ap.add_argument("--seed", type=int, default=0, help="train.seed of every run (data order); the students' "
                    "initial weights use seed + 2")
    ap.add_argument("--zero_stage", type=int, default=3, choices=[0, 1, 2, 3],
                    help="students' and teacher's ZeRO stage")
    ap.add_argument("--on_policy", type=float, default=0.0, metavar="LMBDA",
                    help="also train an on-policy student (on_policy.lmbda LMBDA, reverse KL, off-policy warm start "
                    "for the first quarter of the steps) and compare the teacher-scored KL on each student's own "
                    "samples for held-out prompts")
    ap.add_argument("--on_policy_from", choices=["init", "kd"], default="init",
                    help="init: the on-policy student starts from the same initial weights as the others (warm start "
                    "off-policy for the first quarter of its steps); kd: it starts from the KD student's export (a "
                    "competent student) for half the student steps, against the KD student continued off-policy "
                    "for the same steps from the same export, with the KD loss and with the on-policy arm's loss")
    ap.add_argument("--reuse_teacher", action="store_true",
                    help="keep DIR's corpus and trained teacher from an earlier run (for tuning the students)")
    args = ap.parse_args(argv)
    p = dict(DEFAULTS)
    if args.quick:
        p.update(QUICK)
    for k in ("teacher_steps", "student_steps", "alpha", "temperature", "zero_stage", "seed"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    out = Path(args.out).resolve()
    t_start = time.time()
    times = {}
    reuse = args.reuse_teacher and (out / "teacher" / "final" / "config.json").exists()
    if not reuse:
        clear_out(out)
        log(f"[1/4] corpus, tokenizer and initial models in {out}")
        corpus = build_corpus(out, p)
        n_teacher, n_student = build_models(out, p)
        (out / "corpus.json").write_text(json.dumps(corpus, indent=1))
        times["corpus"] = time.time() - t_start
        log(f"[2/4] teacher: {p['teacher_steps']} steps, CE only (loss.alpha 0), 2 ranks")
        times["teacher"] = train_run(out, "teacher", "teacher", run_config(
            out, "teacher", p, student=out / "init" / "teacher", steps=p["teacher_steps"], lr=p["lr"], alpha=0.0,
            teacher=None))
    else:
        log(f"[1-2/4] reusing the corpus and trained teacher in {out}")
        corpus = json.loads((out / "corpus.json").read_text())
        build_models(out, p)  # the students' initial weights follow --seed
    log(f"[3/4] two students, {p['student_steps']} steps each: CE only, then KD (alpha {p['alpha']}, "
        f"T {p['temperature']})")
    times["ce_student"] = train_run(out, "ce_student", "CE student", run_config(
        out, "ce_student", p, student=out / "init" / "student", steps=p["student_steps"], lr=p["student_lr"],
        alpha=0.0, teacher=None))
    times["kd_student"] = train_run(out, "kd_student", "KD student", run_config(
        out, "kd_student", p, student=out / "init" / "student", steps=p["student_steps"], lr=p["student_lr"],
        alpha=p["alpha"], teacher=out / "teacher" / "final"))
    students = [("CE student", "ce_student"), ("KD student", "kd_student")]
    op_start, op_steps = out / "init" / "student", p["student_steps"]
    if args.on_policy > 0 and args.on_policy_from == "kd":  # both arms continue the KD student's export
        op_start, op_steps = out / "kd_student" / "final", p["student_steps"] // 2
        times["kd_continued"] = train_run(out, "kd_continued", "KD student, continued", run_config(
            out, "kd_continued", p, student=op_start, steps=op_steps, lr=p["student_lr"], alpha=p["alpha"],
            teacher=out / "teacher" / "final"))
        students.append(("KD student, continued", "kd_continued"))
        # the control for the loss: the on-policy arm's own loss (reverse KL, T 1, alpha 1) on the data only
        times["rkl_continued"] = train_run(out, "rkl_continued", "KD student, continued with reverse KL", run_config(
            out, "rkl_continued", p, student=op_start, steps=op_steps, lr=p["student_lr"], alpha=1.0,
            teacher=out / "teacher" / "final", on_policy=on_policy_settings(p, 0.0, 0)))
        students.append(("KD student, continued with reverse KL", "rkl_continued"))
    if args.on_policy > 0:
        times["op_student"] = train_run(out, "op_student", "on-policy student", run_config(
            out, "op_student", p, student=op_start, steps=op_steps, lr=p["student_lr"],
            alpha=1.0, teacher=out / "teacher" / "final",
            on_policy=on_policy_settings(p, args.on_policy, 0 if args.on_policy_from == "kd" else op_steps // 4)))
        students.append(("on-policy student", "op_student"))
    log("[4/4] held-out evaluation")
    t0 = time.time()
    res = final_eval(out, p)
    own_kl = own_sample_kls(out, p, students) if args.on_policy > 0 else None
    times["eval"] = time.time() - t0
    times["total"] = time.time() - t_start

    teacher_ppl = res["CE student"]["teacher_ppl"]
    ce, kd, before = res["CE student"]["student_ppl"], res["KD student"]["student_ppl"], res["student before"][
        "student_ppl"]
    table = "\n".join([
        "| model | held-out perplexity |",
        "|---|---|",
        f"| teacher ({p['teacher_shape']['hidden']}x{p['teacher_shape']['layers']}, {p['teacher_steps']} steps, CE) "
        f"| {teacher_ppl:.2f} |",
        f"| student before training | {before:.2f} |",
        f"| CE student ({p['student_steps']} steps, alpha 0) | {ce:.2f} |",
        f"| KD student ({p['student_steps']} steps, alpha {p['alpha']}, T {p['temperature']}) | {kd:.2f} |"])
    verdict = (f"distillation wins: the KD student's held-out perplexity is {100 * (1 - kd / ce):.1f}% lower than "
               f"the CE student's" if kd < ce else "distillation did NOT beat plain training in this run")
    results = {"teacher_ppl": teacher_ppl, "ce_student_ppl": ce, "kd_student_ppl": kd, "student_before_ppl": before,
               "kd_beats_ce": kd < ce, "eval": res, "params": p, "corpus": corpus, "seconds": times,
               "cpu_seconds": CPU_SECONDS}
    if own_kl is not None:
        results["own_sample_kl"] = own_kl
        results["on_policy_ppl"] = own_kl["on-policy student"]["ppl"]
        if args.on_policy_from == "kd":
            results["kd_continued_ppl"] = _final_ppl(out / "kd_continued")
            results["rkl_continued_ppl"] = _final_ppl(out / "rkl_continued")
            table += "\n" + (f"| KD student, continued ({op_steps} more steps, off-policy) | "
                              f"{results['kd_continued_ppl']:.2f} |")
            table += "\n" + (f"| KD student, continued with the on-policy arm's loss ({op_steps} more steps, "
                              f"off-policy, reverse KL, T 1) | {results['rkl_continued_ppl']:.2f} |")
            table += "\n" + (f"| on-policy student (the KD student + {op_steps} steps, lmbda {args.on_policy}, "
                              f"reverse KL) | {own_kl['on-policy student']['ppl']:.2f} |")
        else:
            table += "\n" + (f"| on-policy student ({op_steps} steps, lmbda {args.on_policy}, reverse KL, "
                              f"warm start {op_steps // 4} steps) | {own_kl['on-policy student']['ppl']:.2f} |")
        table += ("\n\n| model | teacher-scored KL on its own samples (held-out prompts) | mean completion |"
                  "\n|---|---|---|")
        for name, r in own_kl.items():
            table += f"\n| {name} | {r['kl']:.4f} | {r['completion_len']:.1f} |"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(f"# Demo results\n\n{table}\n\n{verdict}\n\nHeld-out: "
                                    f"{corpus['eval_records']} records of {corpus['held_out_files']} standard-library "
                                    f"files never trained on; full table in eval/eval.md.\n")
    print()
    print(table)
    print()
    print(verdict)
    log(f"total {times['total']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in times.items() if k != 'total')}); "
        f"{out}/results.md, eval/eval.md, eval/generations.md, */report.md")
    log("CPU time of the stages' processes: " + ", ".join(f"{k} {v:.0f} s" for k, v in CPU_SECONDS.items()))
    return 0 if kd < ce or args.quick else 1  # --quick is too small to promise the win: it checks the plumbing


if __name__ == "__main__":
    sys.exit(main())
