"""Offline teacher: the teacher's top-k per position, computed once, read back by sample id for every run.

Layout of a cache directory (written by `launch/cache_teacher.py`, read by the trainer via `teacher.cache`)::

    manifest.json            what the cache was made from (fingerprints, k, dtype...) and whether it is complete
    index.json               sample_id -> (shard, first row, number of rows), written once every shard is in
    shards/<name>.safetensors
        ids        [P, k] int32    top-k token ids per position, sorted by decreasing probability
        logprobs   [P, k] fp16/bf16/fp32   log-probabilities at the manifest's temperature (the run's
                                           loss.temperature), normalised over the FULL real vocabulary
                                           [0, vocab_size) (so the tail mass is 1 - sum(exp(logprobs)))
        sample_ids [n] int64, offsets [n] int64, lengths [n] int64   the shard's own index (rows of each sample)

Rows: a sample of `len` tokens has `len - 1` rows, positions 0..len-2, row t being the teacher's distribution for
the token at t + 1: aligned with the shifted labels the loss trains on (`labels[:, 1:]`). Every position is stored,
trained or not, so one cache serves any loss mask of the same tokens.

Storage per position (the `bytes_per_token` of the manifest): k * (4 + 2) bytes with fp16/bf16 log-probs
(k = 64: 384 B, 1M tokens = 0.38 GB), k * 8 with fp32. fp16 is the default: log-probs of a top-k lie in about
[-30, 0] where fp16 keeps 11 significant bits (error <= 2^-11 relative, i.e. <= 0.016 absolute at -30), twice bf16's.

Keys are sample ids (`data.build_dataset`'s global row index), never steps or ranks: shuffling, another world size
and resumption all find the same rows. The writer is resumable: a shard appears only by an atomic rename of a
complete file, so an interrupted run leaves complete shards plus at most some `*.tmp` files; a restart deletes the
`*.tmp`, reads which sample ids the complete shards hold, and computes only the rest. Nothing is pickled: tensors are
safetensors, the index and manifest JSON.

A cache is refused (DistillError naming each differing field) when its manifest does not match the run: the
tokenizer (its vocabulary), the data (a hash of every sample's token ids, which covers the files, format,
text_field, chat template and max_length), max_length itself, the real vocabulary size, or a loss.top_k larger than
the cached k.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import uuid
from typing import Iterable, Optional

from collections import OrderedDict

import numpy as np
import torch

from .errors import DistillError
from .heads import IDENTITY, HeadTransform

FORMAT = "ds_distill.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
SHARDS = "shards"
MAX_OPEN_SHARDS = 64
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# manifest fields that define what the rows mean: a resumed writer and a reading run must agree on them
IDENTITY_KEYS = ("format", "version", "top_k", "temperature", "dtype", "vocab_size", "max_length",
                 "tokenizer_fingerprint", "data_fingerprint", "teacher_fingerprint")


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------

def teacher_fingerprint(model_dir: str) -> str:
    """sha256 over the teacher's config.json and every *.safetensors file (name, size and all bytes).

    Reading every byte once is the price of a fingerprint that tells two fine-tunes of one architecture apart
    (the safetensors headers alone would not); it is small next to running the teacher over a dataset.
    """
    h = hashlib.sha256()
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    config = os.path.join(model_dir, "config.json")
    for path in ([config] if os.path.isfile(config) else []) + files:
        h.update(os.path.basename(path).encode() + b"\0" + str(os.path.getsize(path)).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the token -> id map (added and special tokens included) and the eos / pad / bos ids.

    Content-based: the same tokenizer saved in two directories (teacher dir, tokenizer dir) has one fingerprint.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps({"vocab": vocab, "len": len(tokenizer), "eos": tokenizer.eos_token_id,
                          "pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def data_fingerprint(dataset) -> str:
    """sha256 of (sample_id, length, token ids) of every sample in dataset order, as int64/int32 bytes.

    It is what the cached rows depend on: the files, format, text_field, chat template, tokenizer and max_length all
    act only through these ids. Reads Arrow buffers in batches (its cost: docs/BENCHMARKS.md, "Offline teacher").
    """
    import pyarrow as pa

    h = hashlib.sha256()
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        ids = table.column("input_ids").combine_chunks()
        if isinstance(ids, pa.ChunkedArray):  # an empty table
            continue
        sids = table.column("sample_id").to_numpy().astype(np.int64)
        lengths = ids.value_lengths().to_numpy().astype(np.int64)
        values = ids.flatten().to_numpy().astype(np.int32)
        h.update(sids.tobytes())
        h.update(lengths.tobytes())
        h.update(values.tobytes())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The teacher's top-k (pure tensor code)
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, *, vocab_size: int, k: int, temperature: float = 1.0,
                  chunk_size: int = 1024, bias: Optional[torch.Tensor] = None,
                  transform: HeadTransform = IDENTITY) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids [N, k] int32 and log-probs [N, k] fp32 of softmax(head logits / T), the head logits being the
    model's own: transform(hidden @ weight[:vocab_size].T + bias) (heads.py: Gemma's softcap, Cohere's scale...).

    The softmax is over the real vocabulary only (lm_head rows >= vocab_size are padding and never get mass).
    Logits exist `chunk_size` positions at a time ([chunk, V] fp32), from the fused loss's GEMM (`losses.mm_fp32`:
    bf16 teachers do not round logits to 8 bits before the softmax, and no fp32 copy of the lm_head is made) over
    its aligned width (`losses.gemm_width`; the padded columns are dropped before the softmax).
    """
    from .losses import gemm_width, mm_fp32

    w = weight[:gemm_width(vocab_size, weight)]  # [Vg, H] view
    b = bias[:vocab_size].float() if bias is not None else None
    n = hidden.shape[0]
    ids = torch.empty((n, k), dtype=torch.int32, device=hidden.device)
    lps = torch.empty((n, k), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, n, chunk_size):
        logits = mm_fp32(hidden[c0:c0 + chunk_size].to(w.dtype), w.T)[:, :vocab_size]  # [c, V] raw
        if b is not None:
            logits.add_(b)
        logits = transform(logits)  # the family's scale / softcap (heads.py)
        if temperature != 1.0:
            logits.div_(temperature)
        lse = torch.logsumexp(logits, dim=1, keepdim=True)  # [c, 1]
        vals, idx = logits.topk(k, dim=1)  # sorted, decreasing
        lps[c0:c0 + chunk_size] = vals - lse
        ids[c0:c0 + chunk_size] = idx.to(torch.int32)
    return ids, lps


