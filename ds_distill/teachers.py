"""Teacher sources: what the training step asks for the teacher's side of a micro-batch.

The step (trainer.train_step) knows one interface, `TeacherSource`, and no teacher kind:

    payloads = source.host_side(micro_batches, vocab_size)   # host: per micro-batch, read before any device copy
    with source.side(batch, payload, dev) as kwargs:          # device: the teacher's inputs to the fused loss
        student_engine(..., **kwargs)

`kwargs` are the student forward's teacher arguments (models.StudentWithLoss): the teacher's final hidden states
and its head (weight, bias, gathered under ZeRO-3 for the duration of the block), or the top-k ids and log-probs of
an offline cache. Every source keeps the rank symmetry ZeRO-3 needs: each rank makes the same collective calls for
each micro-batch, whatever its data.

Kinds (the `KINDS` registry names the module that provides each):
- `engine`: the teacher model on the training ranks, a ZeRO-3 inference engine (teacher.sharding: zero3) or a
  replica per rank (replicate): `EngineTeacher`.
- `cache`: an offline top-k cache written by launch/cache_teacher.py (teacher.cache): `CachedTeacher`.
- `none`: CE only (loss.alpha 0): `NoTeacher`.
- `server`: a served teacher (teacher.server_url) answering with top-k log-probs: `served_teacher.ServedTeacher`
  (registered in `KINDS` when that module is imported).
- `separate`: the teacher on its own ranks (teacher.placement: separate): `teacher_apart.ApartTeacher` (registered
  there likewise).

A new kind is a new class with these members, plus a config value that trainer.checked_teacher_without_model or
trainer.teacher_model_source maps to it; the step does not change.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Protocol

import torch

from . import engines
from .errors import DataError
from .heads import IDENTITY, HeadTransform


def check_topk_ids(ids: torch.Tensor, vocab_size: int, key: str, fix: str) -> None:
    """Top-k ids from outside the process (a cache, a server) must lie in the run's vocabulary [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise DataError(f"{key}: top-k ids in [{int(ids.min())}, {int(ids.max())}], outside [0, {vocab_size}) -> "
                        f"{fix}")


class TeacherSource(Protocol):
    kind: str
    vocab_rows: Optional[int]  # the teacher head's rows, for the vocabulary reconciliation (None: no teacher head)

    @property
    def transform(self) -> HeadTransform:
        """The teacher head's logit transform, for the loss (identity where the loss gets log-probs)."""

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        """Host work for each micro-batch of a step, before the device copies (no device synchronisation):
        one payload per micro-batch (None when the source needs none). Raises a DistillError for bad teacher data."""

    def side(self, batch: dict, payload, dev: torch.device) -> contextlib.AbstractContextManager[dict]:
        """Context manager yielding the student forward's teacher keyword arguments for `batch` (on `dev`;
        `batch["model_mask"]` / `batch.get("position_ids")`: the masks the models get)."""

    def check_vocab_size(self, vocab_size: int) -> None:
        """Refuse (DistillError) a teacher whose rows do not fit the run's reconciled vocabulary."""

    def describe(self) -> str:
        """A line for the start-up log ('' for none)."""


class NoTeacher:
    """loss.alpha 0: CE only; the loss gets no teacher argument."""

    kind = "none"
    transform = IDENTITY
    vocab_rows = None

    def check_vocab_size(self, vocab_size: int) -> None:
        pass

    def describe(self) -> str:
        return ""

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        return [None] * len(micro_batches)

    @contextlib.contextmanager
    def side(self, batch: dict, payload, dev: torch.device) -> Iterator[dict]:
        yield {}


class EngineTeacher:
    """The teacher model on the training ranks: `engine` is a ZeRO-3 inference engine (engines.build_teacher_engine)
    or a replica (engines.ReplicatedTeacher), wrapping models.TeacherHidden. Per micro-batch: its final hidden
    states (no grad), and its head gathered while the loss reads it."""

    kind = "engine"

    def __init__(self, engine, sharding: str, vocab_rows: int):
        self.engine, self.sharding, self.vocab_rows = engine, sharding, vocab_rows

    def check_vocab_size(self, vocab_size: int) -> None:
        pass  # the reconciliation itself checks the loaded head's rows

    def describe(self) -> str:
        h = self.head
        model_type = getattr(getattr(self.engine.module.model, "config", None), "model_type", "?")
        return f"teacher head: {model_type} ({h.transform.describe()}" + (", bias" if h.bias is not None else "") + ")"

    @property
    def head(self):
        return self.engine.module.head

    @property
    def transform(self) -> HeadTransform:
        return self.head.transform

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        return [None] * len(micro_batches)

    @contextlib.contextmanager
    def side(self, batch: dict, payload, dev: torch.device) -> Iterator[dict]:
        with torch.no_grad():
            hidden = self.engine(batch["input_ids"], batch["model_mask"], batch.get("position_ids"))  # [B, S, Ht]
        head = self.head
        with engines.gathered(head.params()):
            yield {"teacher_hidden": hidden, "teacher_weight": head.weight, "teacher_bias": head.bias}


class CachedTeacher:
    """teacher.cache: the top-k ids and log-probs an offline pass wrote (teacher_cache.TopKCache), looked up by
    sample id on the host, their ids checked against the vocabulary there, copied with the micro-batch."""

    kind = "cache"
    transform = IDENTITY  # the cache holds the teacher's log-probs at loss.temperature, its head already applied

    def __init__(self, cache):
        self.cache = cache
        self.vocab_rows = int(cache.manifest["teacher_vocab_rows"])

    def check_vocab_size(self, vocab_size: int) -> None:
        self.cache.check_vocab_size(vocab_size)

    def describe(self) -> str:
        return self.cache.describe()

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        out = []
        for mb in micro_batches:  # rows by sample id, aligned with labels[:, 1:]: [B, S-1, k] each
            ids, lps = self.cache.batch(mb["sample_ids"], mb["attention_mask"])
            check_topk_ids(ids, vocab_size, "teacher.cache", "rebuild the cache with this run's teacher and tokenizer")
            out.append((ids, lps))
        return out

    @contextlib.contextmanager
    def side(self, batch: dict, payload, dev: torch.device) -> Iterator[dict]:
        ids, lps = payload
        if dev.type != "cpu":  # pinned: an asynchronous copy, as the micro-batch's own
            ids, lps = ids.pin_memory().to(dev, non_blocking=True), lps.pin_memory().to(dev, non_blocking=True)
        yield {"teacher_topk": (ids, lps)}


# kind -> the class that implements it (documentation and the README's list; the trainer builds them by config)
KINDS = {"none": NoTeacher, "engine": EngineTeacher, "cache": CachedTeacher}
