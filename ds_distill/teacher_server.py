"""A HF teacher behind HTTP, speaking the protocol of served_teacher.py / served_protocol.py (vLLM's completions
with prompt_logprobs).

    python launch/serve_teacher.py --config X.yaml --port P [--host 127.0.0.1] [--top_k K] [--max_batch_tokens N]

Endpoints:
- `POST /v1/completions` {"prompt": [[ids], ...] | [ids], "prompt_logprobs": k, ...}: for each prompt, `choices[i]`
  with `prompt_logprobs` = [null, {"<id>": {"logprob", "rank", "decoded_token": null}, ...} per later position]:
  the top-k of softmax(transform(hidden @ lm_head^T + bias) / T) over the real vocabulary (teacher_cache.topk_logprobs,
  the model's own head: Gemma's softcap, Cohere's scale... and T = the config's loss.temperature). No token is
  generated (`text` is "", `finish_reason` "length"); vLLM would generate max_tokens of them.
  With `"ds_distill_binary": true` (ds_distill's client, when the manifest lists it) the same rows come as the binary
  answer of served_protocol.binary_answer instead (--json_only turns that off).
- `GET /v1/ds_distill/manifest`: what the log-probs are (tokenizer fingerprint, max_length, largest k, temperature,
  vocabulary size, teacher fingerprint, answer formats): the client's identity check.
- `GET /v1/models`, `POST /tokenize`, `GET /health`: the parts of vLLM's API the client also uses.

Batching: each HTTP request is handled on its own thread, which queues its prompts; one model thread takes
everything queued (up to max_batch_tokens padded tokens), runs one forward over the padded batch and one top-k, and
hands each request its rows. Concurrent student ranks (or jobs) therefore share forwards.

The server has no authentication: it binds 127.0.0.1 unless --host says otherwise; put it behind a private network.

Test faults: faults.SERVE_FAULTS_ENV (read at start; see faults.py).
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import torch

from . import faults, heads, models, teacher_cache, vocab
from .errors import DistillError
from .served_protocol import (BINARY_FIELD, COMPLETIONS_PATH, FORMAT, MANIFEST_PATH, MODELS_PATH, TOKENIZE_PATH,
                              VERSION, binary_answer)

MAX_BODY_BYTES = 64 << 20


class BadRequest(Exception):
    """A request the server refuses (HTTP 400), with the reason."""


class TopKModel:
    """The teacher and its head on one device; `topk(prompts, k)` for a batch of prompts (the model thread only)."""

    def __init__(self, cfg, *, top_k: int, device: torch.device, dtype: torch.dtype, binary: bool = True):
        t = cfg.teacher
        if t.path is None:
            raise DistillError("teacher.path: required to serve a teacher -> the teacher's model directory")
        models.check_model_dir(t.path, "teacher.path", t.allow_pickle_weights)
        self.tokenizer = models.load_tokenizer(cfg.resolved_tokenizer_path, cfg.tokenizer_trust_remote_code)
        if cfg.resolved_tokenizer_path != t.path:
            vocab.check_tokenizers_compatible(models.load_tokenizer(t.path, t.trust_remote_code), self.tokenizer)
        model = models.load_causal_lm(t.path, dtype=dtype, trust_remote_code=t.trust_remote_code,
                                      allow_pickle=t.allow_pickle_weights).to(device).eval()
        self.rows = models.vocab_rows(model)
        self.vocab_size, _ = vocab.reconcile_vocab(self.rows, self.rows, len(self.tokenizer))
        if not 0 < top_k <= self.vocab_size:
            raise DistillError(f"--top_k: {top_k} must be in [1, {self.vocab_size}] (the real vocabulary size)")
        self.hidden = models.TeacherHidden(model)
        self.head = heads.of_model(model)
        self.top_k, self.device = top_k, device
        self.temperature = float(cfg.loss.temperature)
        self.max_length = cfg.data.max_length
        self.chunk_size = cfg.loss.chunk_size
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.name = os.path.basename(os.path.normpath(t.path))
        self.manifest = {
            "format": FORMAT, "version": VERSION, "model": self.name, "top_k": top_k,
            "temperature": self.temperature, "max_length": self.max_length, "vocab_size": self.vocab_size,
            "teacher_vocab_rows": self.rows, "transform": self.head.transform.describe(),
            "tokenizer_fingerprint": teacher_cache.tokenizer_fingerprint(self.tokenizer),
            "teacher_fingerprint": teacher_cache.teacher_fingerprint(t.path),
            "answer_formats": ["json", "binary"] if binary else ["json"],
        }
        self.binary = binary

    @torch.no_grad()
    def topk(self, prompts: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [n-1, k] int32, log-probs [n-1, k] fp32) per prompt: one padded forward, one top-k."""
        n = [len(p) for p in prompts]
        S = max(n)
        ids = torch.full((len(prompts), S), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), S), dtype=torch.long)
        for i, p in enumerate(prompts):  # right padding, as data.collate: real positions never see a pad
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        mask = mask.to(self.device)
        hidden = self.hidden(ids.to(self.device), mask)  # [B, S, H]
        valid = mask[:, 1:].bool()  # [B, S-1]: row t of a prompt predicts its token t + 1
        top_ids, top_lps = teacher_cache.topk_logprobs(
            hidden[:, :-1][valid], self.head.weight, bias=self.head.bias, transform=self.head.transform,
            vocab_size=self.vocab_size, k=k, temperature=self.temperature, chunk_size=self.chunk_size)
        out, start = [], 0
        for length in n:
            out.append((top_ids[start:start + length - 1].cpu(), top_lps[start:start + length - 1].cpu()))
            start += length - 1
        return out

    def check(self, prompts, k) -> list[list[int]]:
        """The request's prompts as lists of ids, or BadRequest saying what is wrong."""
        if isinstance(prompts, list) and prompts and all(isinstance(x, int) for x in prompts):
            prompts = [prompts]  # one prompt of token ids, as vLLM accepts
        if not isinstance(prompts, list) or not prompts or not all(
                isinstance(p, list) and p and all(isinstance(x, int) for x in p) for p in prompts):
            raise BadRequest("prompt: a list of token-id lists is required (this server takes no text)")
        if not isinstance(k, int) or not 0 < k <= self.top_k:
            raise BadRequest(f"prompt_logprobs: {k!r} must be an integer in [1, {self.top_k}] (--top_k)")
        for i, p in enumerate(prompts):
            if len(p) > self.max_length:
                raise BadRequest(f"prompt {i}: {len(p)} tokens, more than this server's max_length {self.max_length}")
            if min(p) < 0 or max(p) >= self.rows:
                raise BadRequest(f"prompt {i}: token ids in [{min(p)}, {max(p)}], outside [0, {self.rows})")
        return prompts


