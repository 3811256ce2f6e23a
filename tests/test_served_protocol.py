"""Served teacher (issue 16), in one process: the protocol reader on vLLM's answer shape, the client's checks of a
server without the ds_distill manifest (vLLM's API, played by a small in-process HTTP server: no vLLM can run
here), the server's batching of concurrent requests, and the config checks naming their keys.

The vLLM-shaped answers follow vllm/entrypoints/openai/completion/protocol.py (CompletionResponseChoice.prompt_logprobs:
list[dict[int, Logprob] | None], the first position None; each dict holds the top-k with ranks 1..k plus the prompt's
own token with its rank when that is not among them) and vllm/logprobs.py (Logprob: logprob, rank, decoded_token).
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from conftest import tiny_config, write_yaml


def _vllm_position(top: list[tuple[int, float]], own: tuple[int, float, int] | None) -> dict:
    d = {}
    if own is not None:  # vLLM inserts the prompt token first
        d[str(own[0])] = {"logprob": own[1], "rank": own[2], "decoded_token": "x"}
    for r, (t, lp) in enumerate(top):
        d[str(t)] = {"logprob": lp, "rank": r + 1, "decoded_token": "y"}
    return d


def test_reads_vllm_prompt_logprobs():
    from ds_distill.errors import DistillError
    from ds_distill.served_protocol import parse_prompt_logprobs

    entries = [None,
               _vllm_position([(7, -0.5), (3, -1.25)], own=(11, -6.0, 40)),  # own token outside the top-2: dropped
               _vllm_position([(2, -0.1), (9, -2.5)], own=(9, -2.5, 2)),  # own token inside: one entry
               _vllm_position([(4, None), (5, -1.0)], own=None)]  # null: vLLM's -inf
    entries[3] = {"5": {"logprob": -1.0, "rank": 2}, "4": {"logprob": None, "rank": 1}}  # key order is not rank order
    ids, lps = parse_prompt_logprobs(json.loads(json.dumps(entries)), 4, 2, "prompt 0")
    assert ids.tolist() == [[7, 3], [2, 9], [4, 5]]
    assert lps.tolist() == [[-0.5, -1.25], [-0.10000000149011612, -2.5], [-9999.0, -1.0]]
    logits = [None] + [_vllm_position([(1, 3.0), (2, 2.5)], own=None)] * 3  # --logprobs-mode raw_logits
    with pytest.raises(DistillError, match="logits, not log-probabilities"):
        parse_prompt_logprobs(logits, 4, 2, "prompt 0")
    with pytest.raises(DistillError, match="--max-logprobs"):  # fewer entries than asked
        parse_prompt_logprobs(entries, 4, 3, "prompt 0")
    with pytest.raises(DistillError, match="3 positions for a prompt of 5 tokens"):
        parse_prompt_logprobs(entries[:3], 5, 2, "prompt 0")


class _FakeVLLM(BaseHTTPRequestHandler):
    """vLLM's routes the client uses when /v1/ds_distill/manifest is absent: /v1/models, /tokenize (404 else)."""
    tokens: list[int] = []

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": "Qwen/Qwen3-8B", "max_model_len": 4096}]})
        self._send(404, {"error": {"message": "Not Found", "code": 404}})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/tokenize":
            return self._send(200, {"count": len(self.tokens), "max_model_len": 4096, "tokens": self.tokens})
        self._send(404, {"error": {"message": "Not Found", "code": 404}})


def test_server_without_manifest_is_checked_as_vllm(tiny_assets):
    from transformers import AutoTokenizer

    from ds_distill.errors import DistillError
    from ds_distill.served_protocol import PROBE_TEXT
    from ds_distill.served_teacher import ServedTeacher, TeacherClient

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVLLM)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        def source():
            return ServedTeacher(TeacherClient(url, timeout_s=5, retries=0, backoff_s=0), model=None, top_k=8)

        _FakeVLLM.tokens = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        s = source()
        line = s.verify(tokenizer=tok, tokenizer_fp="unused", max_length=64, temperature=1.0)
        assert s.model == "Qwen/Qwen3-8B" and "no /v1/ds_distill/manifest" in line
        with pytest.raises(DistillError, match=r"loss.temperature 2.0.*raw logits"):
            source().verify(tokenizer=tok, tokenizer_fp="unused", max_length=64, temperature=2.0)
        _FakeVLLM.tokens = _FakeVLLM.tokens[::-1]
        with pytest.raises(DistillError, match="tokenizer: the server tokenizes a probe text"):
            source().verify(tokenizer=tok, tokenizer_fp="unused", max_length=64, temperature=1.0)
        with pytest.raises(DistillError, match="max_length: server max_model_len 4096, run data.max_length 8192"):
            source().verify(tokenizer=tok, tokenizer_fp="unused", max_length=8192, temperature=1.0)
    finally:
        srv.shutdown()


