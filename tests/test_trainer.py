"""The core trainer under real DeepSpeed on 2 CPU ranks.

1. One train_step with 2 ranks x 2 micro-batches: the logged loss and the full gradients (gathered before the
   optimizer step) equal an fp64 recomputation of the global token mean over the concatenated batch, in one
   process without DeepSpeed; for ZeRO-3 and for ZeRO-0 (so the partitioned fused-loss path equals unpartitioned).
2. A full tiny run with W&B offline: the loss falls, ZeRO-3 partitions the student (each rank about half),
   metrics.jsonl and the W&B run file carry identical CE/KL/total per step, and the export loads with
   AutoModelForCausalLM, differs from the initial weights, and generates. The same run has eval.tasks (a local
   multiple-choice lm-eval task and 2 HumanEval problems) on the student before and after: the accuracies in
   report.md, metrics.jsonl and the W&B run equal those computed from each model's own HF log-likelihoods.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, assert_ok, read_jsonl, run_deepspeed, tiny_config, write_yaml

pytestmark = pytest.mark.multirank


def reference_step(assets, batches: dict, alpha: float, T: float, vocab_size: int):
    """fp64, one process, no DeepSpeed: loss = sum over trained tokens of (alpha T^2 KL + (1-alpha) CE) / N."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float64)
    keys = sorted({k.rsplit(".", 1)[0] for k in batches})
    seqs = [{f: batches[f"{k}.{f}"] for f in ("input_ids", "attention_mask", "labels")} for k in keys]
    L = max(s["input_ids"].shape[1] for s in seqs)

    def cat(field, pad):
        return torch.cat([F.pad(s[field], (0, L - s[field].shape[1]), value=pad) for s in seqs])

    ids, am, labels = cat("input_ids", 0), cat("attention_mask", 0), cat("labels", -100)
    s_logits = student(input_ids=ids, attention_mask=am).logits[:, :-1, :vocab_size]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=am).logits[:, :-1, :vocab_size]
    tgt = labels[:, 1:]
    valid = tgt != -100
    n = valid.sum()
    ce = F.cross_entropy(s_logits[valid], tgt[valid], reduction="sum")
    lp_t = F.log_softmax(t_logits[valid] / T, -1)
    lp_s = F.log_softmax(s_logits[valid] / T, -1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum()
    loss = (alpha * T * T * kl + (1 - alpha) * ce) / n
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "ce": (ce / n).item(), "kl": (kl / n).item(), "tokens": n.item()}, grads


@pytest.mark.parametrize("stage", [3, 0])
def test_two_ranks_two_microbatches_equal_global_mean_fp64(tiny_assets, tmp_path, stage):
    out = tmp_path / "out"
    cfg = tiny_config(tiny_assets, out, fmt="instruction",  # response-only masks: uneven token counts per batch
                      train={"micro_batch_size": 2, "grad_accum_steps": 2, "zero_stage": stage, "grad_clip": 0.0},
                      loss={"alpha": 0.6, "temperature": 2.0, "impl": "chunked", "chunk_size": 16})
    proc = run_deepspeed(ROOT / "tests" / "scripts" / "grad_check.py",
                         ["--config", write_yaml(cfg, tmp_path / "c.yaml")])
    assert_ok(proc)
    d = out / "grad_check"
    sums = json.loads((d / "sums.json").read_text())
    ds_grads = load_file(str(d / "grads.safetensors"))
    ref, ref_grads = reference_step(tiny_assets, load_file(str(d / "batches.safetensors")), 0.6, 2.0,
                                    sums["vocab_size"])
    assert sums["tokens"] == ref["tokens"]
    assert math.isclose(sums["total"] / sums["tokens"], ref["loss"], rel_tol=1e-5)
    assert math.isclose(sums["ce"] / sums["tokens"], ref["ce"], rel_tol=1e-5)
    assert math.isclose(sums["kd"] / sums["tokens"], ref["kl"], rel_tol=1e-5)
    # tied student: HF reports lm_head.weight as the embedding; DeepSpeed names the parameter once
    assert set(ds_grads) <= set(ref_grads) | {"lm_head.weight"}
    assert len(ds_grads) >= len(ref_grads)
    for name, g in ref_grads.items():
        got = ds_grads[name].double()
        err = (got - g).norm() / g.norm().clamp_min(1e-30)
        assert err < 1e-5, f"{name}: relative gradient error {err:.2e} (stage {stage})"


