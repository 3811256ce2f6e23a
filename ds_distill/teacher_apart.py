"""The teacher on its own ranks (teacher.placement: separate).

Of the W launched ranks the last K = teacher.ranks run only the teacher, the first S = W - K train the student
(engines.Placement: each role has its own default process group, so the student side is exactly a colocated run of S
ranks, and a `bridge` group over all W ranks carries the point-to-point traffic). Student s is served by teacher
s % K.

    teacher rank                                    student rank s
    load tokenizer, data, teacher (ZeRO-3 over      build as usual (trainer.build), then
      the K teacher ranks, or a replica)
    send its head (weight, bias, transform)  --->   ApartTeacher(): receive the head (the fused loss reads it)
                                             <---   start(): the data position and how many micro-batches follow
    MicroBatchStream(rank=s, world=S) from that     (the student's own stream, same rows by construction)
      position; per micro-batch: forward, send
      header [index, B, S, sample-id checksums]  -> side(): wait for the header, check it is this micro-batch,
      and hidden states [B, S, H] (isend)           receive the hidden states, run the fused loss
    ... up to QUEUE_DEPTH micro-batches ahead
      of each student (bounded: it waits for the
      oldest send before it computes more)
                                             <---   done, when the student process ends normally
    exit 0                                          (engines.shutdown: after its export, eval, report)

The teacher works ahead: it computes micro-batch i+1 while the students run backward and step on i. Both sides write
a timeline (output_dir/teacher_apart/*.jsonl, one row per micro-batch, `index` counting micro-batches from the
start of training over resumes: the teacher's forward start/end, the student's wait and forward end) from which
tests and benchmarks/teacher_apart.py read the overlap and the students' waiting time.

Failure: a peer that dies closes its sockets and the other side's wait raises; a teacher rank's loss stops the
students it serves with `TeacherLost` naming it (the last complete checkpoint is intact; the same command resumes,
the teacher then starts at the students' resumed position), a student's loss stops its teacher with `StudentLost`.
A peer that hangs instead is caught by the watchdog (train.watchdog_timeout_s) on both sides.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from typing import Iterator, Optional

import torch

from . import assembly, data, engines, faults, guards, planner, teachers
from .config import DistillConfig, validate
from .errors import DistillError
from .heads import HeadTransform

# bridge message tags (each pair of ranks matches sends and receives by tag, in order)
TAG_META, TAG_WEIGHT, TAG_BIAS, TAG_START, TAG_HEADER, TAG_HIDDEN = 1, 2, 3, 4, 5, 6  # + Placement.DONE_TAG
HEADER_LEN = 6  # [index, B, S, number of sample ids, sum of ids, sum of squared ids]
QUEUE_DEPTH = planner.SEPARATE_QUEUE_DEPTH  # micro-batches a teacher rank keeps in flight per student (bounded)
TIMELINE_DIR = "teacher_apart"


class TeacherLost(DistillError):
    """A teacher rank stopped (died, or its connection broke) while a student waited for it."""


class StudentLost(DistillError):
    """A student rank stopped while its teacher rank still had micro-batches for it."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _header(index: int, mb: dict) -> torch.Tensor:
    ids = mb["sample_ids"].reshape(-1).to(torch.int64)
    B, S = mb["input_ids"].shape
    return torch.tensor([index, B, S, ids.numel(), int(ids.sum()), int((ids * ids).sum())], dtype=torch.int64)


def _send_json(pl: engines.Placement, obj: dict, dst: int, tag: int) -> list:
    raw = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    n = torch.tensor([raw.numel()], dtype=torch.int64)
    return [pl.send(n, dst, tag), pl.send(raw, dst, tag)]


def _recv_json(pl: engines.Placement, src: int, tag: int, wait) -> dict:
    n = torch.zeros(1, dtype=torch.int64)
    wait(pl.recv(n, src, tag))
    raw = torch.empty(int(n.item()), dtype=torch.uint8)
    wait(pl.recv(raw, src, tag))
    return json.loads(bytes(raw.tolist()).decode())


def _bridge_device(dev: torch.device) -> torch.device:
    """Where bridge tensors live: the GPU under NCCL, host memory under gloo."""
    return dev if dev.type == "cuda" else torch.device("cpu")


