"""On-policy distillation (issue 15): the student's own samples scored by the teacher.

Without DeepSpeed (one process):
- the sampler equals HF `generate` (same seed, same left-padded batch; temperature, top-p, padded lm_head rows);
  through the engine path (run_to_max) every call runs max_new_tokens decode forwards, the same ids.
- the trained batch: prompt masked, the completion with its EOS trained, nothing after EOS; prompts per format.
- the on_policy section's validation names each bad key.
Under real DeepSpeed, 2 CPU ranks x 2 micro-batches, ZeRO-3 (tests/scripts/onpolicy_check.py, one launch):
- on_policy.lmbda 0 gives the same step sums (losses, tokens) as a config without the section, two steps;
- with lmbda 1, for forward KL, reverse KL and JSD (one step each; the reverse-KL step is sequence-level KD instead:
  seq_kd 1, the teacher samples): every rank's trained ids are what HF generate samples from the step-start student
  (or the teacher) in this (separate) process with the documented seed
  (generation.sample_seed), prompt masked, completion + EOS trained, nothing after EOS; the step's loss and full
  gradient equal an fp64 recomputation on the same generated batch (1e-5), normalised by the generated tokens
  of all micro-batches and ranks. The JSD step samples through the ZeRO-3 engine (generator: engine): every rank
  runs max_new_tokens forwards per micro-batch whatever its samples, and the ids are still HF generate's.
And with launch/train.py (two launches): rank 0's prompts make the student end at once, rank 1's make it run to
max_new_tokens (no hang under a 120 s watchdog); the run is killed after step 3 and resumed from its step-2
checkpoint; the resumed step 3 samples the same completions and logs the same losses as the killed run's
uninterrupted step 3; onpolicy/frac follows the seeded choice and on_policy.start_step. launch/generate.py (1 rank,
two launches): offline sequence-level KD rows equal HF generate of the teacher per sample id, resumable.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, assert_ok, read_jsonl, run_deepspeed, tiny_config, write_yaml
from ds_distill import generation as G

def eos_student(assets, out, ending_tokens=None, eos_logit=1.3, scale=0.1, d=0):
    """A tiny untied Qwen3 student whose EOS probability is set through one hidden dimension `d`: every token's
    embedding has +scale (ending_tokens None) or +scale for `ending_tokens` and -scale for the others there, which
    dominates the final norm's output at d; lm_head's EOS row reads d with weight eos_logit. ending_tokens None: EOS
    has a fixed moderate probability. Else: EOS at once after an ending token, never after another (the ending
    tokens themselves are then never sampled). The defaults end about one sample in ten per token; a large scale
    (needed for the all-or-nothing variant) makes the fp32 attention gradients ill-conditioned (1e-4 from fp64
    in the plain HF model itself), so the gradient test keeps it small."""
    from transformers import AutoTokenizer

    from ds_distill import tiny

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    m = tiny.build_model(out, tok, vocab_rows=(len(tok) + 63) // 64 * 64, tie=False, seed=2, **tiny.STUDENT_SHAPE)
    with torch.no_grad():
        E, W = m.get_input_embeddings().weight, m.get_output_embeddings().weight
        sign = torch.ones(E.shape[0])
        if ending_tokens is not None:
            sign = -sign
            sign[list(ending_tokens)] = 1.0
        E[:, d] = scale * sign
        W[:, d] = 0.0
        W[tok.eos_token_id, d] = eos_logit
        if ending_tokens is not None:
            W[list(ending_tokens), d] = eos_logit / 2
    m.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def hf_generate(model, prompts, seed, *, eos, pad, vocab_size, max_new_tokens, temperature, top_p):
    """What HF generate samples for `prompts` (left-padded batch) after torch.manual_seed(seed), cut after EOS."""
    from transformers import GenerationConfig

    ids, mask = G.left_pad(prompts, pad, torch.device("cpu"))
    rows = model.get_output_embeddings().weight.shape[0]
    gc = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=pad, suppress_tokens=list(range(vocab_size, rows)) or None)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:].tolist()
    return [r[:r.index(eos) + 1] if eos in r else r for r in out]


# ----------------------------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------------------------

def test_sampler_equals_hf_generate_and_engine_path_runs_to_max(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(eos_student(tiny_assets, tmp_path / "s"), dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in ("### Human: What does os.path.join do? ### Assistant:", "def f(x):",
                                              "import os", "class A:\n    pass")]
    V = len(tok)
    lengths = set()
    for temperature, top_p, seed in ((1.0, 1.0, 1), (0.7, 0.9, G.sample_seed(0, 3, 1, 1)), (1.3, 0.8, 2 ** 40 + 7)):
        s = G.SamplingSettings(max_new_tokens=16, temperature=temperature, top_p=top_p, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, vocab_size=V)
        mine, forwards = G.sample(model, prompts, s, seed, torch.device("cpu"))
        ref = hf_generate(model, prompts, seed, eos=tok.eos_token_id, pad=tok.pad_token_id, vocab_size=V,
                          max_new_tokens=16, temperature=temperature, top_p=top_p)
        assert mine == ref, (temperature, top_p, seed)
        assert forwards == max(len(c) for c in mine)  # stops once every row ended (no collective in the loop)
        engine_path, engine_forwards = G.sample(model, prompts, s, seed, torch.device("cpu"), run_to_max=True)
        assert engine_path == mine and engine_forwards == 16
        lengths |= {len(c) for c in mine}
        assert all(tok.eos_token_id not in c[:-1] for c in mine)
    assert min(lengths) < 16 and 16 in lengths, lengths  # samples that ended at EOS and samples cut at the limit
    # a whole model (ZeRO 0-2 student, replicated teacher) samples directly, in eval mode, and is left as it was
    model.train()
    direct = G.PlainGenerator(model, s, torch.device("cpu")).generate(prompts, 7)
    assert model.training and direct == G.sample(model.eval(), prompts, s, 7, torch.device("cpu"))
    # the demo's teacher-scored KL on own samples: 0 against itself; against another model, the per-token reverse KL
    # of the same samples computed position by position without a batch
    s = G.SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, vocab_size=V)
    assert abs(G.own_sample_kl(model, model, prompts, s, 3, torch.device("cpu"))["kl"]) < 1e-6
    other = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32).eval()
    got = G.own_sample_kl(model, other, prompts, s, 3, torch.device("cpu"), batch_size=2)
    total, n = 0.0, 0
    for b in range(0, len(prompts), 2):
        completions, _ = G.sample(model, prompts[b:b + 2], s, 3 + b, torch.device("cpu"))
        for p, c in zip(prompts[b:b + 2], completions):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                lq = torch.log_softmax(model(ids).logits[0, :, :V].double(), -1)
                lp = torch.log_softmax(other(ids).logits[0, :, :V].double(), -1)
            total += float((lq.exp() * (lq - lp)).sum(-1)[len(p) - 1:len(p) - 1 + len(c)].sum())
            n += len(c)
    assert got["tokens"] == n and got["kl"] == pytest.approx(total / n, rel=1e-4)


def test_trained_batch_masks_prompt_and_nothing_after_eos():
    mb = {"input_ids": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]]),
          "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
          "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 10, 11, -100, -100]]),
          "sample_ids": torch.tensor([3, 4])}
    assert G.prompt_lengths(mb, "instruction", 99) == [2, 1]  # everything before the response
    assert G.prompt_lengths(mb, "text", 2) == [2, 2] and G.prompt_lengths(mb, "text", 9) == [3, 2]
    eos = 2
    out = G.completion_batch(mb, [[5, 6], [9]], [[20, 21, eos], [22]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 20, 21, eos], [9, 22, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 20, 21, eos], [-100, 22, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert out["sample_ids"].tolist() == [3, 4]
    # the per-step choice: seeded by (seed, step) only, lmbda 0 never samples, the fraction follows lmbda
    assert G.choose_micro_batches(0, 5, 8, 0.0) == ["data"] * 8
    assert G.choose_micro_batches(3, 5, 8, 0.5) == G.choose_micro_batches(3, 5, 8, 0.5)
    many = sum(G.choose_micro_batches(1, s, 10, 0.3).count("student") for s in range(1, 201))
    assert 0.25 < many / 2000 < 0.35


def test_on_policy_config_errors_name_the_key(tiny_assets, tmp_path):
    from ds_distill.config import parse_config, validate
    from ds_distill.errors import ConfigError

    cfg = tiny_config(tiny_assets, tmp_path / "o", on_policy={"lmbda": 1.5, "seq_kd": 1.2, "max_new_tokens": 0,
                                                              "temperature": 0, "top_p": 0, "prompt_length": 64,
                                                              "start_step": -1})
    cfg["data"]["packing"] = True
    with pytest.raises(ConfigError) as e:
        validate(parse_config(["--config", write_yaml(cfg, tmp_path / "c.yaml")]))
    msg = str(e.value)
    for key in ("on_policy.lmbda:", "on_policy.seq_kd:", "on_policy.lmbda + on_policy.seq_kd",
                "on_policy.max_new_tokens", "on_policy.temperature", "on_policy.top_p", "on_policy.prompt_length",
                "on_policy.start_step"):
        assert key in msg, key
    cfg = tiny_config(tiny_assets, tmp_path / "o", on_policy={"lmbda": 0.5}, loss={"alpha": 0.0})
    with pytest.raises(ConfigError, match="on_policy.lmbda: > 0 needs a teacher model"):
        validate(parse_config(["--config", write_yaml(cfg, tmp_path / "c2.yaml")]))
    cfg = tiny_config(tiny_assets, tmp_path / "o", on_policy={"lmbda": 0.0, "max_new_tokens": 7})
    validate(parse_config(["--config", write_yaml(cfg, tmp_path / "c3.yaml")]))  # off: nothing else required
    # off: the default prompt_length (32) may exceed a short data.max_length, and the teacher may be any source
    cfg = tiny_config(tiny_assets, tmp_path / "o", data={"max_length": 16})
    validate(parse_config(["--config", write_yaml(cfg, tmp_path / "c4.yaml")]))
    cfg = tiny_config(tiny_assets, tmp_path / "o", on_policy={"lmbda": 0.5},
                      teacher={"placement": "separate"})
    with pytest.raises(ConfigError, match="on_policy.lmbda: > 0 cannot be used with teacher.placement: separate"):
        validate(parse_config(["--config", write_yaml(cfg, tmp_path / "c5.yaml")]))


# ----------------------------------------------------------------------------------------------------------------
# real DeepSpeed, 2 ranks
# ----------------------------------------------------------------------------------------------------------------

def fp64_step(student_dir, weights, teacher_dir, batches, *, alpha, T, divergence, beta, vocab_size):
    """fp64, one process: sum over the trained tokens of all micro-batches of (alpha T^2 D + (1 - alpha) CE) / N."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64)
    student.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    keys = sorted({k.rsplit(".", 1)[0] for k in batches})
    total, n = 0.0, 0
    for k in keys:
        ids, am, labels = (batches[f"{k}.{f}"] for f in ("input_ids", "attention_mask", "labels"))
        s = student(input_ids=ids, attention_mask=am).logits[:, :-1, :vocab_size]
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=am).logits[:, :-1, :vocab_size]
        tgt = labels[:, 1:]
        valid = tgt != -100
        lp = F.log_softmax(t[valid] / T, -1)
        lq = F.log_softmax(s[valid] / T, -1)
        if divergence == "forward_kl":
            div = (lp.exp() * (lp - lq)).sum()
        elif divergence == "reverse_kl":
            div = (lq.exp() * (lq - lp)).sum()
        else:
            lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
            div = beta * (lp.exp() * (lp - lm)).sum() + (1 - beta) * (lq.exp() * (lq - lm)).sum()
        ce = F.cross_entropy(s[valid], tgt[valid], reduction="sum")
        total = total + alpha * T * T * div + (1 - alpha) * ce
        n += int(valid.sum())
    loss = total / n
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    return loss.item(), n, grads, student


