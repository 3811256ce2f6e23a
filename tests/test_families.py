"""Every tested model family distils its own logits (issue 12), checked against the HF models' own forwards.

One 2-rank ZeRO-3 launch (tests/scripts/family_driver.py) trains a tiny random teacher/student pair of each family
in heads.TESTED for one step on one record (every micro-batch of both ranks is that record), then an MoE run whose
ranks read different records, writes the offline cache of the Gemma-2 teacher, and starts a run whose forward is
patched. This process then checks, per family, with the models loaded by plain transformers:
- the logged step-1 `loss/ce` and `loss/kl` (T = 2) and the step-0 eval row (`eval/student_nll`, `eval/kl`) equal
  CE / KL computed in fp64 from `model(input_ids).logits` of the two models (rel err <= 2e-3; the fixtures scale
  the final norm up, so a missing softcap / scale would be off by far more: asserted too);
- Qwen3-MoE: `loss/aux` equals the HF student's `aux_loss` (output_router_logits=True), and `loss/total` follows
  alpha T^2 KL + (1 - alpha) CE + coef aux; the run with different records per rank finishes with finite losses;
- the Gemma-2 cache holds the top-k of the capped distribution (ids and log-probs of the HF forward);
- the patched model is refused with exit code 2 before any step, the message naming its path and model type.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_ok, read_jsonl, run_deepspeed, tiny_config, write_yaml, ROOT

pytestmark = pytest.mark.multirank

ALPHA, T = 0.5, 2.0
RECORD = {"text": "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\nprint(add(2, 3))"}


def _family_cfg(assets, out, teacher, student, train_file, eval_file, **train):
    cfg = tiny_config(assets, out, fmt="text")
    cfg["teacher"]["path"], cfg["student"]["path"] = teacher, student
    cfg["data"].update(train_files=[str(train_file)], eval_files=[str(eval_file)], max_length=24)
    cfg["loss"].update(alpha=ALPHA, temperature=T, impl="chunked", chunk_size=8)
    cfg["train"].update(dict(micro_batch_size=1, grad_accum_steps=2, max_steps=1, lr=1e-3, warmup_steps=0,
                             precision="fp32"), **train)
    cfg["eval"].update(max_batches=1, generations=0)
    cfg["checkpoint"]["every_steps"] = 0
    return cfg


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _kl(t_logits, s_logits, temp):
    log_p, log_q = F.log_softmax(t_logits / temp, -1), F.log_softmax(s_logits / temp, -1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_family_matrix_moe_cache_and_probe(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_distill import data, heads, teacher_cache
    from tests.scripts.family_driver import build_pair

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    record8, record2 = tmp_path / "record8.jsonl", tmp_path / "record2.jsonl"
    record8.write_text((json.dumps(RECORD) + "\n") * 8)
    record2.write_text((json.dumps(RECORD) + "\n") * 2)
    plan = {"families": {}, "cache_dir": str(tmp_path / "gemma2_cache"), "cache_k": 8,
            "result": str(tmp_path / "result.json")}
    pairs = {}
    for family in heads.TESTED:
        pairs[family] = build_pair(family, str(tmp_path / family), tok)
        cfg = _family_cfg(tiny_assets, tmp_path / family / "run", *pairs[family], record8, record2)
        plan["families"][family] = write_yaml(cfg, tmp_path / f"{family}.yaml")
    moe = _family_cfg(tiny_assets, tmp_path / "moe_differ", *pairs["qwen3_moe"],
                      os.path.join(tiny_assets["data"], "text_train.jsonl"), record2, max_steps=2,
                      micro_batch_size=2, grad_accum_steps=1)
    moe["data"]["max_length"] = 32
    plan["moe_differ"] = write_yaml(moe, tmp_path / "moe_differ.yaml")
    patched = _family_cfg(tiny_assets, tmp_path / "patched", *pairs["qwen3"], record8, record2)
    plan["patched"] = write_yaml(patched, tmp_path / "patched.yaml")
    (tmp_path / "plan.json").write_text(json.dumps(plan))

    proc = run_deepspeed(str(ROOT / "tests" / "scripts" / "family_driver.py"), [str(tmp_path / "plan.json")],
                         timeout=900)
    assert_ok(proc)

    ids_row = data.build_dataset([str(record2)], "text", tok, 24)[0]
    ids = torch.tensor([ids_row["input_ids"]])
    targets = torch.tensor(ids_row["labels"][1:])
    assert (targets != -100).all() and ids.shape[1] >= 17
    for family, (t_path, s_path) in pairs.items():
        rows = read_jsonl(tmp_path / family / "run" / "metrics.jsonl")
        step1 = next(r for r in rows if r.get("step") == 1 and "loss/ce" in r)
        eval0 = next(r for r in rows if r.get("step") == 0 and "eval/student_nll" in r)
        teacher = AutoModelForCausalLM.from_pretrained(t_path, dtype=torch.float32).eval()
        student = AutoModelForCausalLM.from_pretrained(s_path, dtype=torch.float32).eval()
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits[0, :-1].double()  # [L-1, V]: the models' own logits
            s_out = student(input_ids=ids, output_router_logits=True) if family == "qwen3_moe" else \
                student(input_ids=ids)
            s_logits = s_out.logits[0, :-1].double()
        ce = float(F.cross_entropy(s_logits, targets))
        kl_t, kl_1 = _kl(t_logits, s_logits, T), _kl(t_logits, s_logits, 1.0)
        got = {"loss/ce": (step1["loss/ce"], ce), "loss/kl": (step1["loss/kl"], kl_t),
               "eval/student_nll": (eval0["eval/student_nll"], ce), "eval/kl": (eval0["eval/kl"], kl_1)}
        for key, (logged, ref) in got.items():
            assert _rel(logged, ref) <= 2e-3, f"{family} {key}: logged {logged}, HF forward {ref}"
        # the fixture makes the transform matter: the plain lm_head product gives other numbers
        if heads.transform_of(teacher.config) != heads.IDENTITY:
            with torch.no_grad():
                plain = F.cross_entropy(student.get_decoder()(input_ids=ids).last_hidden_state[0, :-1].double()
                                        @ student.get_output_embeddings().weight.double().T, targets)
            assert _rel(float(plain), ce) > 0.05, family
        if family == "qwen3_moe":
            aux = float(s_out.aux_loss)
            coef = student.config.router_aux_loss_coef
            assert _rel(step1["loss/aux"], aux) <= 2e-3, (step1["loss/aux"], aux)
            expect = ALPHA * T * T * step1["loss/kl"] + (1 - ALPHA) * step1["loss/ce"] + coef * step1["loss/aux"]
            assert _rel(step1["loss/total"], expect) <= 1e-6
        else:
            assert "loss/aux" not in step1

    # MoE with different records on the two ranks: both steps done (no hang), finite, the aux loss logged
    moe_rows = [r for r in read_jsonl(tmp_path / "moe_differ" / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in moe_rows] == [1, 2]
    assert all(math.isfinite(r["loss/total"]) and r["loss/aux"] > 0 for r in moe_rows)

    # the Gemma-2 teacher's cache: top-k of the softcapped distribution, as its own forward gives it
    cache = teacher_cache.TopKCache(plan["cache_dir"])
    c_ids, c_lps = cache.sample_rows(0)
    c_t = cache.manifest["temperature"]  # written at the run's loss.temperature
    assert c_t == T
    teacher = AutoModelForCausalLM.from_pretrained(pairs["gemma2"][0], dtype=torch.float32).eval()
    with torch.no_grad():
        own = F.log_softmax(teacher(input_ids=ids).logits[0, :-1].double() / c_t, -1)
        raw = F.log_softmax(teacher.get_decoder()(input_ids=ids).last_hidden_state[0, :-1].double()
                            @ teacher.get_output_embeddings().weight.double().T / c_t, -1)
    ref_lps, ref_ids = own.topk(8, dim=-1)
    assert torch.equal(c_ids.long(), ref_ids)
    torch.testing.assert_close(c_lps.double(), ref_lps, rtol=1e-4, atol=1e-4)
    assert (raw.topk(8, dim=-1).values - ref_lps).abs().max() > 0.1  # uncapped would differ

    # the patched forward: exit 2 before any step, naming the model
    assert json.loads((tmp_path / "result.json").read_text())["patched_rc"] == 2
    err = proc.stderr + proc.stdout
    named = f"student.path '{pairs['qwen3'][1]}' (model_type 'qwen3')"
    assert named in err and "largest difference" in err, err[-3000:]
    patched_metrics = tmp_path / "patched" / "metrics.jsonl"
    assert not patched_metrics.exists() or not [r for r in read_jsonl(patched_metrics) if "loss/total" in r
                                                 or "eval/student_nll" in r]
