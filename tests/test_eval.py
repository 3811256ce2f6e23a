"""Evaluation, generations, and the run report (issue 5).

Fast, one process:
1. held-out perplexity / KL / agreement equal a hand computation with transformers (model(...).loss for a model
   without padding rows; full logits sliced to the tokenizer's vocabulary for padded lm_heads), on instruction data
   whose prompt tokens are masked: the count is the response tokens + eos, and including the prompt would differ;
2. two shards reduced by sums equal the whole set exactly (and a mean of means would not), also through a real
   2-process gloo all_reduce; the teacher cache gives the same numbers as recomputing the teacher;
3. generations are reproducible with fixed seeds (and change with the seed);
4. the report's PNGs exist with the expected pixel size and hold exactly the plotted points.
Multi-rank (DeepSpeed, ~1 launch): launch/eval.py on 2 ranks with --zero3 equals the 1-process evaluation.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_ok, free_port, run_deepspeed

from ds_distill import data, evaluate, report

IGN = -100


@pytest.fixture(scope="module")
def tok(tiny_assets):
    from ds_distill.models import load_tokenizer

    return load_tokenizer(tiny_assets["tokenizer"])


@pytest.fixture(scope="module")
def unpadded(tiny_assets, tok, tmp_path_factory):
    """A tiny student whose lm_head has exactly len(tokenizer) rows: its ppl must equal HF's own loss."""
    from ds_distill.tiny import build_model

    out = tmp_path_factory.mktemp("unpadded")
    build_model(out, tok, vocab_rows=len(tok), tie=False, seed=5, hidden=32, layers=1, heads=4, kv_heads=2,
                intermediate=64)
    return str(out)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _instruction_ds(tiny_assets, tok, n=24, max_length=512):
    ds = data.build_dataset([f"{tiny_assets['data']}/instruction_eval.jsonl"], "instruction", tok, max_length)
    return ds.select(range(n))


def _eval(ds, student, teacher=None, *, mbs=3, rank=0, world=1, vocab_size=None, cache=None, all_reduce=None,
          chunk_size=7):
    s_fn, s_w = evaluate.hf_parts(student)
    t_fn, t_w = evaluate.hf_parts(teacher) if teacher is not None else (None, None)
    return evaluate.evaluate(data.eval_batches(ds, rank=rank, world_size=world, micro_batch_size=mbs,
                                               pad_token_id=0),
                             student_hidden_fn=s_fn, student_head=s_w, teacher_hidden_fn=t_fn, teacher_head=t_w,
                             teacher_cache=cache, vocab_size=vocab_size, chunk_size=chunk_size,
                             all_reduce=all_reduce or (lambda t: t))


def _reference(ds, student, teacher, vocab_size):
    """Per sample, unbatched: CE over trained targets of logits[..., :V], KL(t||s) and argmax agreement."""
    nll_s = nll_t = kl = agree = n = 0.0
    with torch.no_grad():
        for row in ds:
            ids = torch.tensor([row["input_ids"]])
            tgt = torch.tensor(row["labels"])[1:]
            m = tgt != IGN
            ls = student(input_ids=ids).logits[0, :-1, :vocab_size][m].double()
            lt = teacher(input_ids=ids).logits[0, :-1, :vocab_size][m].double()
            nll_s += F.cross_entropy(ls, tgt[m], reduction="sum").item()
            nll_t += F.cross_entropy(lt, tgt[m], reduction="sum").item()
            ps, pt = ls.log_softmax(-1), lt.log_softmax(-1)
            kl += (pt.exp() * (pt - ps)).sum().item()
            agree += (ls.argmax(-1) == lt.argmax(-1)).sum().item()
            n += m.sum().item()
    return {"student_ppl": math.exp(nll_s / n), "teacher_ppl": math.exp(nll_t / n), "kl": kl / n,
            "agree": agree / n, "tokens": n}


