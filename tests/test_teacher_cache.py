"""Offline teacher cache (issue 6): written on 2 ranks with an interruption, read on 1 rank, refused when it does not
match the run.

One multi-rank test, three process starts (2-rank writer killed mid-run, 2-rank resume, one 1-rank driver for all
1-rank work), so the whole file costs about as much as three launches:

1. The 2-rank writer dies after 3 batches (test hook, like a killed job, leaving a half-written *.tmp): complete
   shards stay, the cache reads as incomplete. The restart keeps them, recomputes only the rest; the index then
   holds every sample exactly once, and every row equals the teacher's log-softmax computed directly with plain
   transformers in this process at the run's loss.temperature 2 (by sample id, all 1000 ids of each position).
2. Training from the full-vocabulary (k = V) cache, on 1 rank with the stream's shuffling, logs the same loss /
   CE / KL / grad norm at every step as online training with loss.impl: full (within 1e-5 relative); training
   from a k = 64 fp16 cache written on 1 rank stays within 1e-3 of online top-64 training, both at T = 2 (the
   cache is written at the training temperature, so its tail mass is exact). The k = 64 cache's rows
   equal the first 64 of the 2-rank cache (fp16 rounding aside).
3. A cache that does not match the run is refused, naming the field: max_length, data, tokenizer, top_k,
   temperature; the
   writer refuses to resume another run's cache (k, dtype, data).
"""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_ok, read_jsonl, run_deepspeed, run_single_rank, tiny_config, write_yaml

pytestmark = pytest.mark.multirank

N_SAMPLES = 24


def _rows(path):
    return [r for r in read_jsonl(path) if "loss/total" in r]


def _dense(cache, sid, V):
    """[n, V] log-probs of one cached sample, -inf where the cache holds no id."""
    ids, lps = cache.sample_rows(sid)
    dense = torch.full((ids.shape[0], V), float("-inf"))
    dense.scatter_(1, ids.long(), lps.float())
    return dense