# ----------------------------------------------------------------------------------------------------------------
# Files: manifest, shards, index
# ----------------------------------------------------------------------------------------------------------------

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic_write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(cache_dir: str) -> Optional[dict]:
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_manifest(cache_dir: str, manifest: dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    _atomic_write_json(os.path.join(cache_dir, MANIFEST), manifest)


def manifest_differences(cached: dict, expected: dict, keys: Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """'field: cache X, run Y' for every key in `keys` whose values differ (keys absent from `expected` skipped)."""
    out = []
    for key in keys:
        if key in expected and cached.get(key) != expected[key]:
            out.append(f"{key}: cache {_short(cached.get(key))}, run {_short(expected[key])}")
    return out


def _short(v) -> str:
    s = str(v)
    return s[:19] + "..." if s.startswith("sha256:") else s


class ShardWriter:
    """Buffers one rank's rows and writes them as shards of about `shard_positions` rows, each atomically."""

    def __init__(self, cache_dir: str, rank: int, dtype: str, shard_positions: int):
        self.dir = os.path.join(cache_dir, SHARDS)
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.dtype, self.shard_positions = rank, DTYPES[dtype], shard_positions
        self.prefix = f"shard-r{rank:04d}-{uuid.uuid4().hex[:8]}"  # unique per writer: restarts never collide
        self.seq = 0
        self._clear()
        self.samples_written = 0

    def _clear(self) -> None:
        self._ids: list[torch.Tensor] = []
        self._lps: list[torch.Tensor] = []
        self._sids: list[int] = []
        self._lens: list[int] = []
        self._positions = 0

    def add(self, sample_id: int, ids: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Rows of one sample: ids [n, k] int32, logprobs [n, k] (stored in the writer's dtype)."""
        self._ids.append(ids.to("cpu", torch.int32))
        self._lps.append(logprobs.to("cpu", self.dtype))
        self._sids.append(int(sample_id))
        self._lens.append(ids.shape[0])
        self._positions += ids.shape[0]
        if self._positions >= self.shard_positions:
            self.flush()

    def flush(self) -> None:
        if not self._sids:
            return
        from safetensors.torch import save_file

        lens = torch.tensor(self._lens, dtype=torch.int64)
        tensors = {"ids": torch.cat(self._ids), "logprobs": torch.cat(self._lps),
                   "sample_ids": torch.tensor(self._sids, dtype=torch.int64),
                   "offsets": torch.cumsum(lens, 0) - lens, "lengths": lens}
        final = os.path.join(self.dir, f"{self.prefix}-{self.seq:06d}.safetensors")
        tmp = final + ".tmp"
        save_file(tensors, tmp, metadata={"format": FORMAT + ".shard", "version": str(VERSION)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files: a shared cache must be readable
        os.replace(tmp, final)  # the shard exists only once complete
        self.seq += 1
        self.samples_written += len(self._sids)
        self._clear()


def shard_problem(path: str) -> Optional[str]:
    """Why a shard file cannot be read whole ('is missing', 'is truncated ...'), or None. Reads only the
    safetensors header (8-byte length + JSON): the data must end exactly at the end of the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"is truncated ({size} bytes: not even its header)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:
        return f"cannot be read ({e})"
    end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if end != size:
        return f"is truncated ({size} bytes, its header needs {end})" if size < end else \
            f"has {size - end} bytes more than its header describes"
    return None


def shard_paths(cache_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(cache_dir, SHARDS, "*.safetensors")))


def remove_partial_files(cache_dir: str) -> int:
    """Delete the *.tmp files an interrupted writer left behind; returns how many."""
    tmps = glob.glob(os.path.join(cache_dir, SHARDS, "*.tmp")) + glob.glob(os.path.join(cache_dir, "*.tmp"))
    for p in tmps:
        os.remove(p)
    return len(tmps)


def scan_shards(cache_dir: str) -> list[tuple[str, list[int], list[int], list[int]]]:
    """(shard file name, sample_ids, offsets, lengths) of every complete shard, reading only their small index."""
    from safetensors import safe_open

    out = []
    for path in shard_paths(cache_dir):
        try:
            with safe_open(path, framework="pt") as f:
                sids, offs, lens = (f.get_tensor(n).tolist() for n in ("sample_ids", "offsets", "lengths"))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise DistillError(f"teacher cache: shard {path} cannot be read ({e}); shards are written atomically, "
                               "so the file was damaged afterwards -> delete it and re-run launch/cache_teacher.py "
                               "to recompute its samples") from e
        out.append((os.path.basename(path), sids, offs, lens))
    return out


def cached_sample_ids(cache_dir: str) -> set[int]:
    return {sid for _, sids, _, _ in scan_shards(cache_dir) for sid in sids}


def build_index(cache_dir: str, expected: dict[int, int]) -> dict:
    """Check the shards hold every expected sample (sample_id -> rows) exactly once, and write index.json.

    Raises DistillError on a duplicate, a missing or unexpected sample, or a row count that differs.
    """
    shards = scan_shards(cache_dir)
    names = [name for name, _, _, _ in shards]
    seen: dict[int, tuple[int, int, int]] = {}
    problems = []
    for si, (name, sids, offs, lens) in enumerate(shards):
        for sid, off, n in zip(sids, offs, lens):
            if sid in seen:
                problems.append(f"sample {sid} is in {names[seen[sid][0]]} and in {name}")
            elif sid not in expected:
                problems.append(f"sample {sid} (in {name}) is not a sample of this data")
            elif n != expected[sid]:
                problems.append(f"sample {sid} has {n} rows in {name}, expected {expected[sid]}")
            seen[sid] = (si, off, n)
    missing = sorted(set(expected) - set(seen))
    if missing:
        problems.append(f"{len(missing)} samples are missing (e.g. {missing[:5]})")
    if problems:
        raise DistillError("teacher cache: the shards do not hold each sample exactly once: " + "; ".join(
            problems[:10]) + " -> delete the cache directory and write it again")
    order = sorted(seen)
    index = {"shards": names, "sample_ids": order, "shard": [seen[s][0] for s in order],
             "offset": [seen[s][1] for s in order], "length": [seen[s][2] for s in order]}
    _atomic_write_json(os.path.join(cache_dir, INDEX), index)
    return index


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

class TopKCache:
    """Read side: the rows of a micro-batch, by sample id, as the [B, S-1, k] tensors the top-k loss takes."""

    def __init__(self, cache_dir: str):
        self.dir = cache_dir
        manifest = read_manifest(cache_dir)
        if manifest is None:
            raise DistillError(f"teacher.cache: '{cache_dir}' has no {MANIFEST} -> write the cache with "
                               "launch/cache_teacher.py --config X.yaml --cache_dir DIR")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DistillError(f"teacher.cache: '{cache_dir}' is not a ds_distill teacher cache of version {VERSION} "
                               f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
        if not manifest.get("complete"):
            raise DistillError(f"teacher.cache: '{cache_dir}' is incomplete (the caching run was interrupted) -> "
                               "re-run launch/cache_teacher.py with the same arguments: it resumes")
        self.manifest = manifest
        with open(os.path.join(cache_dir, INDEX)) as f:
            index = json.load(f)
        self.shards = [os.path.join(cache_dir, SHARDS, n) for n in index["shards"]]
        for path in self.shards:  # found now, naming the file, not at the first step that reads a missing row
            why = shard_problem(path)
            if why:
                raise DistillError(f"teacher.cache: shard {path} {why} -> delete that shard and re-run "
                                   "launch/cache_teacher.py with the same arguments (it recomputes its samples), or "
                                   "write the cache again")
        # sorted arrays, not a dict: 8 bytes x 4 per sample (a dict of 10M samples would take ~1 GB per rank)
        self._sids = np.asarray(index["sample_ids"], dtype=np.int64)
        self._loc = np.stack([np.asarray(index[key], dtype=np.int64) for key in ("shard", "offset", "length")], 1)
        self.k = int(manifest["top_k"])
        self.read_k = self.k  # columns handed to the loss: min(loss.top_k, k), set by verify
        self.vocab_size = int(manifest["vocab_size"])
        self._handles: OrderedDict[int, object] = OrderedDict()  # open shards, least recently used first

    def verify(self, *, tokenizer_fp: str, data_fp: str, max_length: int, top_k: int, temperature: float,
               vocab_size: Optional[int] = None) -> int:
        """Refuse a cache made for another run; returns the number of columns to use (min(top_k, cached k)).

        A loss.top_k above the cached k is refused unless the cache holds the whole vocabulary.
        """
        m = self.manifest
        # temperature: the cached top-k and its tail mass are those of softmax(logits / T); another T's tail mass
        # cannot be recovered from them
        run = {"tokenizer_fingerprint": tokenizer_fp, "data_fingerprint": data_fp, "max_length": max_length,
               "temperature": float(temperature)}
        if vocab_size is not None:
            run["vocab_size"] = vocab_size
        problems = manifest_differences(m, run)
        hints = {"tokenizer_fingerprint": "tokenizer_path", "data_fingerprint": "data.train_files / data.format / "
                 "data.text_field / the tokenizer", "max_length": "data.max_length",
                 "vocab_size": "the tokenizer / the models' vocabularies",
                 "temperature": "loss.temperature: the cache holds log-probs at the temperature it was written at"}
        problems = [f"{p} (set by {hints[p.split(':')[0]]})" for p in problems]
        if top_k > self.k and self.k < self.vocab_size:
            problems.append(f"top_k: cache {self.k}, run loss.top_k {top_k} (a cache cannot give more tokens than "
                            f"it holds -> loss.top_k <= {self.k}, or write a cache with a larger k)")
        if problems:
            raise DistillError(f"teacher.cache: '{self.dir}' was written for another run: " + "; ".join(problems)
                               + " -> re-run launch/cache_teacher.py with this run's config, or point teacher.cache"
                                 " at a matching cache")
        self.read_k = min(top_k, self.k)
        return self.read_k

    def check_vocab_size(self, vocab_size: int) -> None:
        """The run's loss normalises over `vocab_size` ids: the cached log-probs must be normalised over as many."""
        if vocab_size != self.vocab_size:
            raise DistillError(f"teacher.cache: '{self.dir}' was written for another run: vocab_size: cache "
                               f"{self.vocab_size}, run {vocab_size} (the tokenizer / the models' vocabularies) -> "
                               "re-run launch/cache_teacher.py with this run's config")

    def describe(self) -> str:
        m = self.manifest
        return (f"teacher cache {self.dir}: {m.get('num_samples')} samples, {m.get('num_positions')} positions, "
                f"k={self.k} {m.get('dtype')} log-probs at T={m.get('temperature')} ({m.get('bytes_per_token')} "
                f"B/token), teacher {_short(m.get('teacher_fingerprint'))}")

    def _handle(self, shard: int):
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            h = self._handles[shard] = safe_open(self.shards[shard], framework="pt")
            if len(self._handles) > MAX_OPEN_SHARDS:  # a large cache has thousands of shards: bound open files
                self._handles.popitem(last=False)
        self._handles.move_to_end(shard)
        return h

    def __contains__(self, sample_id: int) -> bool:
        i = int(np.searchsorted(self._sids, sample_id))
        return i < len(self._sids) and self._sids[i] == sample_id

    def __len__(self) -> int:
        return len(self._sids)

    def sample_rows(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [n, k] int32 and logprobs [n, k] (stored dtype) of one sample."""
        if sample_id not in self:
            raise DistillError(f"teacher.cache: sample {int(sample_id)} is not in '{self.dir}' -> the cache was "
                               "written for other data; re-run launch/cache_teacher.py")
        s, off, n = self._loc[int(np.searchsorted(self._sids, sample_id))].tolist()
        h = self._handle(s)
        return h.get_slice("ids")[off:off + n], h.get_slice("logprobs")[off:off + n]

    def batch(self, sample_ids: torch.Tensor, attention_mask: torch.Tensor, k: Optional[int] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's rows aligned with its shifted labels: ids [B, S-1, k] int64, logprobs [B, S-1, k] fp32.

        Sample b's rows fill positions 0..len_b-2 (right padding, as `data.collate`); the rest, and rows of filler
        samples (sample_id -1), get a uniform distribution over ids 0..k-1: finite, and never trained (their labels
        are -100, so the loss drops them before use).
        """
        k = self.read_k if k is None else k
        lengths = attention_mask.sum(1).tolist()
        B, S = attention_mask.shape
        width = max(S - 1, 0)
        ids = torch.arange(k, dtype=torch.int64).remainder(self.vocab_size).expand(B, width, k).clone()
        lps = torch.full((B, width, k), -math.log(k), dtype=torch.float32)
        for b, sid in enumerate(sample_ids.tolist()):
            if sid < 0:
                continue
            r_ids, r_lps = self.sample_rows(sid)
            n = int(lengths[b]) - 1
            if r_ids.shape[0] != n:
                raise DistillError(f"teacher.cache: sample {sid} has {r_ids.shape[0]} cached positions but "
                                   f"{n} in this batch -> the cache was written for other data or max_length")
            ids[b, :n] = r_ids[:, :k]
            lps[b, :n] = r_lps[:, :k].float()
        return ids, lps
