"""Served teacher (teacher.server_url): the teacher's top-k log-probs per position, asked of an HTTP server.

The protocol is vLLM's OpenAI-compatible completions endpoint with prompt log-probabilities, so that a vLLM server
on GPUs can be the teacher; `launch/serve_teacher.py` (ds_distill/teacher_server.py) serves a HF teacher the same
way. One request per step and rank carries every sample of the step's micro-batches:

    POST <url>/v1/completions
        {"model": M, "prompt": [[ids of sample 1], [ids of sample 2], ...], "max_tokens": 1, "prompt_logprobs": k}
    -> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob": x, "rank": r, ...}, ...}, ...]},
                    ...]}

`prompt_logprobs[t]` (t >= 1) is the teacher's distribution of the token at t given the tokens before it: the k
entries of rank 1..k (vLLM adds the prompt's own token at t with its rank when that is not among them; it is
dropped here). Row t of the loss (aligned with labels[:, 1:]) is therefore `prompt_logprobs[t + 1]`. The log-probs
are normalised over the teacher's whole vocabulary, so the tail mass is 1 - sum(exp(top-k)).

Binary answers (ds_distill's extension, not vLLM's): a server whose manifest lists "binary" in `answer_formats`
(launch/serve_teacher.py) is asked with `"ds_distill_binary": true` and answers the same rows as int32 ids and
float32 log-probs after a small header (`binary_answer`): about 8 bytes per value instead of ~75, read without a
JSON parser. The JSON answer stays the protocol every server speaks.

Identity, checked before the first step (as the offline cache's manifest is): the server's
`GET /v1/ds_distill/manifest` reports its tokenizer fingerprint, max_length, the largest k it serves, the
temperature its log-probs are at, and the vocabulary size; each must match the run (a DistillError names the key).
A server without that endpoint (vLLM) is checked as far as its API allows: `GET /v1/models` (max_model_len),
`POST /tokenize` of a probe text (the tokenizer gives the same ids), and loss.temperature must be 1, because vLLM's
prompt log-probs are computed from the raw logits whatever the request's temperature (README: 'Served teacher').

Failures: every request has a timeout (teacher.server_timeout_s) and is retried on connection errors, timeouts and
HTTP 429/5xx with exponential backoff (teacher.server_backoff_s, doubled each time, teacher.server_retries times).
Other HTTP errors (400: a prompt too long, k above the server's limit) are not retried. When the retries run out,
or a request is refused, or an answer does not read, all ranks learn it in the same collective (one small
all-reduce per step) and raise `TeacherUnavailable` together, with the failing rank's message; the trainer then
checkpoints the last completed step and the run exits with code 2.
"""
from __future__ import annotations

import http.client
import json
import math
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

import torch

from . import engines, teachers
from .errors import DistillError
from .served_protocol import (BINARY_FIELD, COMPLETIONS_PATH, MANIFEST_PATH, MODELS_PATH, PROBE_TEXT, RETRY_STATUS,
                              TOKENIZE_PATH, _short, completions_request, identity_differences, parse_prompt_logprobs,
                              read_binary_answer)


class TeacherUnavailable(DistillError):
    """The teacher server did not answer within its retries; every rank raises it from one collective decision."""
    shared = True


class ServerRefused(DistillError):
    """The server answered a request with an error that a retry cannot fix (HTTP 4xx other than 408 / 429)."""


# ----------------------------------------------------------------------------------------------------------------
# The client: timeouts, retries with backoff
# ----------------------------------------------------------------------------------------------------------------

