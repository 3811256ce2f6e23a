"""Fail-safe training: preemption, the non-finite guard, the watchdog, and test-only fault hooks.

- Preemption. `install_sigterm_handler()` turns SIGTERM (what SLURM sends before a time limit or a preemption) into
  a flag. The flag travels in the one small all-reduce `StepGuard.check` does every step, so every rank learns in the
  same step that some rank was signalled: all finish that step, save a checkpoint together and exit with
  EXIT_PREEMPTED (143, the shell's code for "terminated by SIGTERM"); a requeued job resumes from it.
- Non-finite guard. `StepGuard.check` runs after the last micro-batch's forward and before its backward. A rank whose
  loss sums of the step are not finite is named in the same all-reduce; the loss every rank then backpropagates is
  multiplied by NaN, so the gradients are NaN everywhere and DeepSpeed's own overflow check (ZeRO 1/2/3, bf16, fp16:
  `is_invalid_grad_norm` in the optimizer's `step`) discards the update: the optimizer never touches the weights and
  the LR schedule does not advance. A non-finite gradient norm with a finite loss takes the same DeepSpeed path.
  `StepGuard.after_step` then aborts (train.nonfinite: abort, the default; the trainer saves the last good step's
  checkpoint first) or counts a skipped step (train.nonfinite: skip, at most train.max_skipped_steps). ZeRO-0 in
  fp32 has no such check in DeepSpeed: there the guard stops before the backward (abort only; see `validate_mode`).
- Watchdog. A thread per rank that, when no `beat()` came for train.watchdog_timeout_s, prints the rank's Python
  stacks (all threads) with a one-line explanation and ends the process with EXIT_WATCHDOG: a rank stuck in a
  collective (a peer died, hung, or runs a different number of forwards) becomes an error instead of a hang. The
  process-group timeout is set above it (`process_group_timeout`), so the watchdog's message comes first.
- Launcher watch. `watch_launcher()`: a rank started by a launcher (deepspeed's launch.py, torchrun) treats the
  launcher's end like a SIGTERM: the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG), and a thread
  notices within a second when the parent or, under `deepspeed`, the `deepspeed` command above launch.py ends (a
  SIGTERM to `deepspeed` ends it at once and launch.py keeps the ranks running). Every rank then saves a
  checkpoint at the next step boundary and exits, instead of training on with no one to stop it.
- Test faults (a stall inside a step, a NaN loss...) live in faults.py, called by the trainer.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import threading
import time
from typing import Callable, Optional

import torch

from .errors import ConfigError, NonFiniteError

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a checkpoint was saved, run the same command again to resume
EXIT_WATCHDOG = 3  # a rank made no progress for train.watchdog_timeout_s (stacks printed)

_term = threading.Event()


class Preempted(Exception):
    """Raised by the loop after the checkpoint of a SIGTERM'd run is saved; main() turns it into EXIT_PREEMPTED."""

    def __init__(self, step: int, path: str):
        self.step, self.path = step, path
        super().__init__(f"SIGTERM received: saved the checkpoint of step {step} to {path} and stopped -> run the "
                         "same command again to resume (checkpoint.resume: auto)")


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM
# ----------------------------------------------------------------------------------------------------------------

def install_sigterm_handler() -> Callable[[], None]:
    """SIGTERM sets a flag instead of killing the process (main thread only); returns a function restoring the old
    handler. Repeated signals (SLURM and a launcher may both send one) are the same request."""
    _term.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        if not _term.is_set():
            _term.set()
            os.write(2, f"[ds_distill] rank {os.environ.get('RANK', '0')}: SIGTERM received, saving a checkpoint at "
                        "the next step boundary\n".encode())

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def sigterm_requested() -> bool:
    return _term.is_set()


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state letter, parent pid) of a process from /proc, or None when it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return rest[0], int(rest[1])
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


_LAUNCHERS = ("deepspeed.launcher.launch", "torch.distributed.run", "torchrun")


