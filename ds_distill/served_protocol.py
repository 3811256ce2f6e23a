"""The served teacher's wire protocol (no model, no process group): what ds_distill's client posts and how it
reads the answers, and the binary answer ds_distill's server offers. Shared by served_teacher.py (the client and
teacher source) and teacher_server.py (the server); the protocol itself is described in served_teacher.py.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import torch

from .errors import DistillError

FORMAT = "ds_distill.served_teacher"
VERSION = 1
MANIFEST_PATH = "/v1/ds_distill/manifest"
COMPLETIONS_PATH = "/v1/completions"
MODELS_PATH = "/v1/models"
TOKENIZE_PATH = "/tokenize"
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
# the binary answer (ds_distill's extension): asked for with this request field when the manifest lists "binary"
BINARY_FIELD = "ds_distill_binary"
MAGIC = b"DSDT\x01"
# a server without the manifest endpoint is checked by tokenizing this text on both sides (letters, digits, spaces,
# punctuation, a newline: what distinguishes two BPE vocabularies quickly)
PROBE_TEXT = "Distillation check: The quick brown fox jumps over 13 lazy dogs.\nres = f(x) + 42 # done"
# vLLM reports an impossible log-prob as -inf (JSON null or -Infinity): stored as this floor, as its echo path does
LOGPROB_FLOOR = -9999.0


# ----------------------------------------------------------------------------------------------------------------
# The protocol (pure functions: what is posted, how an answer is read)
# ----------------------------------------------------------------------------------------------------------------

def completions_request(model: Optional[str], prompts: list[list[int]], k: int) -> dict:
    """The /v1/completions body asking for the top-k prompt log-probs of each prompt (token ids, no text).

    max_tokens 1: vLLM generates at least one token (the answer's text and `logprobs` are ignored here)."""
    body = {"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k}
    if model is not None:
        body["model"] = model
    return body


def parse_prompt_logprobs(entries: list, n_tokens: int, k: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One choice's `prompt_logprobs` -> ids [n-1, k] int64 and log-probs [n-1, k] fp32, sorted by rank: row t is the
    distribution of token t + 1 (entries[t + 1]). Keys are token ids as JSON strings; each value holds `logprob` and
    `rank` (1 = most likely). Entries of rank above k (vLLM's prompt token) are dropped."""
    if not isinstance(entries, list) or len(entries) != n_tokens:
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise DistillError(f"teacher.server_url: {where}: prompt_logprobs holds {got} positions for a prompt of "
                           f"{n_tokens} tokens -> the server does not speak the completions protocol with "
                           "prompt_logprobs (README: 'Served teacher')")
    rows = max(n_tokens - 1, 0)
    flat_ids: list[int] = []
    flat_lps: list[float] = []
    for t in range(rows):
        pos = entries[t + 1]
        top = sorted((v["rank"], tok, v["logprob"]) for tok, v in (pos or {}).items()
                     if v.get("rank") is not None and v["rank"] <= k)
        if len(top) != k:
            raise DistillError(f"teacher.server_url: {where}, position {t + 1}: {len(top)} entries of rank 1..{k}, "
                               f"expected {k} -> the server returned fewer log-probs than prompt_logprobs asked "
                               "for (vLLM: start it with --max-logprobs >= loss.top_k)")
        flat_ids += [int(tok) for _, tok, _ in top]
        flat_lps += [LOGPROB_FLOOR if lp is None else lp for _, _, lp in top]
    ids = torch.tensor(flat_ids, dtype=torch.int64).view(rows, k)
    lps = torch.tensor(flat_lps, dtype=torch.float32).view(rows, k).clamp_(min=LOGPROB_FLOOR)
    if rows and float(torch.logsumexp(lps, dim=1).max()) > 1e-3:  # top-k mass above 1: logits, not log-probs
        raise DistillError(f"teacher.server_url: {where}: the top-{k} values hold more than probability 1 -> the "
                           "server returns logits, not log-probabilities (vLLM: keep --logprobs-mode raw_logprobs)")
    return ids, lps


def binary_answer(rows: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> bytes:
    """ds_distill's binary answer (an extension, not vLLM's): MAGIC, a little-endian uint32 header length, a JSON
    header {"k": k, "rows": [rows of each prompt]}, then every prompt's ids as int32 [R, k] and log-probs as float32
    [R, k], little-endian. About 8 bytes per value instead of ~75 in JSON, and read without a JSON parser."""
    import numpy as np

    header = json.dumps({"k": k, "rows": [int(i.shape[0]) for i, _ in rows]}).encode()
    ids = np.concatenate([i.numpy().astype("<i4") for i, _ in rows]) if rows else np.zeros((0, k), "<i4")
    lps = np.concatenate([lp.numpy().astype("<f4") for _, lp in rows]) if rows else np.zeros((0, k), "<f4")
    return MAGIC + len(header).to_bytes(4, "little") + header + ids.tobytes() + lps.tobytes()


def read_binary_answer(raw: bytes, prompts: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The rows of a binary answer (binary_answer), checked against the prompts; ValueError if it does not read."""
    import numpy as np

    if raw[:len(MAGIC)] != MAGIC:
        raise ValueError("no binary answer magic")
    n = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    header = json.loads(raw[start:start + n])
    rows = header["rows"]
    if header["k"] != k or rows != [max(len(p) - 1, 0) for p in prompts]:
        raise ValueError(f"binary answer for k {header['k']} and rows {rows[:4]}..., not for this request")
    total = sum(rows)
    body = memoryview(raw)[start + n:]
    if len(body) != total * k * 8:
        raise ValueError(f"binary answer of {len(body)} bytes after the header, expected {total * k * 8}")
    ids = torch.from_numpy(np.frombuffer(body[:total * k * 4], "<i4").astype(np.int64).reshape(total, k))
    lps = torch.from_numpy(np.frombuffer(body[total * k * 4:], "<f4").astype(np.float32).reshape(total, k))
    if total and float(torch.logsumexp(lps, dim=1).max()) > 1e-3:
        raise ValueError("binary answer's top-k hold more than probability 1")
    return list(zip(ids.split(rows), lps.split(rows)))


def identity_differences(server: dict, run: dict) -> list[str]:
    """'key: server X, run Y' for every identity field on which the served teacher cannot serve this run."""
    out = []
    if server.get("format") != FORMAT or server.get("version") != VERSION:
        out.append(f"format: server {server.get('format')!r} v{server.get('version')}, run {FORMAT!r} v{VERSION}")
    if server.get("tokenizer_fingerprint") != run["tokenizer_fingerprint"]:
        out.append(f"tokenizer_fingerprint: server {_short(server.get('tokenizer_fingerprint'))}, run "
                   f"{_short(run['tokenizer_fingerprint'])} (tokenizer_path)")
    if not isinstance(server.get("max_length"), int) or server["max_length"] < run["max_length"]:
        out.append(f"max_length: server {server.get('max_length')}, run data.max_length {run['max_length']} "
                   "(the server must accept prompts that long)")
    if not isinstance(server.get("top_k"), int) or server["top_k"] < run["top_k"]:
        out.append(f"top_k: server at most {server.get('top_k')}, run loss.top_k {run['top_k']}")
    if not (isinstance(server.get("temperature"), (int, float))
            and math.isclose(float(server["temperature"]), run["temperature"], rel_tol=1e-9)):
        out.append(f"temperature: server {server.get('temperature')}, run loss.temperature {run['temperature']}")
    return out


def _short(fp) -> str:
    return str(fp)[:19] if fp else str(fp)