class TeacherClient:
    """HTTP to one teacher server (JSON requests; JSON or binary answers), every request with a timeout and retries
    (module docstring)."""

    def __init__(self, url: str, *, timeout_s: float, retries: int, backoff_s: float, rank: int = 0):
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.backoff_s, self.rank = timeout_s, retries, backoff_s, rank
        self.retried = 0  # retries made so far (logged; a test checks an injected fault was retried)
        # no proxy: http_proxy / https_proxy of the environment are for the internet, the teacher is a private host
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, path: str, body: Optional[dict] = None, decode=json.loads):
        """GET (body None) or POST `path`; the answer's bytes through `decode` (JSON by default; a decoding error
        counts as a failed attempt). Raises ServerRefused for a non-retryable HTTP error (its `status` attribute
        holds the code), TeacherUnavailable when the retries run out."""
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                print(f"[ds_distill] rank {self.rank}: teacher server {self.url}{path}: {last}; retry {attempt} of "
                      f"{self.retries} in {wait:g} s", file=sys.stderr, flush=True)
                self.retried += 1
                time.sleep(wait)
            req = urllib.request.Request(self.url + path, data=data, method="GET" if data is None else "POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(req, timeout=self.timeout_s) as resp:
                    return decode(resp.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRY_STATUS:
                    err = ServerRefused(f"teacher.server_url: {self.url}{path} answered HTTP {e.code}: {message}")
                    err.status = e.code
                    raise err from None
                last = f"HTTP {e.code} ({message})"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError,
                    http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # a broken (cut) answer: JSON or binary that does not parse
                last = f"an answer that does not read ({e})"
        raise TeacherUnavailable(
            f"teacher.server_url: the teacher server {self.url} did not answer ({last}) after {self.retries} "
            f"retries (teacher.server_timeout_s {self.timeout_s:g} s per request, backoff from "
            f"{self.backoff_s:g} s) -> restart the server (launch/serve_teacher.py) or point teacher.server_url at a "
            "running one, then run the same command again: it resumes from the checkpoint")

    def topk(self, model: Optional[str], prompts: list[list[int]], k: int, binary: bool = False
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids [n-1, k], log-probs [n-1, k]) of each prompt, in order. `binary`: ask for the binary answer (only
        servers whose manifest lists it: launch/serve_teacher.py)."""
        body = completions_request(model, prompts, k)
        if binary:
            body[BINARY_FIELD] = True
            return self.request(COMPLETIONS_PATH, body, decode=lambda raw: read_binary_answer(raw, prompts, k))
        answer = self.request(COMPLETIONS_PATH, body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise DistillError(f"teacher.server_url: {self.url}{COMPLETIONS_PATH} answered "
                               f"{len(choices) if isinstance(choices, list) else 'no'} choices for {len(prompts)} "
                               "prompts -> is it a completions server (vLLM, launch/serve_teacher.py)?")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        return [parse_prompt_logprobs(c.get("prompt_logprobs"), len(p), k, f"prompt {i}")
                for i, (c, p) in enumerate(zip(choices, prompts))]


def _error_message(e: urllib.error.HTTPError) -> str:
    """The server's error text: vLLM's {"error": {"message": ...}} or {"message": ...}, else the body's start."""
    try:
        body = e.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 -- the status alone is still worth reporting
        return e.reason or ""
    try:
        d = json.loads(body)
        return str((d.get("error") or {}).get("message") if isinstance(d.get("error"), dict) else d.get("message")
                   or d.get("error") or body[:300])
    except (ValueError, AttributeError):
        return body[:300]


# ----------------------------------------------------------------------------------------------------------------
# The teacher source
# ----------------------------------------------------------------------------------------------------------------

class ServedTeacher(teachers.CachedTeacher):
    """teacher.server_url: each step's samples are posted (token ids, one request per rank and step), the answer
    becomes the same payload as the offline cache's (ids [B, S-1, k] int64, log-probs [B, S-1, k] fp32 at
    loss.temperature, aligned with labels[:, 1:]); its ids are checked and it reaches the loss as the cache's does
    (`side` is CachedTeacher's)."""

    kind = "server"
    vocab_rows = None  # no head on this side: the vocabulary is the student's (the server's is checked against it)

    def __init__(self, client: TeacherClient, *, model: Optional[str], top_k: int):
        self.client, self.model, self.k = client, model, top_k
        self.binary = False  # the server's manifest offers the binary answer (set by verify)
        self.identity = ""  # what verify checked (the start-up log line)

    def describe(self) -> str:
        return self.identity or self.summary()

    def summary(self) -> str:
        return (f"teacher server {self.client.url} (model {self.model!r}): top-{self.k} log-probs per position, "
                f"timeout {self.client.timeout_s:g} s, {self.client.retries} retries")

    def verify(self, *, tokenizer, tokenizer_fp: str, max_length: int, temperature: float) -> str:
        """Check the server against the run (module docstring); returns a line for the log. Raises DistillError
        naming each differing key. Collective-free: every rank asks (each must reach the server anyway)."""
        url = self.client.url
        try:
            manifest = self.client.request(MANIFEST_PATH)
        except ServerRefused as e:
            if getattr(e, "status", None) != 404:
                raise
            manifest = None
        if manifest is not None:
            diffs = identity_differences(manifest, {"tokenizer_fingerprint": tokenizer_fp, "max_length": max_length,
                                                    "top_k": self.k, "temperature": temperature})
            if diffs:
                raise DistillError(f"teacher.server_url: {url} serves another setup (" + "; ".join(diffs)
                                   + ") -> start the server with this run's config (launch/serve_teacher.py "
                                   "--config X.yaml), or change the keys named")
            self.model = self.model or manifest.get("model")
            self.vocab_size = manifest.get("vocab_size")
            self.binary = "binary" in (manifest.get("answer_formats") or [])
            self.identity = (f"{self.summary()}; identity checked: tokenizer, max_length {manifest['max_length']}, "
                    f"k <= {manifest['top_k']}, T {manifest['temperature']}, vocab {manifest.get('vocab_size')}, "
                    f"teacher {_short(manifest.get('teacher_fingerprint'))}, "
                    f"{'binary' if self.binary else 'JSON'} answers")
            return self.identity
        # a server without the manifest (vLLM): what its API lets us check
        models = self.client.request(MODELS_PATH).get("data") or []
        if not models:
            raise DistillError(f"teacher.server_url: {url}{MODELS_PATH} lists no model -> is the server up?")
        if self.model is None:
            self.model = models[0].get("id")
        entry = next((m for m in models if m.get("id") == self.model), None)
        if entry is None:
            raise DistillError(f"teacher.server_model: {self.model!r} is not served by {url} (it lists "
                               f"{[m.get('id') for m in models]}) -> set teacher.server_model to one of them")
        problems = []
        mml = entry.get("max_model_len")
        if isinstance(mml, int) and mml < max_length + 1:  # + the one generated token
            problems.append(f"max_length: server max_model_len {mml}, run data.max_length {max_length} (+1)")
        if temperature != 1.0:
            problems.append(f"temperature: run loss.temperature {temperature}, but a server without "
                            f"{MANIFEST_PATH} (vLLM) returns prompt log-probs of the raw logits (T = 1) -> "
                            "loss.temperature: 1, or serve with launch/serve_teacher.py")
        theirs = self.client.request(TOKENIZE_PATH, {"model": self.model, "prompt": PROBE_TEXT,
                                                     "add_special_tokens": False}).get("tokens")
        ours = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            problems.append(f"tokenizer: the server tokenizes a probe text as {str(theirs)[:60]}, this run's "
                            f"tokenizer as {str(ours)[:60]} (tokenizer_path)")
        if problems:
            raise DistillError(f"teacher.server_url: {url} cannot serve this run (" + "; ".join(problems) + ")")
        self.identity = (f"{self.summary()}; no {MANIFEST_PATH} (a vLLM server?): checked max_model_len {mml}, a "
                         "tokenizer probe and T = 1; not checked: k limit (vLLM --max-logprobs), the teacher's "
                         "identity")
        return self.identity

    def check_vocab_size(self, vocab_size: int) -> None:
        served = getattr(self, "vocab_size", None)
        if served is not None and served != vocab_size:
            raise DistillError(f"teacher.server_url: {self.client.url} normalises over vocab_size {served}, this "
                               f"run over {vocab_size} (the tokenizer / the student's vocabulary) -> serve the "
                               "teacher with this run's tokenizer")

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        """One request for every sample of the step; then a collective flag (all ranks, every step) so that a
        server lost by any rank stops every rank at the same point."""
        prompts, where = [], []
        for m, mb in enumerate(micro_batches):
            lengths = mb["attention_mask"].sum(1).tolist()
            for b, sid in enumerate(mb["sample_ids"].tolist()):
                if sid >= 0:  # filler rows (-1) are never trained: no request
                    prompts.append(mb["input_ids"][b, :int(lengths[b])].tolist())
                    where.append((m, b))
        failure: Optional[TeacherUnavailable] = None
        rows: list = []
        try:
            rows = self.client.topk(self.model, prompts, self.k, binary=self.binary) if prompts else []
        except DistillError as e:  # no answer, a refused request (HTTP 4xx), an answer that does not read
            failure = e if isinstance(e, TeacherUnavailable) else TeacherUnavailable(str(e))
            print(f"[ds_distill] rank {self.client.rank}: {e}", file=sys.stderr, flush=True)
        lost = engines.all_reduce_max(torch.tensor([1.0 if failure else 0.0], device=engines.device()))
        if float(lost[0]) > 0:  # host sync: one per step, the price of stopping all ranks together
            raise failure or TeacherUnavailable(
                f"teacher.server_url: another rank lost the teacher server {self.client.url} (its error is above)")
        out = []
        for mb in micro_batches:  # filler layout as TopKCache.batch: uniform over ids 0..k-1, never trained
            B, S = mb["attention_mask"].shape
            width = max(S - 1, 0)
            out.append((torch.arange(self.k, dtype=torch.int64).remainder(vocab_size).expand(B, width, self.k).clone(),
                        torch.full((B, width, self.k), -math.log(self.k), dtype=torch.float32)))
        for (m, b), (ids, lps) in zip(where, rows):
            n = ids.shape[0]
            out[m][0][b, :n] = ids
            out[m][1][b, :n] = lps
        for ids, _ in out:
            teachers.check_topk_ids(ids, vocab_size, "teacher.server_url",
                                    "serve the teacher with this run's tokenizer and vocabulary")
        return out


def build(cfg, rank: int) -> ServedTeacher:
    """The source for cfg.teacher (server_url set), not yet verified."""
    t = cfg.teacher
    client = TeacherClient(t.server_url, timeout_s=t.server_timeout_s, retries=t.server_retries,
                           backoff_s=t.server_backoff_s, rank=rank)
    return ServedTeacher(client, model=t.server_model, top_k=cfg.loss.top_k)


teachers.KINDS["server"] = ServedTeacher