def watch_launcher(poll_s: float = 1.0) -> Callable[[], None]:
    """Stop like on SIGTERM when this rank's launcher ends (see the module docstring); returns a stop function.
    Does nothing for a process not started by a known launcher (a plain `python`, `srun`: those deliver signals
    themselves, and a shell that exits must not stop a nohup'ed run) or without /proc."""
    ppid = os.getppid()
    if not any(name in _cmdline(ppid) for name in _LAUNCHERS):
        return lambda: None
    watched = [ppid]
    up = _proc_stat(ppid)
    if "deepspeed.launcher.launch" in _cmdline(ppid) and up and up[1] > 1 and "deepspeed" in _cmdline(up[1]):
        watched.append(up[1])  # the `deepspeed` command: a SIGTERM to it does not reach launch.py
    try:  # the kernel's own notice when the parent dies (Linux), even if this process is stuck in C code
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    done = threading.Event()

    def gone(pid: int) -> bool:
        st = _proc_stat(pid)
        return st is None or st[0] in ("Z", "X")  # exited (a zombie not yet reaped by its own parent counts)

    def run() -> None:
        while not done.wait(poll_s):
            ended = [p for p in watched if gone(p)] or ([ppid] if os.getppid() != ppid else [])
            if ended:
                if not _term.is_set():
                    _term.set()
                    os.write(2, f"[ds_distill] rank {os.environ.get('RANK', '0')}: the launcher (pid {ended[0]}) "
                                "ended: saving a checkpoint at the next step boundary, then stopping\n".encode())
                return

    threading.Thread(target=run, name="ds_distill-launcher-watch", daemon=True).start()
    return done.set


# ----------------------------------------------------------------------------------------------------------------
# Non-finite guard + the per-step flag exchange
# ----------------------------------------------------------------------------------------------------------------

def validate_mode(nonfinite: str, deepspeed_discards_nonfinite: bool, zero_stage: int, precision: str) -> None:
    """train.nonfinite: skip needs DeepSpeed to discard a non-finite update by itself (not so for ZeRO-0 in fp32)."""
    if nonfinite == "skip" and not deepspeed_discards_nonfinite:
        raise ConfigError([f"train.nonfinite: 'skip' needs an optimizer that discards non-finite updates; ZeRO-"
                           f"{zero_stage} in {precision} has none -> use train.zero_stage >= 1, or train.nonfinite: "
                           "abort"])


