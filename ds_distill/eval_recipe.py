"""The evaluation recipe behind `launch/eval.py` (its usage text is USAGE below): held-out perplexity, KL and
top-1 agreement of one or more students against a teacher, task accuracy, generations side by side.

Plain Hugging Face models in one process, data-parallel over ranks, or ZeRO-3-partitioned (--zero3, through the
same inference-engine builder as the teacher in training: assembly.inference_engine). DeepSpeed is imported only
when ranks are involved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time

import torch

from . import data, evaluate, models, tasks, vocab
from .config import TasksConfig, validate_tasks
from .errors import ConfigError, rank_error, run_collective

USAGE = """Held-out evaluation of one or more students against a teacher: perplexities, KL(teacher || student), top-1
agreement (token-weighted over the trained tokens), as JSON and a markdown table; optionally generations side by side.

    python launch/eval.py --model outputs/run/final --teacher path/to/teacher --data eval.jsonl --format chat \
        --out outputs/run/eval [--student_before path/to/student_init --prompts prompts.txt]
    deepspeed --num_gpus N launch/eval.py ...            (data-parallel: each rank evaluates a shard; sums all-reduced)
    deepspeed --num_gpus N launch/eval.py --zero3 ...    (models partitioned with ZeRO-3, for models too big for a GPU)

Task accuracy, side by side for the teacher, --student_before and every --model (rank 0, one model at a time):
    python launch/eval.py --model outputs/run/final --student_before /models/student --teacher /models/teacher \
        --lm_eval_tasks gsm8k_local --lm_eval_include ds_configs/lm_eval_tasks --humaneval --out outputs/run/eval
    (--data is then optional: without it no held-out perplexity is computed)