def test_server_batches_concurrent_requests(tiny_assets, tmp_path):
    from ds_distill.config import parse_config
    from ds_distill.teacher_server import Batcher, TopKModel, completion_response
    from ds_distill.served_protocol import binary_answer, parse_prompt_logprobs, read_binary_answer

    cfg = parse_config(["--config", write_yaml(tiny_config(tiny_assets, tmp_path / "o", loss={"temperature": 2.0}),
                                               tmp_path / "c.yaml")])
    model = TopKModel(cfg, top_k=8, device=torch.device("cpu"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    requests = [[torch.randint(0, 1000, (n,), generator=g).tolist() for n in lens]
                for lens in ([5, 17], [30], [3, 9, 12])]
    batcher = Batcher(model, max_batch_tokens=4096, start=False)
    answers = [None] * len(requests)

    def ask(i):
        answers[i] = batcher.submit(requests[i], 4 + i)  # each request its own k

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    while batcher.jobs.qsize() < len(requests):  # all three queued before the model thread starts
        threading.Event().wait(0.01)
    batcher.start()
    for t in threads:
        t.join(60)
    assert batcher.batches == 1, "three concurrent requests, one merged forward"
    # each prompt alone through the HF model's own forward: log_softmax(logits / T), top-k
    hf = model.hidden.model
    for i, (req, rows) in enumerate(zip(requests, answers)):
        k = 4 + i
        for p, (ids, lps) in zip(req, rows):
            with torch.no_grad():
                ref = torch.log_softmax(hf(input_ids=torch.tensor([p])).logits[0, :-1, :1000].float() / 2.0, -1)
            top = ref.topk(k, -1)
            assert torch.equal(ids.long(), top.indices)
            assert (lps - top.values).abs().max() < 1e-5
        # the binary answer reads back to the same rows, bit for bit
        back = read_binary_answer(binary_answer(rows, k), req, k)
        assert all(torch.equal(a.long(), c) and torch.equal(b, d) for (a, b), (c, d) in zip(rows, back))
        with pytest.raises(ValueError, match="not for this request"):
            read_binary_answer(binary_answer(rows, k), [p + [1] for p in req], k)
        # and the JSON answer reads back to the same rows
        answer = json.loads(json.dumps(completion_response("t", req, rows)))
        for p, c, (ids, lps) in zip(req, answer["choices"], rows):
            got_ids, got_lps = parse_prompt_logprobs(c["prompt_logprobs"], len(p), k, "x")
            assert torch.equal(got_ids, ids.long()) and torch.equal(got_lps, lps)


def test_config_checks_name_the_server_keys(tiny_assets, tmp_path):
    from ds_distill.config import parse_config, validate
    from ds_distill.errors import ConfigError

    def problems(**teacher_and_sections):
        sections = {k: v for k, v in teacher_and_sections.items() if k != "teacher"}
        c = tiny_config(tiny_assets, tmp_path / "o", **sections)
        c["teacher"] = teacher_and_sections["teacher"]
        with pytest.raises(ConfigError) as e:
            validate(parse_config(["--config", write_yaml(c, tmp_path / "c.yaml")]))
        return str(e.value)

    msg = problems(teacher={"server_url": "teacher-host:8000", "server_timeout_s": 0, "server_retries": -1},
                   loss={"impl": "chunked"}, data={"packing": True})
    for needle in ("teacher.server_url: 'teacher-host:8000' is not an http(s) URL", "loss.impl: 'chunked' cannot use "
                   "teacher.server_url", "data.packing: true cannot be used with teacher.server_url",
                   "teacher.server_timeout_s: 0", "teacher.server_retries: -1"):
        assert needle in msg, msg
    msg = problems(teacher={"server_url": "http://h:1", "server_timeout_s": 600, "server_retries": 3},
                   loss={"impl": "topk"}, train={"watchdog_timeout_s": 1800})
    assert "up to 2407 s of waiting on the server, not below train.watchdog_timeout_s (1800)" in msg, msg
    msg = problems(teacher={"server_url": "http://h:1", "path": tiny_assets["teacher"]}, loss={"impl": "topk"})
    assert "teacher.server_url: set together with teacher.path" in msg


@pytest.mark.multirank
def test_lost_server_stops_every_rank(tmp_path):
    """Two gloo ranks: when only rank 1 loses the server, both raise at the same step (the per-step collective)."""
    import math
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    live, dead, master = free_port(), free_port(), free_port()
    out = tmp_path / "res"
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "scripts" / "served_collective.py"),
                                       str(live), f"http://127.0.0.1:{dead}", str(out)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    r0, r1 = (json.loads(open(f"{out}.rank{r}.json").read()) for r in (0, 1))
    lp = math.log(1 / 8)
    for r in (r0, r1):  # step 1: rows 0..len-2 from the server, the rest and filler samples uniform over k
        assert r["step1"]["ids"][0] == [0, 1, 2, 3] and abs(r["step1"]["lps"][0][0] - lp) < 1e-6
        assert abs(r["step1"]["filler"][0][0] - math.log(1 / 4)) < 1e-6
    assert r0["step1"]["ids"][1] == [0, 1, 2, 3] and abs(r0["step1"]["lps"][2][0] - math.log(1 / 4)) < 1e-6
    assert f"the teacher server http://127.0.0.1:{dead} did not answer" in r1["step2"]["error"]
    assert "another rank lost the teacher server" in r0["step2"]["error"], r0
