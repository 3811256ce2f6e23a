"""The cache-writing recipe: run the teacher over every training sample and write its top-k log-probabilities in
the offline cache format (teacher_cache.py: manifest, shards, index, reader).

Composes the same build functions as training (assembly.py): the process group, the tokenizer and vocabulary
checks, the datasets, the teacher's ZeRO-3 inference engine. `launch/cache_teacher.py` is its entry point.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from . import assembly, data, engines, faults
from .errors import DistillError
from .teacher_cache import (DTYPES, FORMAT, MANIFEST, VERSION, ShardWriter, build_index, cached_sample_ids,
                            data_fingerprint, manifest_differences, read_manifest, remove_partial_files, shard_paths,
                            teacher_fingerprint, tokenizer_fingerprint, topk_logprobs, write_manifest)


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
    if cfg.teacher.path is None:
        raise DistillError("teacher.path: required to write a teacher cache -> set it to the teacher's directory")
    if cfg.teacher.cache is not None:
        raise DistillError("teacher.cache: set in the config given to cache_teacher.py -> the writer runs the teacher "
                           "(teacher.path); pass the cache directory as --cache_dir instead")
    if dtype not in DTYPES:
        raise DistillError(f"--dtype: {dtype!r} is not one of {list(DTYPES)}")
    rank, world = assembly.start(cfg, check_world=False)
    mb = micro_batch_size or cfg.train.micro_batch_size
    assembly.check_model_dirs(cfg)
    tokenizer = assembly.checked_tokenizer(cfg)
    t_rows = assembly.declared_vocab_rows(cfg.teacher.path)
    vocab_size = assembly.declared_vocab_size(cfg, tokenizer)
    if t_rows is None or vocab_size is None:
        raise DistillError(f"teacher.path / student.path: config.json declares no vocab_size -> the cache needs the "
                           f"teacher's vocabulary before it loads ('{cfg.teacher.path}')")
    if not 0 < top_k <= vocab_size:
        raise DistillError(f"--top_k: {top_k} must be in [1, {vocab_size}] (the real vocabulary size)")
    train_ds, _ = assembly.datasets(cfg, tokenizer)
    expected = {sid: n - 1 for sid, n in zip(train_ds["sample_id"], _lengths(train_ds))}
    manifest = {
        "format": FORMAT, "version": VERSION, "complete": False, "top_k": top_k,
        "temperature": float(cfg.loss.temperature),
        "dtype": dtype, "ids_dtype": "int32", "bytes_per_token": top_k * (4 + torch.finfo(DTYPES[dtype]).bits // 8),
        "vocab_size": vocab_size, "teacher_vocab_rows": t_rows, "max_length": cfg.data.max_length,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": data_fingerprint(train_ds),
        "teacher_fingerprint": teacher_fingerprint(cfg.teacher.path),
        "teacher_path": os.path.abspath(cfg.teacher.path),
        "data": {"train_files": [os.path.abspath(f) for f in cfg.data.train_files], "format": cfg.data.format,
                 "text_field": cfg.data.text_field},
        "num_samples": len(expected), "num_positions": sum(expected.values()),
    } if rank == 0 else None
    decision = _decide(cache_dir, manifest, rank)
    if "complete" in decision:
        if rank == 0:
            print(f"[cache_teacher] {cache_dir} is already complete; nothing to do", flush=True)
        return decision["complete"]
    manifest = decision["write"]

    # --- what is left: every rank reads the same shard indexes, so all agree on the plan
    done = cached_sample_ids(cache_dir)
    sids = train_ds["sample_id"]
    todo = sorted((sid for sid in sids if sid not in done), key=lambda s: (-expected[s], s))
    n_batches = -(-len(todo[0::world]) // mb) if todo else 0
    if rank == 0:
        print(f"[cache_teacher] {len(done)} of {len(sids)} samples already cached"
              + (f" ({decision['removed']} partial files removed)" if decision["removed"] else "")
              + f"; {len(todo)} to compute in {n_batches} batches x {world} ranks", flush=True)
    compute_s = 0.0
    if n_batches:
        engine, _ = assembly.teacher_engine(cfg, sharding="zero3", world=world, micro_batch_size=mb,
                                            precision=engines.resolve_precision(cfg.train.precision),
                                            expect_rows=t_rows)
        compute_s = _compute(engine, cfg, cache_dir, manifest, train_ds, todo[rank::world], n_batches, mb,
                             tokenizer.pad_token_id, rank, dtype, shard_positions)
    engines.barrier()
    return _finish(cache_dir, manifest, expected, rank, compute_s=compute_s, samples=len(todo))


def _decide(cache_dir: str, manifest: Optional[dict], rank: int) -> dict:
    """Collective. Rank 0 decides from the directory: a new cache, resume a partial one, already complete, or
    refuse (shards without a manifest, another run's cache); every rank gets the decision (or the error)."""
    decision: object = None
    if rank == 0:
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
    return decision


def _compute(engine, cfg, cache_dir: str, manifest: dict, train_ds, mine: list[int], n_batches: int, mb: int,
             pad: int, rank: int, dtype: str, shard_positions: int) -> float:
    """This rank's samples (`mine`, longest first) through the teacher, `n_batches` forwards on every rank; their
    top-k rows written as shards. Returns the seconds spent."""
    row_of = {sid: i for i, sid in enumerate(train_ds["sample_id"])}
    writer = ShardWriter(cache_dir, rank, dtype, shard_positions)
    dev = engines.device()
    head = engine.module.head
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
            h = hidden[:, :-1][am[:, 1:].bool()]  # [P, H]: positions 0..len-2 of each sample, sample by sample
            with engines.gathered(head.params()):
                ids, lps = topk_logprobs(h, head.weight, bias=head.bias, transform=head.transform,
                                         vocab_size=manifest["vocab_size"], k=manifest["top_k"],
                                         temperature=manifest["temperature"], chunk_size=cfg.loss.chunk_size)
        start = 0
        for sid, n in zip(batch["sample_ids"].tolist(), (am.sum(1) - 1).tolist()):
            if sid >= 0:
                writer.add(sid, ids[start:start + n], lps[start:start + n])
            start += n
        faults.cache_stop(b + 1, os.path.join(writer.dir, f"{writer.prefix}-{writer.seq:06d}.safetensors.tmp"),
                          rank)
        if rank == 0 and ((b + 1) % 50 == 0 or b + 1 == n_batches):
            print(f"[cache_teacher] batch {b + 1}/{n_batches}: {writer.samples_written + len(writer._sids)} "
                  f"samples on rank 0, {time.time() - t0:.0f} s", flush=True)
    writer.flush()
    return time.time() - t0


def _finish(cache_dir: str, manifest: dict, expected: dict[int, int], rank: int, *, compute_s: float,
            samples: int) -> dict:
    """Collective. Rank 0 checks every sample is there exactly once, writes the index and marks the cache
    complete; every rank returns the final manifest (or raises the error)."""
    final: object = None
    if rank == 0:
        try:
            build_index(cache_dir, expected)
        except DistillError as e:  # every rank must hear of it (they wait in the broadcast below)
            final = {"error": str(e)}
    if rank == 0 and final is None:
        manifest = dict(manifest, complete=True,
                        bytes_on_disk=sum(os.path.getsize(p) for p in shard_paths(cache_dir)),
                        seconds_last_run=round(compute_s, 3), samples_last_run=samples)  # forwards + writes
        write_manifest(cache_dir, manifest)
        final = {"manifest": manifest}
        print(f"[cache_teacher] done: {manifest['num_samples']} samples, {manifest['num_positions']} positions, "
              f"k={manifest['top_k']} {manifest['dtype']}, {manifest['bytes_per_token']} B/token, "
              f"{manifest['bytes_on_disk'] / 2**20:.1f} MiB in {len(shard_paths(cache_dir))} shards -> {cache_dir}",
              flush=True)
    final = engines.broadcast_object(final)
    if "error" in final:
        raise DistillError(final["error"])
    return final["manifest"]