def test_tiny_run_end_to_end_with_wandb_offline(tiny_assets, tmp_path):
    from test_tasks import hf_choice_loglikelihoods, mc_accuracy, write_mc_task

    out = tmp_path / "run"
    include, mc_rows = write_mc_task(tmp_path / "tasks", n=16)
    cfg = tiny_config(tiny_assets, out, fmt="guanaco", train={"max_steps": 16, "lr": 1e-2, "warmup_steps": 2,
                                                             "micro_batch_size": 4, "grad_accum_steps": 2},
                      loss={"alpha": 0.5, "temperature": 2.0, "impl": "chunked", "chunk_size": 64},
                      wandb={"mode": "offline", "project": "ds_distill_test"},
                      eval={"tasks": {"lm_eval_tasks": ["local_mc"], "lm_eval_include": include,
                                      "humaneval": True, "humaneval_limit": 2, "humaneval_max_new_tokens": 8}})
    proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", write_yaml(cfg, tmp_path / "c.yaml")],
                         env={"WANDB_DIR": str(out), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert_ok(proc)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in rows] == list(range(1, 17))

    # the loss falls
    first, last = sum(r["loss/total"] for r in rows[:4]) / 4, sum(r["loss/total"] for r in rows[-4:]) / 4
    assert last < 0.93 * first, (first, last)  # seen: 3.47 -> 3.13 over 16 steps
    for r in rows:
        assert math.isclose(r["loss/total"], 0.5 * 4.0 * r["loss/kl"] + 0.5 * r["loss/ce"], rel_tol=1e-6)
        assert r["tokens_per_sec"] > 0 and math.isfinite(r["grad_norm"]) and r["lr"] > 0

    # ZeRO-3 really partitions: each rank stores about half of the student's elements
    held = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
        r"rank (\d+)/2: student ZeRO-3 holds (\d+) of (\d+)", proc.stdout + proc.stderr)}
    assert set(held) == {0, 1}
    for r, (h, total) in held.items():
        assert 0.45 * total <= h <= 0.55 * total, (r, h, total)

    # W&B offline run file: identical CE / KL / total per step
    from tests.tools.read_wandb_offline import read_offline_run

    runs = list(Path(out).glob("wandb/offline-run-*"))
    assert len(runs) == 1
    wb = read_offline_run(str(runs[0]))
    hist = {int(h["step"]): h for h in wb["history"] if "loss/total" in h}
    assert sorted(hist) == list(range(1, 17))
    for r in rows:
        for k in ("loss/total", "loss/ce", "loss/kl", "lr", "grad_norm"):
            assert hist[r["step"]][k] == r[k], (r["step"], k)
    assert wb["exit_code"] == 0

    # the export loads, differs from the initial weights, and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    init = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32)
    sd_f, sd_i = final.state_dict(), init.state_dict()
    assert sd_f.keys() == sd_i.keys()
    changed = [k for k in sd_i if not torch.equal(sd_f[k], sd_i[k])]
    assert len(changed) == len(sd_i), f"unchanged tensors: {set(sd_i) - set(changed)}"
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("### Human: What does os.path.join do? ### Assistant:", return_tensors="pt")
    gen = final.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8 or tok.eos_token_id in gen[0].tolist()
    saved_cfg = json.loads((out / "final" / "ds_distill_config.json").read_text())
    assert saved_cfg["loss"]["alpha"] == 0.5 and saved_cfg["wandb"]["mode"] == "offline"

    # eval.tasks: the student before and after, in report.md, metrics.jsonl and W&B, equal to HF's own numbers
    want = {"student before": mc_accuracy(hf_choice_loglikelihoods(tiny_assets["student"], mc_rows), mc_rows),
            "student after": mc_accuracy(hf_choice_loglikelihoods(str(out / "final"), mc_rows), mc_rows)}
    task_row = next(r for r in read_jsonl(out / "metrics.jsonl") if any(k.startswith("tasks/") for k in r))
    assert task_row["step"] == 16
    report_md = (out / "report.md").read_text()
    assert "## Task accuracy" in report_md
    cells = [f"{task_row[f'tasks/{m}/local_mc/acc,none']:.4f}" for m in want]
    assert f"| local_mc/acc,none | {cells[0]} | {cells[1]} |" in report_md, report_md
    humaneval_cells = [f"{task_row[f'tasks/{m}/humaneval/pass@1']:.4f}" for m in want]
    assert f"| humaneval/pass@1 | {humaneval_cells[0]} | {humaneval_cells[1]} |" in report_md
    wb_task = next(h for h in wb["history"] if any(k.startswith("tasks/") for k in h))
    for m, acc in want.items():
        key = f"tasks/{m}/local_mc/acc,none"
        assert task_row[key] == pytest.approx(acc, abs=1e-12) and wb_task[key] == task_row[key], m
    saved = json.loads((out / "tasks" / "tasks.json").read_text())["results"]
    assert saved["student after"]["humaneval"]["problems"] == 2 and saved["student after"]["humaneval"][
        "sandbox_missing"] == []