class Timeline:
    """Append-only JSON lines, one per micro-batch event (time.time(): one clock for all ranks of a host)."""

    def __init__(self, output_dir: str, name: str):
        d = os.path.join(output_dir, TIMELINE_DIR)
        os.makedirs(d, exist_ok=True)
        self.path = os.path.join(d, f"{name}.jsonl")
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------------------------------------------
# student side
# ----------------------------------------------------------------------------------------------------------------

class ApartTeacher:
    """The TeacherSource of a student rank whose teacher runs on other ranks: the teacher's head arrives once
    (`__init__`), its final hidden states per micro-batch (`side`). Keeps no collective of its own: each student
    talks only to its teacher rank, so student ranks stay symmetric whatever the teacher does."""

    kind = "separate"

    def __init__(self, placement: engines.Placement, rank: int, dev: torch.device, output_dir: str):
        self.pl, self.rank, self.dev = placement, rank, dev
        self.src = placement.teacher_of(rank)
        self.where = _bridge_device(dev)
        meta = _recv_json(self.pl, self.src, TAG_META, lambda w: self._wait(w, "the teacher's head"))
        self.meta = meta
        self.dtype = getattr(torch, meta["dtype"])
        self.vocab_rows, self.hidden_size = int(meta["rows"]), int(meta["hidden"])
        weight = torch.empty(self.vocab_rows, self.hidden_size, dtype=self.dtype, device=self.where)
        self._wait(self.pl.recv(weight, self.src, TAG_WEIGHT), "the teacher's lm_head")
        self.weight = weight.to(dev)  # [V_rows, Ht]: a plain tensor, whole on each student rank (no grad)
        self.bias = None
        if meta["bias"]:
            bias = torch.empty(self.vocab_rows, dtype=self.dtype, device=self.where)
            self._wait(self.pl.recv(bias, self.src, TAG_BIAS), "the teacher's lm_head bias")
            self.bias = bias.to(dev)
        self._transform = HeadTransform(scale=float(meta["scale"]), softcap=meta["softcap"])
        self.model_type = meta.get("model_type", "?")
        self.remaining = 0
        self.index = 0
        self._header_buf = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.where)
        self._header_work = None
        self.timeline = Timeline(output_dir, f"student_rank{rank}")
        self._step0, self._accum = 0, 1

    @property
    def transform(self) -> HeadTransform:
        return self._transform

    def check_vocab_size(self, vocab_size: int) -> None:
        pass  # the reconciliation itself checks the received head's rows

    def describe(self) -> str:
        return (f"teacher head: {self.model_type} ({self._transform.describe()}" + (", bias" if self.bias is not None
                else "") + f"), on global rank {self.src} (teacher.placement: separate, {self.meta['sharding']})")

    def start(self, stream_state: dict, step: int, micro_batches: int, grad_accum_steps: int) -> None:
        """Tell the teacher where this rank's data stream is and how many micro-batches it will ask for."""
        self.remaining, self.index = micro_batches, 0
        self._step0, self._accum = step, grad_accum_steps
        for w in _send_json(self.pl, {"data_state": stream_state, "micro_batches": micro_batches, "step": step},
                            self.src, TAG_START):
            self._wait(w, "the start message")
        if self.remaining:
            self._post_header()

    def _post_header(self) -> None:
        self._header_work = self.pl.recv(self._header_buf, self.src, TAG_HEADER)

    def _wait(self, work, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise TeacherLost(
                f"teacher rank {self.src} (teacher.placement: separate) stopped while student rank {self.rank} "
                f"waited for {what} ({_first_line(e)}) -> see that rank's error above; the latest complete "
                "checkpoint in output_dir/checkpoints is intact: run the same command to resume") from None

    def host_side(self, micro_batches: list[dict], vocab_size: int) -> list[Optional[object]]:
        """The header each micro-batch's hidden states must come with (computed here, on the host copy)."""
        return [_header(self.index + k, mb).tolist() for k, mb in enumerate(micro_batches)]

    @contextlib.contextmanager
    def side(self, batch: dict, payload, dev: torch.device) -> Iterator[dict]:
        if self._header_work is None:
            raise RuntimeError(f"teacher.placement: separate: student rank {self.rank} asked for more micro-batches "
                               "than it announced to its teacher")
        step = self._step0 + self.index // self._accum + 1
        t0 = time.time()
        self._wait(self._header_work, f"micro-batch {self.index} (step {step})")
        got = self._header_buf.tolist()  # under NCCL: the one host synchronisation of this source per micro-batch
        want = payload if payload is not None else _header(self.index, batch).tolist()
        if got != want:
            raise DistillError(f"teacher.placement: separate: teacher rank {self.src} sent micro-batch {got} "
                               f"(index, rows, length, sample-id checksums) where student rank {self.rank} has "
                               f"{want}: the two read different data -> both sides must run the same config")
        B, S = want[1], want[2]
        hidden = torch.empty(B, S, self.hidden_size, dtype=self.dtype, device=self.where)  # [B, S, Ht]
        self._wait(self.pl.recv(hidden, self.src, TAG_HIDDEN), f"the hidden states of micro-batch {self.index}")
        received = time.time()
        self.index += 1
        self.remaining -= 1
        if self.remaining:
            self._post_header()  # the next header may arrive while this micro-batch trains
        else:
            self._header_work = None
        yield {"teacher_hidden": hidden.to(dev, non_blocking=True), "teacher_weight": self.weight,
               "teacher_bias": self.bias}
        self.timeline.write({"index": self._step0 * self._accum + self.index - 1, "step": step,
                             "wait_start": t0, "received": received,
                             "wait_s": received - t0, "forward_end": time.time()})

teachers.KINDS["separate"] = ApartTeacher


def connect_student(cfg: DistillConfig, rank: int) -> ApartTeacher:
    """Student side of a separate placement: receive the teacher's head from the teacher rank serving `rank`."""
    pl = engines.placement()
    if pl is None or pl.role != "student":
        raise RuntimeError("teacher.placement: separate, but the process groups were not split by role")
    return ApartTeacher(pl, rank, engines.device(), cfg.output_dir)


# ----------------------------------------------------------------------------------------------------------------
# both sides: the role split
# ----------------------------------------------------------------------------------------------------------------

def start(cfg: DistillConfig) -> str:
    """Start the process groups split by role; returns 'teacher' or 'student'. Refuses a teacher.ranks that leaves
    no student, and ZeRO-3 teacher ranks that would serve different numbers of students."""
    engines.check_device(cfg.train.device)
    engines.init_distributed(guards.process_group_timeout(cfg.train.watchdog_timeout_s),
                             teacher_ranks=cfg.teacher.ranks)
    pl = engines.placement()
    K, S = pl.teacher_ranks, pl.students
    if K > 1 and S % K and cfg.teacher.sharding != "replicate":
        raise DistillError(f"teacher.ranks: {K} ZeRO-3 teacher ranks cannot serve {S} student ranks evenly (each "
                           "teacher rank must run as many forwards as the others) -> launch a multiple of "
                           f"{K} student ranks, or set teacher.sharding: replicate")
    return pl.role


# ----------------------------------------------------------------------------------------------------------------
# teacher side
# ----------------------------------------------------------------------------------------------------------------

def probe_head(engine, mb: dict, positions: int, tolerance: float, path: str) -> float:
    """The start-up probe of the teacher's head (trainer.probe_heads does it for a colocated teacher): the model's own
    HF forward and the fused head (lm_head, bias, transform) on the first `positions` tokens of `mb`'s first row
    must agree within `tolerance` of the largest logit, or a ModelError (exit 2) names the teacher. Collective over
    the teacher ranks (ZeRO-3 gathers); returns the largest relative difference."""
    from .errors import ModelError

    dev = engines.device()
    ids, mask = mb["input_ids"][:1, :positions].to(dev), mb["attention_mask"][:1, :positions].to(dev)
    head = engine.module.head
    with torch.no_grad():
        own, hidden = engine(ids, mask, probe=True)  # [1, n, V], [1, n, H]
        with engines.gathered(head.params()):
            fused = head.logits(hidden)
    if hasattr(engine, "optimizer"):  # a ZeRO-3 engine: drop the one-off forward's module order
        engines.forget_forward_trace(engine)
    keep = mask.bool()
    diff = (own.float() - fused.float()).abs()[keep].max()
    rel = torch.stack([diff / own.float().abs()[keep].max().clamp_min(1e-6), diff]).double()
    rel = engines.all_reduce_max(rel).tolist()
    if not rel[0] <= tolerance:  # also catches NaN
        raise ModelError(
            f"teacher.path '{path}' (model_type '{getattr(engine.module.model.config, 'model_type', '?')}'): the "
            f"model's own forward gives other logits than the fused head (transform {head.transform.describe()}): "
            f"largest difference {rel[1]:.4g} = {rel[0]:.3g} of the largest logit (tolerance {tolerance:g}) -> its "
            "forward does something ds_distill's head table (ds_distill/heads.py FAMILIES) does not know: add its "
            "logit transform there (README: 'Model families'), or use a supported model")
    return rel[0]


def serve(cfg: DistillConfig, probe_positions: int = 16, probe_tolerance: float = 1e-3) -> int:
    """A teacher rank's whole run: load, probe and send the head, then hidden states for every micro-batch its
    students announced, QUEUE_DEPTH ahead of each; returns the exit code (0 once every student said done)."""
    pl = engines.placement()
    validate(cfg, pl.students)
    rank = _TeacherRank(cfg, pl)
    rank.send_head(probe_positions, probe_tolerance)
    n, step0, streams = rank.receive_starts()
    rank.send_hidden_states(n, step0, streams)
    print(f"[ds_distill] {rank.tag}: done, {n} micro-batches sent to each of its students", flush=True)
    return 0


class _TeacherRank:
    """One teacher rank of teacher.placement: separate: its teacher engine (built by the same assembly functions
    as a colocated run, over the K teacher ranks), the student ranks it serves, and the bridge to them."""

    def __init__(self, cfg: DistillConfig, pl: engines.Placement):
        self.cfg, self.pl = cfg, pl
        self.rank, K = torch.distributed.get_rank(), pl.teacher_ranks
        precision = engines.resolve_precision(cfg.train.precision)
        self.dev = engines.device()
        self.where = _bridge_device(self.dev)
        self.served = pl.students_of(self.rank)
        self.tag = f"teacher rank {pl.global_rank} (teacher {self.rank}/{K}, serving student ranks {self.served})"
        assembly.check_model_dirs(cfg)
        self.tokenizer = assembly.checked_tokenizer(cfg)
        self.train_ds = assembly.train_dataset(cfg, self.tokenizer)
        self.sharding = engines.broadcast_object(
            assembly.teacher_sharding(cfg, engines.torch_dtype(precision)) if self.rank == 0 else None)
        self.engine, _ = assembly.teacher_engine(cfg, sharding=self.sharding, world=K, precision=precision,
                                                 micro_batch_size=cfg.train.micro_batch_size)
        print(f"[ds_distill] {self.tag}: teacher loaded ({self.sharding} over {K} teacher rank(s)), "
              f"{engines.describe_device(precision)}", flush=True)

    def wait_for(self, s: int, what: str):
        """A waiter for bridge work with student `s`: a StudentLost naming it when that rank is gone."""
        def w(work):
            try:
                work.wait()
            except RuntimeError as e:
                raise StudentLost(f"{self.tag}: student rank {s} stopped while this teacher rank waited for {what} "
                                  f"({_first_line(e)}) -> see that rank's error above; the teacher ranks stop "
                                  "too") from None
        return w

    def stream(self, student: int) -> data.MicroBatchStream:
        """The micro-batch stream of student rank `student`, as that rank builds it."""
        return assembly.micro_batch_stream(self.cfg, self.train_ds, self.tokenizer, rank=student,
                                           world=self.pl.students)

    def send_head(self, probe_positions: int, probe_tolerance: float) -> None:
        """Probe the teacher's head against its own forward, then send it whole (gathered: collective over the
        teacher ranks) once to each served student, with its shape, dtype and transform."""
        pl, engine, where = self.pl, self.engine, self.where
        first = next(self.stream(self.served[0] if self.served else 0))
        rel = probe_head(engine, first, probe_positions, probe_tolerance, self.cfg.teacher.path)
        print(f"[ds_distill] {self.tag}: head probe: the fused head reproduces the teacher's own forward (largest "
              f"difference {rel:.2g} of the largest logit)", flush=True)
        head = engine.module.head
        with engines.gathered(head.params()):
            weight = head.weight.detach().to(where, copy=True).contiguous()
            bias = head.bias.detach().to(where, copy=True).contiguous() if head.bias is not None else None
        meta = {"rows": weight.shape[0], "hidden": weight.shape[1], "dtype": str(weight.dtype).split(".")[-1],
                "bias": bias is not None, "scale": head.transform.scale, "softcap": head.transform.softcap,
                "model_type": getattr(engine.module.model.config, "model_type", "?"), "sharding": self.sharding}
        for s in self.served:
            works = _send_json(pl, meta, s, TAG_META) + [pl.send(weight, s, TAG_WEIGHT)] + (
                [pl.send(bias, s, TAG_BIAS)] if bias is not None else [])
            for w in works:
                self.wait_for(s, "the head to arrive")(w)

    def receive_starts(self) -> tuple[int, int, dict]:
        """Each served student's start message: (micro-batches to send each, the step it resumed at, its stream
        positioned where it is)."""
        starts = {s: _recv_json(self.pl, s, TAG_START, self.wait_for(s, "its start message")) for s in self.served}
        counts = {s: int(m["micro_batches"]) for s, m in starts.items()}
        if len(set(counts.values())) > 1:
            raise DistillError(f"{self.tag}: its student ranks announced different numbers of micro-batches "
                               f"{counts} -> they resumed from different checkpoints; resume all from the same one")
        n = next(iter(counts.values()), 0)
        step0 = int(next(iter(starts.values()))["step"]) if starts else 0
        streams = {}
        for s, m in starts.items():
            streams[s] = self.stream(s)
            streams[s].load_state_dict(m["data_state"])
        return n, step0, streams

    def send_hidden_states(self, n: int, step0: int, streams: dict) -> None:
        """The teacher's final hidden states for n micro-batches of each student, with a header each, up to
        QUEUE_DEPTH in flight per student; then wait for every student's end of run (engines.shutdown)."""
        pl, dev, where, T = self.pl, self.dev, self.where, self.cfg.train
        watchdog = guards.Watchdog(T.watchdog_timeout_s, pl.global_rank).start()
        timeline = Timeline(self.cfg.output_dir, f"teacher_rank{pl.global_rank}")
        pending: collections.deque = collections.deque()  # (student, works, tensors kept alive until sent)

        def settle(limit: int) -> None:  # wait for the oldest sends until at most `limit` are in flight
            while len(pending) > limit:
                s_old, works, _ = pending.popleft()
                for w in works:
                    self.wait_for(s_old, "a micro-batch to be received")(w)

        try:
            for i in range(n):
                step = step0 + i // T.grad_accum_steps + 1
                if i and i % T.grad_accum_steps == 0:
                    faults.after_step(step - 1, pl.global_rank)  # test fault only: kill@STEP:GLOBAL_RANK
                for s in self.served:
                    mb = streams[s].__next__()
                    start_t = time.time()
                    ids = mb["input_ids"].to(dev)
                    mask = mb["attention_mask"].to(dev) if mb.get("position_ids") is None else None
                    pos = mb["position_ids"].to(dev) if mb.get("position_ids") is not None else None
                    with torch.no_grad():
                        hidden = self.engine(ids, mask, pos).to(where).contiguous()  # [B, S, Ht]
                    end_t = time.time()
                    header = _header(i, mb).to(where)
                    pending.append((s, [pl.send(header, s, TAG_HEADER), pl.send(hidden, s, TAG_HIDDEN)],
                                    (header, hidden)))
                    timeline.write({"student": s, "index": step0 * T.grad_accum_steps + i, "step": step,
                                    "forward_start": start_t, "forward_end": end_t})
                    settle(QUEUE_DEPTH * len(self.served))  # bounded
                watchdog.beat(f"teacher micro-batch {i}")
            settle(0)
            # the students' end (engines.shutdown): after their export, evaluation and report, which may take long
            # (no watchdog here: a student that hangs is ended by its own watchdog, which closes its connection)
            watchdog.stop()
            done = {s: (pl.recv(torch.zeros(1, dtype=torch.int64, device=where), s, pl.DONE_TAG))
                    for s in self.served}
            for s, w in done.items():
                self.wait_for(s, "its end of the run")(w)  # raises StudentLost when it died instead
        finally:
            watchdog.stop()
            timeline.close()