@pytest.mark.multirank
def test_on_policy_steps_generated_ids_and_fp64_gradients(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student = eos_student(tiny_assets, tmp_path / "student")
    out = tmp_path / "out"
    op = {"lmbda": 1.0, "max_new_tokens": 10, "temperature": 1.0, "top_p": 0.95}
    base = dict(fmt="instruction", student={"path": student},
                train={"micro_batch_size": 2, "grad_accum_steps": 2, "zero_stage": 3, "grad_clip": 0.0, "lr": 1e-2},
                loss={"alpha": 0.8, "temperature": 2.0, "impl": "chunked", "chunk_size": 16, "beta": 0.5})
    plain = tiny_config(tiny_assets, out, **base)
    onp = tiny_config(tiny_assets, out, **base, on_policy=op)
    divergences = ["forward_kl", "seqkd:reverse_kl", "jsd"]
    proc = run_deepspeed(ROOT / "tests" / "scripts" / "onpolicy_check.py",
                         [write_yaml(onp, tmp_path / "onp.yaml"), write_yaml(plain, tmp_path / "plain.yaml"),
                          *divergences])
    assert_ok(proc)
    root = out / "onpolicy_check"

    # lmbda 0: no sampler is built and both steps' sums are identical to the run without the section
    res = json.loads((root / "lmbda0.json").read_text())
    assert res["lmbda0_has_builder"] is False
    for a, b in zip(res["plain"], res["lmbda0"]):
        for k in ("total", "ce", "kd", "tokens", "global_tokens"):
            assert a[k] == b[k], k
    assert not any(k.startswith("onpolicy/") for k in res["lmbda0"][0])

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    saw_eos = saw_cut = False
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32).eval()
    for i in range(len(divergences)):
        d = root / f"step{i}"
        sums = json.loads((d / "sums.json").read_text())
        div = sums["divergence"]
        V = sums["vocab_size"]
        batches = load_file(str(d / "batches.safetensors"))
        samples = json.loads((d / "samples.json").read_text())
        assert sorted((r["rank"], r["micro_batch"]) for r in samples) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        weights = load_file(str(d / "weights.safetensors"))
        ref_loss, n, ref_grads, step_student = fp64_step(student, weights, tiny_assets["teacher"], batches,
                                                         alpha=0.8, T=2.0, divergence=div, beta=0.5, vocab_size=V)
        step_student = step_student.float().eval()
        generated = 0
        for row in samples:
            r, m = row["rank"], row["micro_batch"]
            assert row["seed"] == G.sample_seed(0, sums["step"], r, m)
            assert row["kind"] == ("teacher" if sums["seq_kd"] else "student")
            # the step-start student (or the teacher), in this process, with HF generate and the documented seed
            ref = hf_generate(teacher if sums["seq_kd"] else step_student, row["prompts"], row["seed"], eos=eos,
                              pad=pad, vocab_size=V,
                              max_new_tokens=op["max_new_tokens"], temperature=op["temperature"], top_p=op["top_p"])
            assert row["completions"] == ref, (div, r, m)
            ids, labels = batches[f"r{r}.m{m}.input_ids"], batches[f"r{r}.m{m}.labels"]
            am = batches[f"r{r}.m{m}.attention_mask"]
            for b, (p, c) in enumerate(zip(row["prompts"], ref)):
                P, C = len(p), len(c)
                assert ids[b, :P + C].tolist() == p + c  # the trained ids: prompt + what HF generate sampled
                assert (labels[b, :P] == -100).all() and labels[b, P:P + C].tolist() == c  # completion + EOS trained
                assert (labels[b, P + C:] == -100).all() and (am[b, P + C:] == 0).all()  # nothing after EOS
                saw_eos |= c[-1] == eos
                saw_cut |= C == op["max_new_tokens"] and c[-1] != eos
                generated += C
        # the normaliser: the generated tokens of all micro-batches and ranks
        assert sums["tokens"] == n == generated == sums["onpolicy/generated_tokens"]
        fracs = (sums["onpolicy/frac"], sums["onpolicy/seq_kd_frac"])
        assert fracs == ((0.0, 1.0) if sums["seq_kd"] else (1.0, 0.0))
        # the engine path: every rank ran max_new_tokens forwards per micro-batch
        if sums["generator"] == "EngineGenerator" and not sums["seq_kd"]:
            assert sums["onpolicy/decode_forwards"] == 2 * 2 * op["max_new_tokens"]
        else:  # an unsharded copy (the student's or the teacher's) stops once a micro-batch's rows all ended
            assert sums["onpolicy/decode_forwards"] == sum(max(len(c) for c in row["completions"]) for row in samples)
        assert math.isclose(sums["total"] / sums["tokens"], ref_loss, rel_tol=1e-5), div
        got = load_file(str(d / "grads.safetensors"))
        assert set(got) == set(ref_grads)
        for name, g in ref_grads.items():
            err = (got[name].double() - g).norm() / g.norm().clamp_min(1e-30)
            assert err < 1e-5, f"{div} {name}: relative gradient error {err:.2e}"
        del step_student
    assert saw_eos and saw_cut  # completions that ended at EOS and completions cut at max_new_tokens


