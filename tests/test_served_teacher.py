"""Served teacher (issue 16): launch/serve_teacher.py on the loopback, training with teacher.server_url.

One test, three processes started at once (two teacher servers, one 1-rank driver running the trainings through
launch/train.py's main with real DeepSpeed; tests/scripts/served_teacher_driver.py):

1. The server's rows equal an offline cache written with the same k = 8 at the same temperature 2 (ids exactly,
   log-probs within fp16 rounding): compared here, sample by sample, through the client.
2. Training with teacher.server_url logs the same per-step loss/total, loss/kl, loss/ce and kd/topk_mass as training
   from that cache (relative 1e-3: the cache's fp16 log-probs), while server 1 answers HTTP 503 to the 2nd request
   and delays the 4th past the client's timeout: both are retried (the retries are logged and counted). Server 1
   answers in ds_distill's binary format, server 2 in vLLM's JSON only: the two answers give identical rows.
3. Server 2 exits when the 3rd request arrives: the run stops with exit code 2 and a message naming the URL, after
   saving the last completed step (2); resuming that checkpoint against server 1 finishes the run with steps 3-4
   equal to the uninterrupted run's.
4. A run whose loss.temperature or loss.top_k the server does not serve is refused before any model loads, naming
   the key.
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, free_port, read_jsonl, run_single_rank, tiny_config

pytestmark = pytest.mark.multirank  # real DeepSpeed engines, several processes

K = 8
N_SAMPLES = 16


def _rows(path):
    return [r for r in read_jsonl(path) if "loss/total" in r]


def _server(cfg_path, port, faults, log, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_DISTILL_SERVE_FAULTS": faults}
    return subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve_teacher.py"), "--config", str(cfg_path),
                             "--port", str(port), *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_served_teacher_equals_cache_retries_and_stops(tiny_assets, tmp_path):
    import yaml
    from transformers import AutoTokenizer

    from ds_distill import data, served_teacher, teacher_cache as tc

    lines = open(os.path.join(tiny_assets["data"], "guanaco_train.jsonl")).read().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:N_SAMPLES]) + "\n")

    def cfg(out, teacher, **sections):
        base = {"teacher": teacher,
                "data": {"train_files": [str(train)], "eval_files": [], "max_length": 64},
                "train": {"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 4, "warmup_steps": 0,
                          "lr": 3e-3},
                "loss": {"alpha": 0.5, "temperature": 2.0, "impl": "topk", "chunk_size": 32, "top_k": K},
                "checkpoint": {"every_steps": 0, "keep_last": 2, "resume": "auto"}}
        for k, v in sections.items():
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
        c = tiny_config(tiny_assets, tmp_path / out, **base)
        c["teacher"] = teacher  # replace, not merge: one teacher source
        return c

    model_teacher = {"path": tiny_assets["teacher"], "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json")}
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(yaml.safe_dump(cfg("unused", model_teacher)))
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    logs = [open(tmp_path / f"server{i}.log", "w") for i in (1, 2)]
    servers = [_server(serve_cfg, ports[0], "error:2,delay:4:2.5", logs[0]),
               _server(serve_cfg, ports[1], "exit:3", logs[1], "--json_only")]
    try:
        def served(url, out, **kw):  # client settings small enough for a test, retries as in production
            return cfg(out, {"server_url": url, "server_timeout_s": 1.5, "server_retries": 2,
                             "server_backoff_s": 0.2}, **kw)

        cache_dir = tmp_path / "cache"
        spec = {
            "out": str(tmp_path / "driver.json"),
            "caches": {"k8": {"config": cfg("w", model_teacher), "cache_dir": str(cache_dir), "top_k": K,
                              "dtype": "fp16"}},
            "runs": [
                {"name": "cache", "config": cfg("from_cache", {"cache": str(cache_dir)})},
                {"name": "served", "config": served(urls[0], "served"), "wait_for": urls[0]},
                {"name": "lost", "config": served(urls[1], "lost"), "wait_for": urls[1]},
                {"name": "resumed", "config": served(urls[0], "lost"), "wait_for": urls[0]},
            ],
            "refusals": {
                "temperature": served(urls[0], "r1", loss={"temperature": 1.0}),
                "top_k": served(urls[0], "r2", loss={"top_k": 16}),
            },
        }
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        proc = run_single_rank(ROOT / "tests" / "scripts" / "served_teacher_driver.py", [str(tmp_path / "spec.json")])
        assert_ok(proc)
        res = json.loads((tmp_path / "driver.json").read_text())
        runs = res["runs"]
        assert runs["cache"]["code"] == runs["served"]["code"] == runs["resumed"]["code"] == 0, runs

        # --- 1. the server's rows == the offline cache's (same k, same T), through the client
        tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
        ds = data.build_dataset([str(train)], "guanaco", tok, 64)
        cache = tc.TopKCache(str(cache_dir))
        client = served_teacher.TeacherClient(urls[0], timeout_s=30, retries=0, backoff_s=0)
        got = client.topk(None, [r["input_ids"] for r in ds], K)  # vLLM's JSON answer
        got_binary = client.topk(None, [r["input_ids"] for r in ds], K, binary=True)  # ds_distill's extension
        for r, (ids, lps), (b_ids, b_lps) in zip(ds, got, got_binary):
            assert torch.equal(ids, b_ids) and torch.equal(lps, b_lps)
            c_ids, c_lps = cache.sample_rows(r["sample_id"])
            assert torch.equal(ids, c_ids.long()), r["sample_id"]
            assert (lps - c_lps.float()).abs().max() < 4e-3  # fp16 rounding of log-probs in [-10, 0]

        # --- 2. training from the server == from the cache, with one 503 and one timeout retried
        a, b = _rows(tmp_path / "from_cache" / "metrics.jsonl"), _rows(tmp_path / "served" / "metrics.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
        for ra, rb in zip(a, b):
            for key in ("loss/total", "loss/kl", "loss/ce", "kd/topk_mass"):
                assert math.isclose(ra[key], rb[key], rel_tol=1e-3), (ra["step"], key, ra[key], rb[key])
        err = runs["served"]["stderr"]
        assert "HTTP 503" in err and "retry 1 of 2" in err, err[-3000:]
        assert "timed out" in err, err[-3000:]  # the delayed 4th request: the client's timeout, then a retry
        log1 = (tmp_path / "server1.log").read_text()
        assert "HTTP 503 to completions request 2" in log1 and "delay before completions request 4" in log1

        assert "binary answers" in runs["served"]["stderr"] and "JSON answers" in runs["lost"]["stderr"]

        # --- 3. the server gone: exit 2 naming the URL, step 2 saved, the resumed run == the uninterrupted one
        # (server 2 answers JSON only, server 1 binary: steps 1-2 also compare the two answers)
        lost = runs["lost"]
        assert lost["code"] == 2, lost
        assert f"the teacher server {urls[1]} did not answer" in lost["stderr"], lost["stderr"][-3000:]
        assert "The last completed step 2 is saved in" in lost["stderr"]
        assert servers[1].wait(timeout=30) != 0  # the fault hook ended it
        assert "exiting at completions request 3" in (tmp_path / "server2.log").read_text()
        ckpts = sorted(os.listdir(tmp_path / "lost" / "checkpoints"))
        assert any("2" in c for c in ckpts), ckpts
        c = _rows(tmp_path / "lost" / "metrics.jsonl")
        assert [r["step"] for r in c] == [1, 2, 3, 4]  # steps 1-2 of the first process, 3-4 after the resume
        assert "resumed from" in runs["resumed"]["stderr"]
        for ra, rc in zip(b, c):
            for key in ("loss/total", "loss/kl", "grad_norm"):
                assert math.isclose(ra[key], rc[key], rel_tol=1e-5), (ra["step"], key, ra[key], rc[key])

        # --- 4. refusals name the key
        ref = res["refusals"]
        assert "temperature: server 2.0, run loss.temperature 1.0" in ref["temperature"], ref
        assert "top_k: server at most 8, run loss.top_k 16" in ref["top_k"], ref
    finally:
        for s in servers:
            if s.poll() is None:
                s.send_signal(signal.SIGTERM)
                s.wait(timeout=30)
        for f in logs:
            f.close()