class Batcher:
    """One model thread; request threads call `submit` and wait for their rows."""

    def __init__(self, model: TopKModel, max_batch_tokens: int, start: bool = True):
        self.model, self.max_batch_tokens = model, max_batch_tokens
        self.jobs: queue.Queue = queue.Queue()
        self.batches = 0  # merged batches run (fewer than requests when concurrent requests were merged)
        if start:
            self.start()

    def start(self) -> None:
        threading.Thread(target=self._loop, daemon=True, name="teacher-batcher").start()

    def submit(self, prompts: list[list[int]], k: int):
        job = {"prompts": prompts, "k": k, "done": threading.Event(), "rows": None, "error": None}
        self.jobs.put(job)
        job["done"].wait()
        if job["error"] is not None:
            raise job["error"]
        return job["rows"]

    def _loop(self) -> None:
        while True:
            batch = [self.jobs.get()]
            tokens = len(batch[0]["prompts"]) * max(map(len, batch[0]["prompts"]))
            while True:  # merge what is already queued, up to the token budget
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                tokens += len(job["prompts"]) * max(map(len, job["prompts"]))
                if tokens >= self.max_batch_tokens:
                    break
            try:
                prompts = [p for j in batch for p in j["prompts"]]
                k = max(j["k"] for j in batch)
                per = max(1, self.max_batch_tokens // max(map(len, prompts)))  # prompts per forward
                rows = []
                for c0 in range(0, len(prompts), per):
                    rows += self.model.topk(prompts[c0:c0 + per], k)
                self.batches += 1
                start = 0
                for j in batch:
                    j["rows"] = [(i[:, :j["k"]], lp[:, :j["k"]]) for i, lp in rows[start:start + len(j["prompts"])]]
                    start += len(j["prompts"])
            except Exception as e:  # noqa: BLE001 -- the waiting requests answer 500 with it; the server stays up
                for j in batch:
                    j["error"] = e
            for j in batch:
                j["done"].set()


def completion_response(model_name: str, prompts: list[list[int]], rows) -> dict:
    """vLLM's CompletionResponse shape, prompt_logprobs filled in (ids as JSON string keys, ranks from 1)."""
    choices = []
    for i, (p, (ids, lps)) in enumerate(zip(prompts, rows)):
        entries: list = [None]
        for r_ids, r_lps in zip(ids.tolist(), lps.tolist()):
            entries.append({str(t): {"logprob": lp, "rank": rank + 1, "decoded_token": None}
                            for rank, (t, lp) in enumerate(zip(r_ids, r_lps))})
        choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                        "prompt_logprobs": entries, "prompt_token_ids": p})
    n = sum(map(len, prompts))
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}