@pytest.mark.multirank
def test_ranks_ending_apart_kill_and_resume_equal_uninterrupted(tiny_assets, tmp_path):
    """Rank 0's prompts end at once, rank 1's run to max_new_tokens; killed after step 3 (the last), resumed from
    the step-2 checkpoint: the redone step 3 equals the killed run's uninterrupted step 3."""
    from transformers import AutoTokenizer

    from ds_distill.data import epoch_permutation

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    paras = [json.loads(line)["text"] for line in
             (Path(tiny_assets["data"]) / "text_train.jsonl").read_text().splitlines()[:40]]
    seed, n = 1, 40
    perm = epoch_permutation(n, seed, 0)
    rank_of = {row: i % 2 for i, row in enumerate(perm)}  # rank r reads perm[r::2] in epoch 0 (3 steps: 12 rows)
    texts = [("alpha " if rank_of[i] == 0 else "omega ") + p for i, p in enumerate(paras)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    first = {r: {tok(t)["input_ids"][0] for i, t in enumerate(texts) if rank_of[i] == r} for r in (0, 1)}
    assert len(first[0]) == 1 and not first[0] & first[1]
    student = eos_student(tiny_assets, tmp_path / "student", ending_tokens=first[0], eos_logit=5.0, scale=5.0)
    out = tmp_path / "run"
    max_new = 12
    cfg = tiny_config(tiny_assets, out, fmt="text", student={"path": student},
                      train={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3, "lr": 1e-3, "seed": seed,
                             "watchdog_timeout_s": 120},
                      loss={"alpha": 1.0, "divergence": "reverse_kl", "temperature": 1.0, "impl": "chunked",
                            "chunk_size": 64},
                      checkpoint={"every_steps": 2, "keep_last": 3},
                      on_policy={"lmbda": 0.75, "start_step": 1, "max_new_tokens": max_new, "prompt_length": 1,
                                 "samples_every": 1})
    cfg["data"].update({"train_files": [str(data)], "eval_files": [], "max_length": 48})
    path = write_yaml(cfg, tmp_path / "c.yaml")
    killed = run_deepspeed(ROOT / "launch" / "train.py", ["--config", path],
                           env={"DS_DISTILL_TEST_FAULTS": "kill@3:0"})
    assert killed.returncode != 0 and "test fault kill@3 on rank 0" in killed.stderr + killed.stdout
    before = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r}
    assert sorted(before) == [1, 2, 3]
    samples_before = {p.name: p.read_text() for p in (out / "onpolicy_samples").glob("*.jsonl")}
    shutil.copytree(out / "onpolicy_samples", tmp_path / "samples_killed")
    resumed = run_deepspeed(ROOT / "launch" / "train.py", ["--config", path])
    assert_ok(resumed)
    rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r}
    assert sorted(rows) == [1, 2, 3]

    # the resumed step 3 is the killed run's uninterrupted step 3: the same samples and the same logged numbers
    for name in ("step_00000003_rank0.jsonl", "step_00000003_rank1.jsonl"):
        assert (out / "onpolicy_samples" / name).read_text() == samples_before[name]
    for k, v in before[3].items():
        if k not in ("tokens_per_sec", "mem/peak_gb", "onpolicy/gen_seconds", "onpolicy/gen_tokens_per_sec"):
            assert rows[3][k] == v, k

    # the seeded per-step choice, after the off-policy warm start (start_step 1)
    for s, r in rows.items():
        want = 0.0 if s == 1 else G.choose_micro_batches(seed, s, 2, 0.75).count("student") / 2
        assert r.get("onpolicy/frac", 0.0) == want, s
    # rank 0's samples ended at once (EOS), rank 1's ran to max_new_tokens; every step has both ranks' forwards
    for s in (2, 3):
        for rank, want in ((0, [1]), (1, [max_new])):
            got = [json.loads(line) for line in (out / "onpolicy_samples" /
                                                 f"step_{s:08d}_rank{rank}.jsonl").read_text().splitlines()]
            assert got, (s, rank)
            lens = {len(c) for row in got for c in row["completions"]}
            assert lens == set(want), (s, rank, lens)
            if rank == 0:
                assert all(c == [tok.eos_token_id] for row in got for c in row["completions"])
        assert rows[s]["onpolicy/completion_len"] > 0