class StepGuard:
    """Per-run guard state: one collective flag exchange per step, the skip counter, the step in progress."""

    def __init__(self, *, rank: int, world_size: int, nonfinite: str, max_skipped_steps: int,
                 deepspeed_discards_nonfinite: bool, device: torch.device, all_reduce_sum: Callable,
                 skipped_steps: int = 0, watchdog: Optional["Watchdog"] = None):
        self.rank, self.world_size = rank, world_size
        self.nonfinite = nonfinite
        self.max_skipped_steps = max_skipped_steps
        self.discards = deepspeed_discards_nonfinite
        self.device = device
        self.all_reduce_sum = all_reduce_sum
        self.skipped_steps = skipped_steps
        self.watchdog = watchdog
        self.step = 0  # the step in progress (1-based), set by the loop
        self.bad_ranks: list[int] = []
        self.teacher_side = False  # the non-finite values were in the KD term only (finite CE): the teacher's
        self.stop_requested = False
        self.checked = False

    def begin(self, step: int) -> None:
        """Start of step `step`: beat the watchdog, reset the flags."""
        self.step = step
        self.bad_ranks, self.checked = [], False
        if self.watchdog is not None:
            self.watchdog.beat(f"step {step}")

    def check(self, local_sums: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Collective, once per step, on every rank: after the last micro-batch's forward, before its backward.

        `local_sums`: this rank's loss sums of the whole step so far (total, ce, kd first); `loss`: what would be
        backpropagated. Returns the loss to backpropagate (NaN-poisoned when any rank's loss is not finite).
        """
        flags = torch.zeros(self.world_size + 1, dtype=torch.float64, device=self.device)
        # on the device (no host sync): 1 for a non-finite total/CE/KD; 2 for the KD term alone with a finite CE
        # (the student's logits are finite, so the teacher's side is the cause)
        local = local_sums[:3]
        bad = (~torch.isfinite(local).all()).double()
        kd_only = (torch.isfinite(local[1]) & ~torch.isfinite(local[2])).double()
        flags[self.rank] = bad * (1.0 + kd_only)
        if sigterm_requested():
            flags[self.world_size] = 1.0
        self.all_reduce_sum(flags)
        f = flags.tolist()  # host sync: the one a step needs before its last backward
        self.bad_ranks = [r for r in range(self.world_size) if f[r] > 0]
        self.teacher_side = bool(self.bad_ranks) and all(f[r] == 2.0 for r in self.bad_ranks)
        self.stop_requested = f[self.world_size] > 0
        self.checked = True
        if self.watchdog is not None:
            self.watchdog.beat(f"step {self.step} (backward)")
        if self.bad_ranks:
            if not self.discards:  # ZeRO-0 fp32: nothing would discard a NaN update; stop before the backward
                raise NonFiniteError(self._message(f"non-finite loss on rank(s) {self.bad_ranks}"))
            return loss * float("nan")  # every rank's gradients become NaN: DeepSpeed discards the update
        return loss

    def check_grads(self, params) -> None:
        """Collective, for optimizers without an overflow check (ZeRO-0 in fp32): after the last backward, before
        engine.step(): a non-finite gradient on any rank aborts before the optimizer runs. (Gradients are whole and
        already averaged over ranks there, so the rank that produced them cannot be told.)"""
        bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
        flag = torch.tensor([1.0 if bad else 0.0], dtype=torch.float64, device=self.device)
        if bool(self.all_reduce_sum(flag).item() > 0):
            raise NonFiniteError(self._message("non-finite gradient (found before the optimizer step)"))

    def after_step(self, step_applied: bool, fp16: bool = False) -> bool:
        """After engine.step() at the boundary. Returns True when the step was skipped (train.nonfinite: skip);
        raises NonFiniteError to abort. The weights are those of the last good step in both cases."""
        if not self.checked:
            raise RuntimeError("StepGuard.check was not called this step (train_step without the guard)")
        if step_applied:
            if self.bad_ranks:
                raise RuntimeError(f"internal: step {self.step} had a non-finite loss on rank(s) {self.bad_ranks} "
                                   "but DeepSpeed applied the update")
            return False
        if not self.bad_ranks and fp16:
            return True  # fp16 dynamic loss scaling: DeepSpeed lowered the scale and skipped; not an error
        what = (f"non-finite loss on rank(s) {self.bad_ranks}" if self.bad_ranks else
                "non-finite gradient norm (a global norm over all ranks: DeepSpeed's overflow check)")
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            if self.skipped_steps > self.max_skipped_steps:
                raise NonFiniteError(self._message(f"{what}; {self.skipped_steps} steps skipped, more than "
                                                   f"train.max_skipped_steps={self.max_skipped_steps}"))
            return True
        raise NonFiniteError(self._message(what))

    def _message(self, what: str) -> str:
        if self.teacher_side:
            return (f"step {self.step}: {what}, in the KD term only (the student's CE is finite): the teacher's "
                    "outputs are not finite; the optimizer did not update the weights -> check the teacher "
                    "(teacher.path: NaN/inf in its weights, or fp16 overflow: use bf16 or fp32; teacher.cache: "
                    "its log-probs), e.g. with launch/eval.py --teacher; a lower train.lr does not help")
        return (f"step {self.step}: {what}; the optimizer did not update the weights -> lower train.lr, check the "
                "data of this step, or set train.nonfinite: skip to skip such steps "
                f"(up to train.max_skipped_steps)")

    def skip_message(self) -> str:
        who = f"non-finite loss on rank(s) {self.bad_ranks}" if self.bad_ranks else "non-finite gradient norm"
        return (f"step {self.step}: {who}: step skipped, weights unchanged ({self.skipped_steps}/"
                f"{self.max_skipped_steps} skips used)")


# ----------------------------------------------------------------------------------------------------------------
# Watchdog
# ----------------------------------------------------------------------------------------------------------------

def process_group_timeout(watchdog_timeout_s: float) -> float:
    """The process group's collective timeout: above the watchdog's, so the watchdog reports (with stacks) first."""
    return max(1800.0, 2.0 * watchdog_timeout_s + 60.0)


class Watchdog:
    """Ends the process with each thread's stack when no beat() came for `timeout_s` seconds (0 disables it)."""

    def __init__(self, timeout_s: float, rank: int, poll_s: Optional[float] = None):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.poll_s = poll_s if poll_s is not None else max(0.2, min(5.0, self.timeout_s / 20.0))
        self._last = time.monotonic()
        self._what = "start"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._run, name="ds_distill-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        self._last, self._what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        with tempfile.TemporaryFile(mode="w+") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            stacks = f.read()
        head = (f"[ds_distill] watchdog: rank {self.rank} made no progress for {idle:.2f} s (train.watchdog_timeout_s="
                f"{self.timeout_s:g}) since '{self._what}': a collective is stuck (a rank died, hangs, or ran a "
                "different number of forwards) -> see each rank's stack below; raise train.watchdog_timeout_s if "
                "a step, checkpoint or eval legitimately takes longer")
        text = head + "\n" + "".join(f"[rank {self.rank} stack] {line}\n" for line in stacks.splitlines())
        try:
            os.write(2, text.encode())
        finally:
            os._exit(EXIT_WATCHDOG)