def make_handler(model: TopKModel, batcher: Batcher, serve_faults: dict):
    counter = {"completions": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr is noise at a request per step
            pass

        def _send(self, status: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:  # vLLM's ErrorResponse shape
            self._send(status, {"error": {"message": message, "type": "BadRequestError" if status == 400 else
                                          "InternalServerError", "param": None, "code": status}})

        def do_GET(self):
            if self.path == MANIFEST_PATH:
                self._send(200, model.manifest)
            elif self.path == MODELS_PATH:
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model",
                                                              "max_model_len": model.max_length}]})
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._error(413, f"request body of {length} bytes, more than {MAX_BODY_BYTES}")
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as e:
                return self._error(400, f"the body is not JSON: {e}")
            if self.path == TOKENIZE_PATH:
                ids = model.tokenizer(str(body.get("prompt", "")),
                                      add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
                return self._send(200, {"count": len(ids), "max_model_len": model.max_length, "tokens": ids})
            if self.path != COMPLETIONS_PATH:
                return self._error(404, f"no route {self.path}")
            with lock:
                counter["completions"] += 1
                nth = counter["completions"]
            fault = faults.at_served_request(serve_faults, nth)
            if fault:
                return self._error(503, fault)
            try:
                prompts = model.check(body.get("prompt"), body.get("prompt_logprobs"))
                rows = batcher.submit(prompts, body["prompt_logprobs"])
            except BadRequest as e:
                return self._error(400, str(e))
            except Exception as e:  # noqa: BLE001 -- reported to the client (which retries 500), logged here
                print(f"[serve_teacher] request {nth} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                return self._error(500, f"{type(e).__name__}: {e}")
            try:
                if body.get(BINARY_FIELD) and model.binary:
                    raw = binary_answer(rows, body["prompt_logprobs"])
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                else:
                    self._send(200, completion_response(model.name, prompts, rows))
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): nothing to answer
                pass

    return Handler


def serve(cfg, *, host: str, port: int, top_k: Optional[int] = None, max_batch_tokens: int = 16384,
          dtype: Optional[str] = None, binary: bool = True, ready=None) -> None:
    """Load the teacher, then answer requests until the process is stopped. `ready(server)` is called once the
    socket listens (tests); a line '[serve_teacher] listening on http://host:port' is printed then."""
    serve_faults = faults.serve_faults()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = TopKModel(cfg, top_k=top_k or cfg.loss.top_k, device=device, dtype=torch_dtype, binary=binary)
    batcher = Batcher(model, max_batch_tokens)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(model, batcher, serve_faults))
    except OSError as e:
        raise DistillError(f"--port: cannot listen on {host}:{port} ({e}) -> choose a free port") from None
    server.daemon_threads = True
    print(f"[serve_teacher] {model.name} ({dtype} on {device}, {model.manifest['transform']}): top-{model.top_k} "
          f"log-probs at T={model.temperature}, max_length {model.max_length}, vocab {model.vocab_size}, answers "
          f"{'/'.join(model.manifest['answer_formats'])}"
          + (f", test faults {serve_faults}" if serve_faults else ""), flush=True)
    print(f"[serve_teacher] listening on http://{host}:{server.server_address[1]}", flush=True)
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