def test_generate_offline_seq_kd_dataset_deterministic_and_resumable(tiny_assets, tmp_path):
    """launch/generate.py (1 rank, one launch) resuming a run killed mid-way: its part file holds rows 0-1 (marked,
    so that keeping them is visible) and a torn line of row 2. The merged file has every sample id once, in order:
    the kept rows as they were, the others each equal to the teacher's HF generate with the documented per-sample
    seed, in the data's format."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import free_port
    from ds_distill import data

    src = Path(tiny_assets["data"]) / "instruction_train.jsonl"
    train = tmp_path / "train.jsonl"
    train.write_text("".join(src.read_text().splitlines(keepends=True)[:6]))
    cfg = tiny_config(tiny_assets, tmp_path / "o", fmt="instruction",
                      on_policy={"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9})
    cfg["data"].update({"train_files": [str(train)], "eval_files": []})
    out = tmp_path / "seqkd.jsonl"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    kept = [json.dumps({"text": f"Instruction: kept {i}\nResponse: from before the kill", "sample_id": i}) + "\n"
            for i in (0, 1)]
    (parts / "rank0.jsonl").write_text("".join(kept) + '{"text": "Instruction: torn')
    env = {**os.environ, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "generate.py"), "--config",
                           write_yaml(cfg, tmp_path / "c.yaml"), "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    lines = out.read_text().splitlines(keepends=True)
    assert lines[:2] == kept
    rows = [json.loads(line) for line in lines]
    assert [r["sample_id"] for r in rows] == list(range(6))
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32).eval()
    ds = data.build_dataset([str(train)], "instruction", tok, 64)
    for r in rows[2:]:
        row = ds[r["sample_id"]]
        mb = data.collate([row], tok.pad_token_id)
        p = G.prompt_lengths(mb, "instruction", 0)[0]
        (c,) = hf_generate(teacher, [row["input_ids"][:p]], G.sample_seed(0, 0, 0, r["sample_id"]),
                           eos=tok.eos_token_id, pad=tok.pad_token_id, vocab_size=len(tok), max_new_tokens=8,
                           temperature=1.0, top_p=0.9)
        c = c[:-1] if c and c[-1] == tok.eos_token_id else c
        assert r["text"] == tok.decode(row["input_ids"][:p]) + tok.decode(c)
        assert r["text"].startswith("Instruction:") and "Response:" in r["text"]
    # the file trains like any instruction data: every row keeps a trained response
    assert len(data.build_dataset([str(out)], "instruction", tok, 64)) == 6
