"""DeepSpeed checkpoints with one resume-state dataclass, committed atomically.

Layout: output_dir/checkpoints/step_00000010/ (DeepSpeed's files + rng_rank{r}.pt + COMPLETE) and
output_dir/checkpoints/latest (the tag of the newest complete checkpoint). A checkpoint becomes "latest" only after
every rank has written its part (barrier) and rank 0 has written COMPLETE; `latest` is replaced with os.replace, so a
crash at any point leaves the previous checkpoint in use.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"
COMPLETE = "COMPLETE"


@dataclass
class ResumeState:
    """Everything besides weights/optimizer that an exact resume needs (passed as DeepSpeed client_state)."""
    step: int = 0
    samples_consumed: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    wandb_run_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    """RNG states as tensors and plain Python values only, so they load back with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                       has_gauss, gauss), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])


def save(engine, ckpt_root: str, state: ResumeState, keep_last: int) -> str:
    """Collective: every rank writes its shard; then rank 0 marks it COMPLETE, points `latest` at it, prunes."""
    tag = tag_for(state.step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.save_checkpoint(ckpt_root, tag=tag, client_state={"resume": dataclasses.asdict(state)},
                           save_latest=False)
    path = os.path.join(ckpt_root, tag)
    torch.save(_rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()  # every rank's files are on disk before the checkpoint can become "latest"
    if rank == 0:
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(tag + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp = os.path.join(ckpt_root, LATEST + ".tmp")
        with open(tmp, "w") as f:
            f.write(tag + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt_root, LATEST))
        prune(ckpt_root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return path


def complete_checkpoints(ckpt_root: str) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root) if d.startswith("step_")
            and os.path.isfile(os.path.join(ckpt_root, d, COMPLETE))]
    return sorted(tags)


def prune(ckpt_root: str, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest keep_last, and incomplete ones older than the newest."""
    tags = complete_checkpoints(ckpt_root)
    for t in tags[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_root, t), ignore_errors=True)
    if tags:
        for d in os.listdir(ckpt_root):
            if d.startswith("step_") and d not in tags and d < tags[-1]:
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)


def find_latest(ckpt_root: str) -> Optional[str]:
    """Path of the newest complete checkpoint: `latest` if it names a complete one, else the newest complete."""
    p = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(p):
        tag = open(p).read().strip()
        if os.path.isfile(os.path.join(ckpt_root, tag, COMPLETE)):
            return os.path.join(ckpt_root, tag)
    tags = complete_checkpoints(ckpt_root)
    return os.path.join(ckpt_root, tags[-1]) if tags else None


def load(engine, path: str) -> ResumeState:
    """Restore weights, optimizer, LR scheduler, this rank's RNG; return the resume state."""
    path = os.path.abspath(path.rstrip("/"))
    root, tag = os.path.dirname(path), os.path.basename(path)
    _, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None or "resume" not in client:
        from .errors import DistillError

        raise DistillError(f"checkpoint.resume: '{path}' is not a ds_distill checkpoint (no resume state)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.isfile(rng):
        _set_rng_state(torch.load(rng, weights_only=True))  # tensors and plain values only: no unpickling
    d = dict(client["resume"])
    return ResumeState(**{k: d[k] for k in d if k in {f.name for f in dataclasses.fields(ResumeState)}})