def test_ppl_equals_transformers_loss_response_only(tiny_assets, tok, unpadded):
    ds = _instruction_ds(tiny_assets, tok)
    model = _load(unpadded)
    # HF's own loss, per sample, token-weighted by hand
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in ds:
            labels = torch.tensor([row["labels"]])
            k = int((labels[0, 1:] != IGN).sum())
            nll += model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss.item() * k
            n += k
    got = _eval(ds, model)  # batches of 3, right-padded, logits 7 positions at a time
    assert got["tokens"] == n
    assert got["student_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert "teacher_ppl" not in got

    # the count is exactly the responses + their eos (prompt and instruction never counted) ...
    rows = [json.loads(line) for line in open(f"{tiny_assets['data']}/instruction_eval.jsonl")][:len(ds)]
    assert n == sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    # ... and counting the prompt too would give another perplexity
    full = ds.map(lambda r: {"labels": r["input_ids"]}, keep_in_memory=True)
    with_prompt = _eval(full, model)
    assert with_prompt["tokens"] >= n + 5 * len(ds)
    assert abs(with_prompt["student_ppl"] / got["student_ppl"] - 1) > 1e-3


def test_teacher_kl_agree_match_reference_with_padded_vocab(tiny_assets, tok):
    ds = _instruction_ds(tiny_assets, tok, n=12)
    student, teacher = _load(tiny_assets["student"]), _load(tiny_assets["teacher"])
    assert student.lm_head.weight.shape[0] > len(tok)  # padded rows: masked like the training loss
    ref = _reference(ds, student, teacher, len(tok))
    got = _eval(ds, student, teacher, vocab_size=len(tok))
    for k in ("student_ppl", "teacher_ppl", "kl", "agree", "tokens"):
        assert got[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), k
    assert ref["kl"] > 0


def test_shards_reduce_by_sums_not_mean_of_means(tiny_assets, tok):
    ds = _instruction_ds(tiny_assets, tok, n=15)
    student, teacher = _load(tiny_assets["student"]), _load(tiny_assets["teacher"])
    whole = _eval(ds, student, teacher, mbs=1, vocab_size=len(tok))
    captured = []

    def capture(t):  # stands in for the all-reduce: keep each shard's local sums
        captured.append(t.clone())
        return t

    shards = [_eval(ds, student, teacher, mbs=1, rank=r, world=2, vocab_size=len(tok), all_reduce=capture)
              for r in (0, 1)]
    combined = evaluate.finalize((captured[0] + captured[1]).tolist(), has_teacher=True)
    for k in ("student_ppl", "teacher_ppl", "kl", "agree", "tokens"):
        assert combined[k] == pytest.approx(whole[k], rel=1e-12), k
    # the shards hold different token counts, so averaging their means would be wrong
    assert shards[0]["tokens"] != shards[1]["tokens"]
    mean_of_means = (shards[0]["student_nll"] + shards[1]["student_nll"]) / 2
    assert abs(mean_of_means - whole["student_nll"]) > 1e-4

    # the teacher cache: filled by the first call, then used (teacher not run) with identical results
    cache = evaluate.TeacherCache()
    first = _eval(ds, student, teacher, vocab_size=len(tok), cache=cache)
    assert cache.ready and len(cache.hidden) == len(ds)

    def boom(ids, mask):
        raise AssertionError("the teacher ran although its hidden states are cached")

    s_fn, s_w = evaluate.hf_parts(student)
    second = evaluate.evaluate(data.eval_batches(ds, rank=0, world_size=1, micro_batch_size=3, pad_token_id=0),
                               student_hidden_fn=s_fn, student_head=s_w, teacher_hidden_fn=boom,
                               teacher_head=evaluate.hf_parts(teacher)[1], teacher_cache=cache, vocab_size=len(tok),
                               chunk_size=7)
    assert second == first


_GLOO_WORKER = r"""
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from transformers import AutoModelForCausalLM
from ds_distill import data, evaluate
from ds_distill.models import load_tokenizer
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
a = json.loads(sys.argv[2])
tok = load_tokenizer(a["tokenizer"])
ds = data.build_dataset([a["file"]], "instruction", tok, 512).select(range(15))
s = AutoModelForCausalLM.from_pretrained(a["student"], dtype=torch.float32)
t = AutoModelForCausalLM.from_pretrained(a["teacher"], dtype=torch.float32)
(sf, sw), (tf, tw) = evaluate.hf_parts(s), evaluate.hf_parts(t)
r = evaluate.evaluate(data.eval_batches(ds, rank=rank, world_size=world, micro_batch_size=1, pad_token_id=0),
                      student_hidden_fn=sf, student_head=sw, teacher_hidden_fn=tf, teacher_head=tw,
                      vocab_size=len(tok), chunk_size=7)
json.dump(r, open(a["out"] + f".{rank}", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_two_process_gloo_eval_equals_one_process(tiny_assets, tok, tmp_path):
    ds = _instruction_ds(tiny_assets, tok, n=15)
    whole = _eval(ds, _load(tiny_assets["student"]), _load(tiny_assets["teacher"]), mbs=1, vocab_size=len(tok))
    script = tmp_path / "w.py"
    script.write_text(_GLOO_WORKER)
    args = json.dumps({"tokenizer": tiny_assets["tokenizer"], "student": tiny_assets["student"],
                       "teacher": tiny_assets["teacher"], "file": f"{tiny_assets['data']}/instruction_eval.jsonl",
                       "out": str(tmp_path / "r")})
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(ROOT), args],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    got = [json.loads((tmp_path / f"r.{r}").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # every rank holds the global result
    for k in ("student_ppl", "teacher_ppl", "kl", "agree", "tokens"):
        assert got[0][k] == pytest.approx(whole[k], rel=1e-6), k  # other processes: fp32 rounding differs


def test_generations_reproducible_with_fixed_seeds(tiny_assets, tok, tmp_path):
    ds = data.build_dataset([f"{tiny_assets['data']}/chat_eval.jsonl"], "chat", tok, 128)
    prompts = evaluate.prompts_from_dataset(ds, 2)
    # the prompt is the user turn up to the assistant header: nothing trained inside it
    first_trained = next(t for t in range(1, len(ds[0]["labels"])) if ds[0]["labels"][t] != IGN)
    assert prompts[0] == ds[0]["input_ids"][:first_trained]
    assert tok.decode(prompts[0]).endswith("<|im_start|>assistant\n")
    models = [("teacher", tiny_assets["teacher"]), ("student", tiny_assets["student"])]
    kw = dict(temperatures=(0.1, 0.7, 1.2), max_new_tokens=12)
    a = evaluate.side_by_side(models, prompts, tok, seed=3, **kw)
    b = evaluate.side_by_side(models, prompts, tok, seed=3, **kw)
    c = evaluate.side_by_side(models, prompts, tok, seed=4, **kw)
    assert a == b
    assert len(a) == 2 * 3 and [r["temperature"] for r in a] == [0.1, 0.7, 1.2] * 2
    assert all(set(r["outputs"]) == {"teacher", "student"} for r in a)
    hot = [r["outputs"]["student"] for r in a if r["temperature"] == 1.2]
    assert hot != [r["outputs"]["student"] for r in c if r["temperature"] == 1.2]  # the seed matters
    path = tmp_path / "g.md"
    evaluate.write_generations_md(a, str(path))
    md = path.read_text()
    assert md.count("### temperature") == 6 and md.count("**teacher**") == 6 and md.count("## Prompt") == 2


def test_report_plots_hold_the_logged_points(tmp_path):
    rows = []
    for s in range(1, 11):
        rows.append({"step": s, "loss/total": 3.0 - 0.1 * s, "loss/ce": 3.5 - 0.1 * s, "loss/kl": 1.0 / s})
    for s, ppl in ((0, 900.0), (5, 300.0), (10, 120.0)):
        rows.append({"step": s, "eval/student_ppl": ppl, "eval/teacher_ppl": 80.0, "eval/kl": ppl / 1000,
                     "eval/agree": 0.1 + s / 100, "eval/tokens": 500.0})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in sorted(rows, key=lambda r: r["step"]):
            f.write(json.dumps(r) + "\n")
    out = tmp_path / "rep"
    returned = report.write_report(str(out), report.read_rows(str(tmp_path / "metrics.jsonl")))
    saved = json.loads((out / "report_data.json").read_text())
    assert saved == returned
    assert saved["losses.png"]["loss/ce"] == {"x": list(range(1, 11)), "y": [3.5 - 0.1 * s for s in range(1, 11)]}
    assert len(saved["losses.png"]["loss/kl"]["x"]) == len(saved["losses.png"]["loss/total"]["y"]) == 10
    assert saved["eval_ppl.png"]["student"] == {"x": [0, 5, 10], "y": [900.0, 300.0, 120.0]}
    assert saved["eval_ppl.png"]["teacher"] == {"x": [0, 10], "y": [80.0, 80.0]}
    assert saved["gap.png"]["ppl gap"]["y"] == [820.0, 220.0, 40.0]
    assert saved["gap.png"]["KL"]["y"] == [0.9, 0.3, 0.12]
    import matplotlib.image as mpimg

    for png, panels in (("losses.png", 2), ("eval_ppl.png", 1), ("gap.png", 3)):
        img = mpimg.imread(out / png)
        assert img.shape[1] == 700 and img.shape[0] == int(100 * (2.4 + 1.8 * panels)), (png, img.shape)
        assert img[..., :3].std() > 0.05  # not blank
    md = (out / "report.md").read_text()
    assert "| student perplexity | 900.000 | 120.000 |" in md
    assert "| teacher perplexity | 80.000 | 80.000 |" in md
    for png in ("losses.png", "eval_ppl.png", "gap.png"):
        assert f"]({png})" in md


@pytest.mark.multirank
def test_eval_launcher_two_ranks_zero3_equals_one_process(tiny_assets, tmp_path):
    """launch/eval.py: 2 DeepSpeed ranks with ZeRO-3-partitioned models == 1 plain process (token-weighted)."""
    common = ["--model", tiny_assets["student"], "--teacher", tiny_assets["teacher"], "--data",
              f"{tiny_assets['data']}/instruction_eval.jsonl", "--format", "instruction", "--max_length", "96",
              "--micro_batch_size", "1", "--max_batches", "20", "--chunk_size", "16", "--dtype", "fp32",
              "--generations", "0"]
    proc = run_deepspeed(ROOT / "launch" / "eval.py", common + ["--zero3", "--out", str(tmp_path / "two")])
    assert_ok(proc)
    one = subprocess.run([sys.executable, str(ROOT / "launch" / "eval.py"), *common,
                          "--max_batches", "40", "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_ok(one)
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    ref = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert two["world_size"] == 2 and two["zero3"] and ref["world_size"] == 1
    a, b = two["results"]["student"], ref["results"]["student"]
    assert a["tokens"] == b["tokens"] and a["agree"] == b["agree"]
    for k in ("student_ppl", "teacher_ppl", "kl"):  # fp32 rounding differs between processes; a mean of means
        assert a[k] == pytest.approx(b[k], rel=1e-6), k  # would be off by > 1e-4 (see the shard test)
    assert "| student perplexity |" in (tmp_path / "two" / "eval.md").read_text()