def test_cache_write_resume_train_and_refuse(tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_distill import data, faults, teacher_cache as tc
    from ds_distill.errors import DistillError
    from ds_distill.tiny import build_tokenizer, stdlib_files

    src = Path(tiny_assets["data"]) / "guanaco_train.jsonl"
    lines = src.read_text().splitlines()
    train, other = tmp_path / "train.jsonl", tmp_path / "other.jsonl"
    train.write_text("\n".join(lines[:N_SAMPLES]) + "\n")
    other.write_text("\n".join(lines[N_SAMPLES:2 * N_SAMPLES]) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    V = len(tok)

    def cfg(out, **sections):
        base = {"data": {"train_files": [str(train)], "eval_files": [], "max_length": 64},
                "train": {"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 4, "warmup_steps": 0,
                          "lr": 3e-3},
                "loss": {"alpha": 0.5, "temperature": 2.0, "impl": "full", "chunk_size": 32, "top_k": 64}}
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        return tiny_config(tiny_assets, tmp_path / out, **base)

    def cached(c, cache_dir):  # the same run, teacher replaced by the cache
        c = json.loads(json.dumps(c))
        c["teacher"] = {"cache": str(cache_dir)}
        c["loss"]["impl"] = "topk"
        return c

    write_cfg = write_yaml(cfg("w"), tmp_path / "write.yaml")
    cache_v = tmp_path / "cache_v"
    args = ["--config", write_cfg, "--cache_dir", str(cache_v), "--top_k", str(V), "--dtype", "fp32",
            "--shard_positions", "130"]

    # --- 1. interrupted 2-rank write, then resume
    proc = run_deepspeed(ROOT / "launch" / "cache_teacher.py", args, env={faults.CACHE_STOP_ENV: "3"})
    assert proc.returncode != 0, proc.stdout[-3000:]
    partial = tc.cached_sample_ids(str(cache_v))
    assert 0 < len(partial) < N_SAMPLES
    assert list((cache_v / "shards").glob("*.tmp")), "the hook leaves a half-written shard"
    with pytest.raises(DistillError, match="incomplete"):
        tc.TopKCache(str(cache_v))
    proc = run_deepspeed(ROOT / "launch" / "cache_teacher.py", args)
    assert_ok(proc)
    assert f"{len(partial)} of {N_SAMPLES} samples already cached" in proc.stdout
    assert not list((cache_v / "shards").glob("*.tmp"))
    shards = tc.scan_shards(str(cache_v))
    all_ids = [s for _, sids, _, _ in shards for s in sids]
    assert sorted(all_ids) == list(range(N_SAMPLES)), "each sample exactly once"
    assert len({name.split("-")[2] for name, *_ in shards}) == 4, "2 ranks x 2 writer runs"
    cache = tc.TopKCache(str(cache_v))
    m = cache.manifest
    assert (m["top_k"], m["dtype"], m["bytes_per_token"], m["vocab_size"]) == (V, "fp32", V * 8, V)

    ds = data.build_dataset([str(train)], "guanaco", tok, 64)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32)
    assert m["data_fingerprint"] == tc.data_fingerprint(ds)
    assert m["num_positions"] == sum(len(r["input_ids"]) - 1 for r in ds)
    with torch.no_grad():
        for r in ds:
            logits = teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1, :V]
            ref = F.log_softmax(logits.float() / 2.0, -1)  # [n, V] at loss.temperature 2: positions 0..n-1 predict 1..n
            got = _dense(cache, r["sample_id"], V)
            assert got.shape == ref.shape
            assert (got - ref).abs().max() < 1e-4, f"sample {r['sample_id']}"

    # --- 2. one 1-rank process: a k=64 fp16 cache, four trainings, the refusals
    cache_64 = tmp_path / "cache_64"
    other_tok = tmp_path / "other_tok"
    build_tokenizer(other_tok, vocab_size=900, files=stdlib_files(limit=8))
    online_full = cfg("online_full")
    # T = 2: the cache holds top-k log-probs at T and the exact tail mass at T, so it equals online top-k at T
    topk_t2 = {"impl": "topk", "temperature": 2.0, "top_k": 64}
    online_topk = cfg("online_topk", loss=topk_t2)
    refuse = cached(cfg("refused"), cache_v)
    spec = {
        "out": str(tmp_path / "driver.json"),
        "caches": {"k64": {"config": cfg("w"), "cache_dir": str(cache_64), "top_k": 64, "dtype": "fp16"}},
        "runs": {
            "online_full": online_full,
            "cached_full": {**cached(online_full, cache_v), "output_dir": str(tmp_path / "cached_full"),
                            "loss": {**online_full["loss"], "impl": "topk", "top_k": V}},
            "online_topk": online_topk,
            "cached_topk": {**cached(online_topk, cache_64), "output_dir": str(tmp_path / "cached_topk")},
        },
        "refusals": {
            "max_length": {**refuse, "data": {**refuse["data"], "max_length": 48}},
            "data": {**refuse, "data": {**refuse["data"], "train_files": [str(other)]}},
            "tokenizer": {**refuse, "tokenizer_path": str(other_tok)},
            "top_k": {**cached(cfg("refused"), cache_64), "loss": {**refuse["loss"], "top_k": 128}},
            "temperature": {**refuse, "loss": {**refuse["loss"], "temperature": 1.0}},
        },
        "writer_refusals": {
            "k": {"config": cfg("w"), "cache_dir": str(cache_v), "top_k": 64, "dtype": "fp32"},
            "dtype": {"config": cfg("w"), "cache_dir": str(cache_v), "top_k": V, "dtype": "fp16"},
            "data": {"config": cfg("w", data={"train_files": [str(other)]}), "cache_dir": str(cache_64),
                     "top_k": 64, "dtype": "fp16"},
        },
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = run_single_rank(ROOT / "tests" / "scripts" / "teacher_cache_driver.py", [str(tmp_path / "spec.json")])
    assert_ok(proc)
    res = json.loads((tmp_path / "driver.json").read_text())
    assert all(r["code"] == 0 for r in res["runs"].values()), res

    # k = V from the 2-rank cache, read on 1 rank with shuffling == online full loss
    a, b = _rows(tmp_path / "online_full" / "metrics.jsonl"), _rows(tmp_path / "cached_full" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/ce", "loss/kl", "grad_norm", "tokens"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-5, abs_tol=1e-7), (ra["step"], key, ra[key], rb[key])
    assert a[-1]["loss/total"] < a[0]["loss/total"]
    # k = 64, fp16, written on 1 rank: close to online top-64
    a, b = _rows(tmp_path / "online_topk" / "metrics.jsonl"), _rows(tmp_path / "cached_topk" / "metrics.jsonl")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("loss/total", "loss/kl", "kd/topk_mass"):
            assert math.isclose(ra[key], rb[key], rel_tol=1e-3), (ra["step"], key, ra[key], rb[key])
    # the 1-rank k=64 rows are the 2-rank cache's first 64 (same ids, fp16-rounded log-probs)
    c64 = tc.TopKCache(str(cache_64))
    assert c64.manifest["bytes_per_token"] == 64 * 6
    for sid in range(N_SAMPLES):
        ids64, lp64 = c64.sample_rows(sid)
        ids_v, lp_v = cache.sample_rows(sid)
        assert torch.equal(ids64, ids_v[:, :64])
        assert (lp64.float() - lp_v[:, :64]).abs().max() < 4e-3

    # --- 3. refusals name the field
    ref, wref = res["refusals"], res["writer_refusals"]
    assert "max_length: cache 64, run 48" in ref["max_length"]
    assert "data_fingerprint" in ref["data"] and "max_length" not in ref["data"]
    # another tokenizer_path is now refused before the cache is opened: its ids differ from the student's own
    assert "tokenizer_path" in ref["tokenizer"] and "does not match the tokenizer of student.path" in ref["tokenizer"]
    assert "top_k: cache 64, run loss.top_k 128" in ref["top_k"]
    assert "temperature: cache 2.0, run 1.0" in ref["temperature"] and "loss.temperature" in ref["temperature"]
    assert f"top_k: cache {V}, run 64" in wref["k"] and "dtype" not in wref["k"]
    assert "dtype: cache fp32, run fp16" in wref["dtype"]
    assert "data_fingerprint" in wref["data"]