Several --model paths give one column each (the teacher runs once; its hidden states are reused for every model).
Writes OUT/eval.json, OUT/eval.md and, when --student_before or --prompts is given, OUT/generations.md (teacher,
student before, student after at temperatures 0.1 / 0.7 / 1.2 with fixed seeds; rank 0 only); task evaluations
add OUT/lm_eval_samples_<column>.jsonl and OUT/humaneval_<column>.jsonl.
Exit codes: 0 done, 2 a problem with the inputs (message says which), 1 otherwise.
"""
DEFAULT_ZERO3_JSON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs",
                                  "teacher_zero3.json")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", required=True, help="student model directory (or several)")
    ap.add_argument("--names", nargs="+", help="column names for --model (default: 'student' or directory names)")
    ap.add_argument("--teacher", help="teacher model directory (adds teacher perplexity, KL and agreement)")
    ap.add_argument("--student_before", help="the student before training: evaluated too, and used in generations")
    ap.add_argument("--data", nargs="+", help="held-out files (json/jsonl/parquet/txt) for perplexity / KL / agreement")
    ap.add_argument("--format", default="text", choices=data.FORMATS, help="data format (as data.format)")
    ap.add_argument("--text_field", default="text", help="as data.text_field")
    ap.add_argument("--max_length", type=int, default=512, help="sequences truncated to this many tokens")
    ap.add_argument("--micro_batch_size", type=int, default=4, help="sequences per rank per forward")
    ap.add_argument("--max_batches", type=int, default=0, help="cap eval micro-batches per rank (0 = all)")
    ap.add_argument("--chunk_size", type=int, default=1024, help="positions per lm_head chunk ([chunk, V] logits)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's, else the first model's; "
                    "task evaluations: each model's own)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="auto: bf16 on GPUs, fp32 on CPU")
    ap.add_argument("--zero3", action="store_true", help="partition the models with ZeRO-3 across the ranks")
    ap.add_argument("--teacher_ds_config", default=DEFAULT_ZERO3_JSON, help="DeepSpeed JSON used with --zero3")
    ap.add_argument("--prompts", help="prompts file for generations (.txt one per line, or .jsonl)")
    ap.add_argument("--generations", type=int, default=3,
                    help="prompts in generations.md (from --prompts, else the first eval samples); 0 = none")
    ap.add_argument("--temperatures", type=float, nargs="+", default=list(evaluate.TEMPERATURES))
    ap.add_argument("--max_new_tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0, help="generation seed base (prompt i, temperature j: +1000i+j)")
    ap.add_argument("--out", required=True, help="output directory for eval.json / eval.md / generations.md")
    t = TasksConfig()
    g = ap.add_argument_group("task accuracy (lm-evaluation-harness, HumanEval; as eval.tasks in the training config)")
    g.add_argument("--lm_eval_tasks", nargs="+", default=[], help="lm-eval task names, e.g. gsm8k_local")
    g.add_argument("--lm_eval_include", help="directory of extra task YAMLs (e.g. ds_configs/lm_eval_tasks)")
    g.add_argument("--lm_eval_batch_size", type=int, default=t.lm_eval_batch_size)
    g.add_argument("--lm_eval_limit", type=float, help="examples per task: a count, or a fraction < 1 (default: all)")
    g.add_argument("--lm_eval_num_fewshot", type=int, help="few-shot examples (default: the task's own)")
    g.add_argument("--lm_eval_bootstrap_iters", type=int, default=t.lm_eval_bootstrap_iters)
    g.add_argument("--humaneval", action="store_true", help="HumanEval pass@k (samples run in ds_distill/sandbox.py)")
    g.add_argument("--humaneval_problems", help="a .jsonl(.gz) in HumanEval's format (default: the package's 164)")
    g.add_argument("--humaneval_limit", type=int, default=0, help="first N problems only (0 = all)")
    g.add_argument("--humaneval_samples", type=int, default=t.humaneval_samples, help="n completions per problem")
    g.add_argument("--humaneval_k", type=int, nargs="+", default=t.humaneval_k, help="pass@k to report (k <= n)")
    g.add_argument("--humaneval_temperature", type=float, default=t.humaneval_temperature)
    g.add_argument("--humaneval_seed", type=int, default=t.humaneval_seed)
    g.add_argument("--humaneval_max_new_tokens", type=int, default=t.humaneval_max_new_tokens)
    g.add_argument("--humaneval_timeout_s", type=float, default=t.humaneval_timeout_s)
    g.add_argument("--humaneval_memory_mb", type=int, default=t.humaneval_memory_mb)
    g.add_argument("--humaneval_workers", type=int, default=t.humaneval_workers)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = ap.parse_args(argv)
    args.tasks = TasksConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TasksConfig)
                                if f.name != "models"})
    if not (args.data or tasks.wanted(args.tasks)):
        ap.error("nothing to evaluate: give --data (held-out perplexity) and/or --lm_eval_tasks / --humaneval")
    if args.names and len(args.names) != len(args.model):
        ap.error(f"--names has {len(args.names)} entries for {len(args.model)} --model paths")
    return args


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def column_names(args) -> list[str]:
    if args.names:
        return list(args.names)
    if len(args.model) == 1:
        return ["student after" if args.student_before else "student"]
    return [os.path.basename(os.path.normpath(p)) or p for p in args.model]


def _start(args):
    """(engines module or None, rank, world, device): a process group only with ranks or --zero3."""
    if not (args.zero3 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return None, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from . import engines  # imports deepspeed: only when ranks are involved
    if "WORLD_SIZE" not in os.environ:  # --zero3 in a plain process: a private port, not the shared 29500
        os.environ.setdefault("MASTER_PORT", _free_port())
    rank, world, _ = engines.init_distributed()
    return engines, rank, world, engines.device()


def _checked_inputs(args):
    """Model directories, task settings and tokenizers checked; (tokenizer, held-out dataset or None)."""
    paths = ([("teacher", args.teacher)] if args.teacher else []) + [
        (f"--model {p}", p) for p in args.model] + ([("student_before", args.student_before)]
                                                    if args.student_before else [])
    for key, p in paths:
        models.check_model_dir(p, key)
    problems = validate_tasks(args.tasks, key="-")
    if problems:
        raise ConfigError([p.replace("-.", "--", 1) for p in problems])
    tokenizer = models.load_tokenizer(args.tokenizer or args.teacher or args.model[0])
    if args.teacher:
        for _, p in paths[1:]:
            vocab.check_tokenizers_compatible(models.load_tokenizer(args.teacher), models.load_tokenizer(p))
    ds = data.build_dataset(args.data, args.format, tokenizer, args.max_length, args.text_field) \
        if args.data else None
    return tokenizer, ds


def _heldout(args, engines, *, rank, world, device, precision, tokenizer, ds, columns) -> dict:
    """{column: held-out metrics}: the teacher runs once, its hidden states reused for every column."""
    dtype = engines_dtype(precision)

    def load(path):
        """(hidden_fn, head, rows): a plain HF model on this device, or a ZeRO-3 inference engine."""
        if not args.zero3:
            m = models.load_causal_lm(path, dtype=dtype).to(device).eval()
            fn, head = evaluate.hf_parts(m)
            return fn, head, head.weight.shape[0]
        from . import assembly
        eng, rows = assembly.inference_engine(path, ds_config=args.teacher_ds_config, world=world,
                                              precision=precision, micro_batch_size=args.micro_batch_size)
        return (lambda ids, mask: eng(ids, mask)), eng.module.head, rows

    def batches():
        b = data.eval_batches(ds, rank=rank, world_size=world, micro_batch_size=args.micro_batch_size,
                              pad_token_id=tokenizer.pad_token_id)
        for i, mb in enumerate(b):
            if args.max_batches and i >= args.max_batches:
                return
            yield mb

    gather = engines.gathered if args.zero3 else evaluate._no_gather
    reduce = engines.all_reduce_sum if engines is not None else (lambda t: t)
    t_fn = t_w = t_rows = None
    if args.teacher:
        t_fn, t_w, t_rows = load(args.teacher)
    cache = evaluate.TeacherCache() if args.teacher else None
    results = {}
    for name, path in columns:
        s_fn, s_w, s_rows = load(path)
        vocab_size, _ = vocab.reconcile_vocab(t_rows or s_rows, s_rows, len(tokenizer))
        results[name] = evaluate.evaluate(
            batches(), student_hidden_fn=s_fn, student_head=s_w, teacher_hidden_fn=t_fn, teacher_head=t_w,
            teacher_cache=cache, vocab_size=vocab_size, chunk_size=args.chunk_size, device=device,
            gather=gather, all_reduce=reduce)
        results[name]["model"] = path
        del s_fn, s_w
    return results


def engines_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _write_outputs(args, *, results, task_results, columns, world, precision, seconds, tokenizer, ds, device):
    """Rank 0: eval.json, eval.md (tables also printed) and generations.md when asked."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"results": results, "teacher": args.teacher, "data": args.data, "format": args.format,
                   "max_length": args.max_length, "world_size": world, "zero3": args.zero3,
                   "dtype": precision, "seconds": seconds, "tasks": task_results,
                   "task_options": dataclasses.asdict(args.tasks) if task_results else None}, f, indent=1)
    md = ["# Evaluation", ""]
    if results:
        table = evaluate.markdown_table(results)
        md += ["## Held-out evaluation", "", f"data: {', '.join(args.data)} ({args.format}, max_length "
               f"{args.max_length}); teacher: {args.teacher or '-'}", "", table, ""]
        print(table, flush=True)
    if task_results:
        table = tasks.markdown_table(task_results)
        md += ["## Task accuracy", "", tasks.describe(args.tasks), "", table, ""]
        print(table, flush=True)
    with open(os.path.join(args.out, "eval.md"), "w") as f:
        f.write("\n".join(md))
    gen_path = None
    if args.generations > 0 and (args.prompts or (args.student_before and ds is not None)):
        prompts = (evaluate.prompts_from_file(args.prompts, tokenizer, args.format)[:args.generations]
                   if args.prompts else evaluate.prompts_from_dataset(ds, args.generations))
        gen_models = ([("teacher", args.teacher)] if args.teacher else []) + columns
        rows = evaluate.side_by_side(gen_models, prompts, tokenizer, temperatures=args.temperatures,
                                     seed=args.seed, max_new_tokens=args.max_new_tokens, device=device,
                                     dtype=engines_dtype(precision))
        gen_path = os.path.join(args.out, "generations.md")
        evaluate.write_generations_md(rows, gen_path)
    print(f"wrote {os.path.join(args.out, 'eval.json')}, eval.md" + (", generations.md" if gen_path else "")
          + f" ({seconds:.1f} s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    engines, rank, world, device = _start(args)

    def body() -> int:
        t0 = time.time()
        precision = args.dtype if args.dtype != "auto" else ("fp32" if device.type == "cpu" else "bf16")
        tokenizer, ds = _checked_inputs(args)
        columns = ([("student before", args.student_before)] if args.student_before else []) + list(
            zip(column_names(args), args.model))
        results = _heldout(args, engines, rank=rank, world=world, device=device, precision=precision,
                           tokenizer=tokenizer, ds=ds, columns=columns) if ds is not None else {}
        task_results = {}
        if tasks.wanted(args.tasks):  # rank 0, plain HF models one at a time; the other ranks wait below
            if rank == 0:
                os.makedirs(args.out, exist_ok=True)
                task_columns = ([("teacher", args.teacher)] if args.teacher else []) + columns
                task_results = tasks.evaluate_models(task_columns, args.tasks, out_dir=args.out, device=device,
                                                     dtype=engines_dtype(precision), tokenizer_path=args.tokenizer,
                                                     key="-", log=lambda m: print(m, file=sys.stderr))
            if engines is not None:
                engines.barrier()
        if rank == 0:
            _write_outputs(args, results=results, task_results=task_results, columns=columns, world=world,
                           precision=precision, seconds=time.time() - t0, tokenizer=tokenizer, ds=ds,
                           device=device)
        return 0

    return run_collective(body, lambda e: rank_error(e, rank), engines.shutdown if engines is not None else None)
