"""Fault injection for the reliability tests: the one place where product code can be told to fail.

The tests make real failures (a rank killed mid-run or inside a checkpoint, SIGTERM, one rank raising alone, a rank
stalled in a collective, a NaN loss, a cache writer dying mid-shard) by setting environment variables; without them
every hook here does nothing. The trainer and the cache writer call these hooks at fixed points; no other module
knows about faults.

- DS_DISTILL_TEST_FAULTS="kind@step[:rank],...", kind one of
  kill (SIGKILL after the step), sigterm (SIGTERM to itself at the start of the step), error (a DistillError on that
  rank alone at the start of the step), stall (sleep forever at the start of the step), ckpt_kill (SIGKILL inside
  the checkpoint of that step, after DeepSpeed wrote its files and before COMPLETE), nan (the student's loss of
  that step becomes NaN on that rank).
- DS_DISTILL_CACHE_STOP_AFTER_BATCHES=N: the cache writer leaves half a shard file and exits (75) after N batches.
- DS_DISTILL_SERVE_FAULTS="error:N,delay:N:SECONDS,exit:N" (launch/serve_teacher.py): answer HTTP 503 to the N-th
  completions request, sleep before answering it, or exit when it arrives (the server is gone).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable, Optional

from .errors import DistillError

FAULTS_ENV = "DS_DISTILL_TEST_FAULTS"
CACHE_STOP_ENV = "DS_DISTILL_CACHE_STOP_AFTER_BATCHES"
SERVE_FAULTS_ENV = "DS_DISTILL_SERVE_FAULTS"


def parse() -> dict[str, tuple[int, Optional[int]]]:
    """{kind: (step, rank or None)} from DS_DISTILL_TEST_FAULTS ("kill@3:0,nan@4:1")."""
    out: dict[str, tuple[int, Optional[int]]] = {}
    for item in filter(None, (s.strip() for s in os.environ.get(FAULTS_ENV, "").split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        out[kind] = (int(step), int(rank) if rank else None)
    return out


def _matches(spec: tuple[int, Optional[int]], step: Optional[int], rank: int) -> bool:
    return (step is None or spec[0] == step) and (spec[1] is None or spec[1] == rank)


def _announce(kind: str, step: int, rank: int) -> None:
    os.write(2, f"[ds_distill] test fault {kind}@{step} on rank {rank}\n".encode())


def at_step_start(step: int, rank: int) -> None:
    f = parse()
    if "error" in f and _matches(f["error"], step, rank):
        _announce("error", step, rank)
        raise DistillError(f"test fault error@{step} on rank {rank} alone (the other ranks wait in a collective)")
    if "sigterm" in f and _matches(f["sigterm"], step, rank):
        _announce("sigterm", step, rank)
        os.kill(os.getpid(), signal.SIGTERM)
    if "stall" in f and _matches(f["stall"], step, rank):
        _announce("stall", step, rank)
        while True:
            time.sleep(1.0)


def after_step(step: int, rank: int) -> None:
    f = parse()
    if "kill" in f and _matches(f["kill"], step, rank):
        _announce("kill", step, rank)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def in_checkpoint(step: int, rank: int) -> None:
    """Inside checkpoint.save, after every file of the step is written and before it is marked COMPLETE."""
    f = parse()
    if "ckpt_kill" in f and _matches(f["ckpt_kill"], step, rank):
        _announce("ckpt_kill", step, rank)
        os.kill(os.getpid(), signal.SIGKILL)


def nan_hook(current_step: Callable[[], int], rank: int) -> Optional[Callable]:
    """`nan@k[:rank]`: a forward hook for the student wrapper that makes its loss NaN at step k (None without it)."""
    spec = parse().get("nan")
    if spec is None or not _matches(spec, None, rank):
        return None

    def hook(module, args, output):
        if module.training and isinstance(output, tuple) and current_step() == spec[0]:
            return (output[0] * float("nan"),) + tuple(output[1:])
        return output

    return hook


def cache_stop(batches_done: int, partial_shard_path: str, rank: int) -> None:
    """DS_DISTILL_CACHE_STOP_AFTER_BATCHES: die as a killed writer does, half a shard file left behind."""
    stop_after = int(os.environ.get(CACHE_STOP_ENV, "0"))
    if stop_after and batches_done == stop_after:
        with open(partial_shard_path, "wb") as f:
            f.write(b"half a shard")
        print(f"[cache_teacher] rank {rank}: {CACHE_STOP_ENV}={stop_after}: exiting after batch {batches_done}",
              flush=True)
        os._exit(75)


def serve_faults() -> dict[int, tuple[str, float]]:
    """DS_DISTILL_SERVE_FAULTS 'error:2,delay:4:1.5,exit:6' -> {2: ('error', 0), 4: ('delay', 1.5), 6: ('exit', 0)}."""
    out = {}
    for item in filter(None, (s.strip() for s in os.environ.get(SERVE_FAULTS_ENV, "").split(","))):
        parts = item.split(":")
        if parts[0] not in ("error", "delay", "exit") or len(parts) != (3 if parts[0] == "delay" else 2):
            raise DistillError(f"{SERVE_FAULTS_ENV}: {item!r} is not error:N, delay:N:SECONDS or exit:N")
        out[int(parts[1])] = (parts[0], float(parts[2]) if parts[0] == "delay" else 0.0)
    return out


def at_served_request(faults: dict, nth: int) -> Optional[str]:
    """The teacher server's hook before answering its nth completions request: exits the process (exit), sleeps
    (delay) or returns an error message for an HTTP 503 (error); None otherwise."""
    kind, arg = faults.get(nth, (None, 0.0))
    if kind == "exit":
        print(f"[serve_teacher] fault: exiting at completions request {nth}", file=sys.stderr, flush=True)
        os._exit(3)
    if kind == "error":
        print(f"[serve_teacher] fault: HTTP 503 to completions request {nth}", file=sys.stderr, flush=True)
        return f"injected fault at request {nth}"
    if kind == "delay":
        print(f"[serve_teacher] fault: {arg:g} s delay before completions request {nth}", file=sys.stderr, flush=True)
        time.sleep(arg)
    return None
