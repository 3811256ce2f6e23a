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
    act only through these ids. Reads Arrow buffers in batches (about 1.5 s per 10^8 tokens on this CPU).
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


# ----------------------------------------------------------------------------------------------------------------
# Writing (launch/cache_teacher.py): every rank runs this
# ----------------------------------------------------------------------------------------------------------------

STOP_ENV = "DS_DISTILL_CACHE_STOP_AFTER_BATCHES"  # test hook: die like a killed job after N batches


def _config_rows(model_dir: str) -> int:
    """lm_head rows from config.json, without loading the weights."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    c = c.get("text_config", c)
    return int(c["vocab_size"])


def _lengths(dataset) -> list[int]:
    import pyarrow as pa

    out: list[int] = []
    for table in dataset.with_format("arrow").iter(batch_size=65536):
        ids = table.column("input_ids").combine_chunks()
        if not isinstance(ids, pa.ChunkedArray):
            out += ids.value_lengths().to_pylist()
    return out


def write_cache(cfg, cache_dir: str, *, top_k: int, dtype: str = "fp16", micro_batch_size: Optional[int] = None,
                shard_positions: int = 262144) -> dict:
    """Run the teacher over every training sample of `cfg` and write (or finish) the cache in `cache_dir`.

    Collective: every rank calls it. Returns the final manifest. The teacher is a ZeRO-3 inference engine; ranks
    take interleaved slices of the remaining samples sorted by length (little padding) and run the same number of
    forwards (a rank out of samples runs a one-token filler batch, as ZeRO-3's collectives require).
    """
    import time

    from . import data, engines, models, vocab
    from .config import validate

    engines.check_device(cfg.train.device)  # GPUs given to the job but unusable: refused, not a CPU run
    rank, world, _ = engines.init_distributed(cfg.train.watchdog_timeout_s or 1800.0)
    if cfg.teacher.path is None:
        raise DistillError("teacher.path: required to write a teacher cache -> set it to the teacher's directory")
    if cfg.teacher.cache is not None:
        raise DistillError("teacher.cache: set in the config given to cache_teacher.py -> the writer runs the teacher "
                           "(teacher.path); pass the cache directory as --cache_dir instead")
    if dtype not in DTYPES:
        raise DistillError(f"--dtype: {dtype!r} is not one of {list(DTYPES)}")
    validate(cfg, None)
    T = cfg.train
    mb = micro_batch_size or T.micro_batch_size
    models.check_model_dir(cfg.teacher.path, "teacher.path", cfg.teacher.allow_pickle_weights)
    trust = cfg.tokenizer_trust_remote_code
    tokenizer = models.load_tokenizer(cfg.resolved_tokenizer_path, trust)
    if cfg.resolved_tokenizer_path != cfg.teacher.path:
        vocab.check_tokenizers_compatible(models.load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code),
                                          tokenizer)
    t_rows = _config_rows(cfg.teacher.path)
    s_rows = _config_rows(cfg.student.path) if cfg.student.path else t_rows
    vocab_size, _ = vocab.reconcile_vocab(t_rows, s_rows, len(tokenizer))
    if not 0 < top_k <= vocab_size:
        raise DistillError(f"--top_k: {top_k} must be in [1, {vocab_size}] (the real vocabulary size)")
    train_ds = data.build_dataset(cfg.data.train_files, cfg.data.format, tokenizer, cfg.data.max_length,
                                  cfg.data.text_field)
    sids = train_ds["sample_id"]
    lengths = _lengths(train_ds)
    expected = {sid: n - 1 for sid, n in zip(sids, lengths)}
    value_bytes = torch.finfo(DTYPES[dtype]).bits // 8

    # --- rank 0 decides: new cache, resume, already complete, or refuse (another run's cache in the directory)
    decision: object = None
    if rank == 0:
        manifest = {
            "format": FORMAT, "version": VERSION, "complete": False, "top_k": top_k,
            "temperature": float(cfg.loss.temperature),
            "dtype": dtype, "ids_dtype": "int32", "bytes_per_token": top_k * (4 + value_bytes),
            "vocab_size": vocab_size, "teacher_vocab_rows": t_rows, "max_length": cfg.data.max_length,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": data_fingerprint(train_ds),
            "teacher_fingerprint": teacher_fingerprint(cfg.teacher.path),
            "teacher_path": os.path.abspath(cfg.teacher.path),
            "data": {"train_files": [os.path.abspath(f) for f in cfg.data.train_files], "format": cfg.data.format,
                     "text_field": cfg.data.text_field},
            "num_samples": len(expected), "num_positions": sum(expected.values()),
        }
        old = read_manifest(cache_dir)
        diffs = manifest_differences(old, manifest) if old is not None else []
        if old is None and shard_paths(cache_dir):
            decision = {"error": f"--cache_dir: '{cache_dir}' holds shards but no {MANIFEST} (they cannot be "
                        "checked against this run) -> choose a new --cache_dir, or delete that one"}
        elif diffs:
            decision = {"error": f"--cache_dir: '{cache_dir}' holds a cache of another run (" + "; ".join(diffs)
                        + ") -> choose a new --cache_dir, or delete that one"}
        elif old is not None and old.get("complete"):
            decision = {"complete": old}
        else:
            removed = remove_partial_files(cache_dir) if old is not None else 0
            write_manifest(cache_dir, manifest)
            decision = {"write": manifest, "removed": removed}
    decision = engines.broadcast_object(decision)
    if "error" in decision:
        raise DistillError(decision["error"])
    if "complete" in decision:
        if rank == 0:
            print(f"[cache_teacher] {cache_dir} is already complete; nothing to do", flush=True)
        return decision["complete"]
    manifest = decision["write"]

    # --- what is left: every rank reads the same shard indexes, so all agree on the plan
    done = cached_sample_ids(cache_dir)
    row_of = {sid: i for i, sid in enumerate(sids)}
    todo = sorted((sid for sid in sids if sid not in done), key=lambda s: (-expected[s], s))
    mine = todo[rank::world]
    n_batches = -(-len(todo[0::world]) // mb) if todo else 0
    if rank == 0:
        print(f"[cache_teacher] {len(done)} of {len(sids)} samples already cached"
              + (f" ({decision['removed']} partial files removed)" if decision["removed"] else "")
              + f"; {len(todo)} to compute in {n_batches} batches x {world} ranks", flush=True)

    compute_s = 0.0
    if n_batches:
        precision = engines.resolve_precision(T.precision)
        teacher_ds = engines.teacher_ds_config(cfg.teacher.ds_config, micro_batch_size=mb, world_size=world,
                                               precision=precision, offload_params=cfg.teacher.offload_params)
        teacher = engines.load_partitioned(lambda: models.load_causal_lm(
            cfg.teacher.path, dtype=engines.torch_dtype(precision), trust_remote_code=cfg.teacher.trust_remote_code,
            allow_pickle=cfg.teacher.allow_pickle_weights), teacher_ds)
        if models.vocab_rows(teacher) != t_rows:
            raise DistillError(f"teacher.path: config.json says {t_rows} vocabulary rows, the lm_head has "
                               f"{models.vocab_rows(teacher)}")
        engine = engines.build_teacher_engine(models.TeacherHidden(teacher), teacher_ds)
        writer = ShardWriter(cache_dir, rank, dtype, shard_positions)
        stop_after = int(os.environ.get(STOP_ENV, "0"))
        dev = engines.device()
        pad = tokenizer.pad_token_id
        t0 = time.time()
        for b in range(n_batches):
            chunk = mine[b * mb:(b + 1) * mb]
            if chunk:
                rows = train_ds[[row_of[s] for s in chunk]]
                batch = data.collate([{"input_ids": i, "labels": lab, "sample_id": s} for i, lab, s in
                                      zip(rows["input_ids"], rows["labels"], rows["sample_id"])], pad)
            else:  # this rank is out of samples: a one-token forward keeps ZeRO-3's collectives matched
                batch = {"input_ids": torch.full((1, 1), pad), "attention_mask": torch.ones((1, 1), dtype=torch.long),
                         "sample_ids": torch.full((1,), -1)}
            am = batch["attention_mask"].to(dev)
            with torch.no_grad():
                hidden = engine(batch["input_ids"].to(dev), am)  # [B, S, H]
                valid = am[:, 1:].bool()  # [B, S-1]: positions 0..len-2 of each sample
                h = hidden[:, :-1][valid]  # [P, H], sample by sample
                head = engine.module.head
                with engines.gathered(head.params()):
                    ids, lps = topk_logprobs(h, head.weight, bias=head.bias, transform=head.transform,
                                             vocab_size=vocab_size, k=top_k, temperature=manifest["temperature"],
                                             chunk_size=cfg.loss.chunk_size)
            start = 0
            for sid, n in zip(batch["sample_ids"].tolist(), (am.sum(1) - 1).tolist()):
                if sid >= 0:
                    writer.add(sid, ids[start:start + n], lps[start:start + n])
                start += n
            if stop_after and b + 1 == stop_after:  # test hook: die mid-run, as a killed job does
                with open(os.path.join(writer.dir, f"{writer.prefix}-{writer.seq:06d}.safetensors.tmp"), "wb") as f:
                    f.write(b"half a shard")
                print(f"[cache_teacher] rank {rank}: {STOP_ENV}={stop_after}: exiting after batch {b + 1}",
                      flush=True)
                os._exit(75)
            if rank == 0 and ((b + 1) % 50 == 0 or b + 1 == n_batches):
                dt = time.time() - t0
                print(f"[cache_teacher] batch {b + 1}/{n_batches}: {writer.samples_written + len(writer._sids)} "
                      f"samples on rank 0, {dt:.0f} s", flush=True)
        writer.flush()
        compute_s = time.time() - t0
    engines.barrier()

    # --- rank 0 checks every sample is there exactly once, writes the index, marks the cache complete
    final: object = None
    if rank == 0:
        try:
            build_index(cache_dir, expected)
        except DistillError as e:  # every rank must hear of it (they wait in the broadcast below)
            final = {"error": str(e)}
    if rank == 0 and final is None:
        manifest = dict(manifest, complete=True,
                        bytes_on_disk=sum(os.path.getsize(p) for p in shard_paths(cache_dir)),
                        seconds_last_run=round(compute_s, 3), samples_last_run=len(todo))  # forwards + writes
        write_manifest(cache_dir, manifest)
        final = {"manifest": manifest}
        print(f"[cache_teacher] done: {manifest['num_samples']} samples, {manifest['num_positions']} positions, "
              f"k={top_k} {dtype}, {manifest['bytes_per_token']} B/token, {manifest['bytes_on_disk'] / 2**20:.1f} "
              f"MiB in {len(shard_paths(cache_dir))} shards -> {cache_dir}", flush=True)
    final = engines.broadcast_object(final)
    if "error" in final:
        raise DistillError(final["error"])
    return final["manifest"]
