"""DeepSpeed checkpoints with one resume-state dataclass, committed atomically.

Layout: output_dir/checkpoints/step_00000010/ (DeepSpeed's files + rng_rank{r}.pt + resume.json + COMPLETE) and
output_dir/checkpoints/latest (the tag of the newest complete checkpoint).

Commit protocol (`save`, collective):
1. every rank writes its DeepSpeed shard (model + optimizer states, the ResumeState as client_state) and its RNG file;
2. the ranks all-reduce a "my writes failed" flag: only when every rank's files are on disk does rank 0 write
   COMPLETE (fsync'd), then atomically replace `latest` (write latest.tmp, fsync, os.replace), then prune;
3. a second flag all-reduce tells every rank whether rank 0's commit succeeded.
A crash or SIGKILL at any point before COMPLETE leaves a directory without COMPLETE, which `find_latest` ignores:
the previous checkpoint stays the one a resume uses. A full disk (or any OSError) raises one DistillError naming the
path on every rank that can still talk to the others; the partial directory is removed, `latest` is untouched.

Loading trusts nothing in the directory: DeepSpeed's files are pickles, read here with torch.load(weights_only=True)
and an allow-list of the few DeepSpeed classes they hold (engines.load_checkpoint_file): a file that needs anything
else is refused before any of it runs. `latest` is followed only to a step_* directory directly inside the run's
checkpoints/ (never a path elsewhere, never through a symlink leaving it). Checkpoints are written private (0700
directories, 0600 files). Before loading, every rank checks the structure of the checkpoint's files (`unusable_files`):
a truncated or missing shard is found by all ranks together, so an automatic resume falls back to the previous
complete checkpoint (with a notice) instead of one rank failing alone. Resuming step s (a fallback or an explicit
`checkpoint.resume` path) moves the run's checkpoints after s into checkpoints/set_aside/ and points `latest` at s:
the next automatic resume continues the branch that was resumed, not the abandoned one.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import engines
from .config import ResumeRequest
from .errors import DistillError

LATEST = "latest"
COMPLETE = "COMPLETE"
RESUME_JSON = "resume.json"  # the ResumeState as JSON, readable before any engine exists (check_output_dir)
SET_ASIDE = "set_aside"  # checkpoints after a resumed step (an abandoned branch) are moved here, never deleted
_TAG = re.compile(r"step_\d{8}")


@dataclass
class ResumeState:
    """Everything besides weights/optimizer/scheduler that an exact resume needs (DeepSpeed client_state)."""
    step: int = 0
    """Optimizer steps done (skipped ones included)."""
    samples_consumed: int = 0
    """Rows each rank has read from its data shard (MicroBatchStream position; the same on every rank)."""
    tokens_seen: int = 0
    """Trained tokens over all ranks so far."""
    skipped_steps: int = 0
    """Steps skipped by train.nonfinite: skip."""
    wandb_run_id: Optional[str] = None
    """W&B run id, so a resumed run continues the same W&B run."""
    world_size: int = 0
    """Ranks that wrote the checkpoint (a ZeRO checkpoint holds one shard per rank)."""
    data_state: dict = field(default_factory=dict)
    """MicroBatchStream.state_dict(): position plus seed / world size / rows, checked on resume."""
    extra: dict = field(default_factory=dict)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """RNG states (torch CPU, CUDA if present, numpy, python) as tensors and plain values, so they load back with
    weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _any_rank(flag: bool) -> bool:
    """Collective: True when `flag` is True on some rank (a barrier as well)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return bool(t.item() > 0)


def _write_synced(path: str, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


_TORCH_WRITE_ERRORS = ("file write failed", "PytorchStreamWriter failed", "inline_container.cc", "unexpected pos",
                       "No space left")


def _is_write_failure(e: BaseException) -> bool:
    """OSError (ENOSPC, EDQUOT, EIO...), or torch.save's RuntimeError when its zip writer cannot write (a short
    write on a full disk surfaces as "[enforce fail at inline_container.cc] unexpected pos ...")."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_ERRORS))


def _disk_error(path: str, ckpt_root: str, e: BaseException, where: str) -> DistillError:
    prev = find_latest(ckpt_root)
    reason = (getattr(e, "strerror", None) or str(e).strip().splitlines()[-1]) if isinstance(e, OSError) else \
        "torch.save could not write its file (disk full?)"
    try:
        free = f"{shutil.disk_usage(ckpt_root).free / 2 ** 20:.1f} MiB free on that disk"
    except OSError:
        free = "free space unknown"
    kept = (f"the previous checkpoint {prev} is intact (latest still names it)" if prev else
            "no earlier checkpoint exists")
    return DistillError(
        f"output_dir: cannot write the checkpoint {path} ({where}: {reason}; {free}) -> free space on the disk of "
        f"output_dir or point output_dir elsewhere; the partial checkpoint was removed and {kept}")


def save(engine, ckpt_root: str, state: ResumeState, keep_last: int, rng: Optional[dict] = None,
         before_complete: Optional[Callable[[int, int], None]] = None) -> str:
    """Collective: write the checkpoint of `state.step` and make it `latest` once every rank's files are on disk.

    `rng`: the RNG states to store (default: now). A checkpoint that already exists COMPLETE is never rewritten.
    `before_complete(step, rank)`: called once this rank's files are written, before the step is marked COMPLETE
    (the trainer passes its fault hook there).
    """
    tag = tag_for(state.step)
    rank = _rank()
    path = os.path.join(ckpt_root, tag)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    if rank == 0:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # leftovers of a run that died while writing this same step
        # private: the shards hold the whole model and optimizer (output_dir/final is 0600 as well)
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(ckpt_root, 0o700)
        os.chmod(path, 0o700)
    _any_rank(False)  # barrier: no rank writes before the leftovers are gone
    state.world_size = dist.get_world_size() if dist.is_initialized() else 1
    try:
        engine.save_checkpoint(ckpt_root, tag=tag, client_state={"resume": dataclasses.asdict(state)},
                               save_latest=False)
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        # This rank cannot finish DeepSpeed's save (whose last step is a barrier the others wait in): say why and
        # exit; the launcher ends the other ranks. Nothing of the previous checkpoint or `latest` was touched.
        shutil.rmtree(path, ignore_errors=True)
        err = _disk_error(path, ckpt_root, e, f"rank {rank}, DeepSpeed shard")
        raise err from None
    failed: Optional[BaseException] = None
    try:
        torch.save(rng if rng is not None else rng_state(), os.path.join(path, f"rng_rank{rank}.pt"))
        _make_private(path)
    except (OSError, RuntimeError) as e:
        if not _is_write_failure(e):
            raise
        failed = e
    if before_complete is not None:
        before_complete(state.step, rank)
    if _any_rank(failed is not None):  # every rank's files are on disk only if no rank failed
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        _any_rank(False)
        raise _disk_error(path, ckpt_root, failed or OSError("another rank failed to write its files"),
                          f"rank {rank}, RNG state")
    commit_error: Optional[OSError] = None
    if rank == 0:
        try:
            _write_synced(os.path.join(path, RESUME_JSON), json.dumps(dataclasses.asdict(state), indent=1) + "\n")
            _write_synced(os.path.join(path, COMPLETE), tag + "\n")
            _write_synced(os.path.join(ckpt_root, LATEST + ".tmp"), tag + "\n")
            os.replace(os.path.join(ckpt_root, LATEST + ".tmp"), os.path.join(ckpt_root, LATEST))
        except OSError as e:
            commit_error = e
            try:
                os.remove(os.path.join(path, COMPLETE))
            except OSError:
                pass
            shutil.rmtree(path, ignore_errors=True)
        else:
            prune(ckpt_root, keep_last)
    if _any_rank(commit_error is not None):
        raise _disk_error(path, ckpt_root, commit_error or OSError("rank 0 could not commit the checkpoint"),
                          "COMPLETE / latest")
    return path


def _make_private(path: str) -> None:
    """chmod 0600 every file of this checkpoint directory this process owns (each rank its own files)."""
    uid = os.getuid()
    for name in os.listdir(path):
        f = os.path.join(path, name)
        st = os.lstat(f)
        if st.st_uid == uid and os.path.isfile(f) and not os.path.islink(f):
            os.chmod(f, 0o600)


def _inside(path: str, root: str) -> bool:
    """`path` resolves (symlinks followed) to a directory directly inside `root`."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.dirname(real) == real_root


def complete_checkpoints(ckpt_root: str) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    tags = [d for d in os.listdir(ckpt_root) if _TAG.fullmatch(d) and _inside(os.path.join(ckpt_root, d), ckpt_root)
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
    """Path of the newest complete checkpoint: `latest` if it names a complete one, else the newest complete.

    `latest` is only followed to a step_* directory directly inside ckpt_root: a tag that is a path (absolute, with
    '..' or a symlink leading out) is ignored, so whoever can write `latest` cannot make a run load files elsewhere.
    """
    p = os.path.join(ckpt_root, LATEST)
    if os.path.isfile(p):
        with open(p) as f:
            tag = f.read(64).strip()
        cand = os.path.join(ckpt_root, tag)
        if _TAG.fullmatch(tag) and _inside(cand, ckpt_root) and os.path.isfile(os.path.join(cand, COMPLETE)):
            return cand
    tags = complete_checkpoints(ckpt_root)
    return os.path.join(ckpt_root, tags[-1]) if tags else None


def read_resume_json(path: str) -> Optional[dict]:
    """The resume state a checkpoint directory holds as JSON (None for checkpoints written without it)."""
    try:
        with open(os.path.join(path, RESUME_JSON)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def writer_world_size(path: str) -> int:
    """Ranks that wrote a ZeRO checkpoint: one *_model_states.pt per data-parallel rank."""
    return len(glob.glob(os.path.join(path, "*zero_pp_rank_*_mp_rank_00_model_states.pt"))) or \
        len(glob.glob(os.path.join(path, "*_model_states.pt")))


def _zip_problem(path: str) -> Optional[str]:
    """Why a torch.save zip archive cannot be read whole (missing, empty, truncated), or None. Reads only its
    central directory and compares every member's extent with the file size: cheap for any shard size."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                return None  # not a zip archive (legacy torch serialization): left to the loader
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + len(info.FileHeader()) + info.compress_size > size:
                    return f"truncated: member {info.filename} ends beyond the file's {size} bytes"
    except zipfile.BadZipFile as e:
        return f"truncated or corrupt: {e}"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return None


def unusable_files(path: str) -> list[str]:
    """Problems of one checkpoint directory as this rank sees it: '<file>: <why>' for each DeepSpeed or RNG file
    that is empty, truncated or missing (one model-states file per rank needs its optimizer-states file)."""
    problems = []
    files = sorted(glob.glob(os.path.join(path, "*.pt")))
    if not any(f.endswith("_model_states.pt") for f in files):
        problems.append(f"{path}: no DeepSpeed *_model_states.pt file")
    for f in files:
        why = _zip_problem(f)
        if why:
            problems.append(f"{f}: {why}")
    for m in (f for f in files if re.search(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$", f)):
        rank_part = re.search(r"zero_pp_rank_\d+_mp_rank_\d+", m).group(0)
        if not glob.glob(os.path.join(path, f"*{rank_part}_optim_states.pt")):
            problems.append(f"{path}: {os.path.basename(m)} has no {rank_part}_optim_states.pt")
    return problems


def _all_problems(path: str) -> list[str]:
    """Collective: unusable_files of `path` over every rank (a rank may see files others do not)."""
    seen = engines.all_gather_object(unusable_files(path))
    return sorted({p for per_rank in seen for p in per_rank})


def select_resume(ckpt_root: str, resume: ResumeRequest, notice) -> Optional[str]:
    """Collective: the checkpoint to resume from, or None (checkpoint.resume parsed: auto, never or a path).

    auto: the newest complete checkpoint whose files are all readable; a checkpoint with a truncated or missing file
    is skipped with a notice naming the file (the previous complete one is used). An explicit path must be usable,
    or the error names what is wrong with it.
    """
    if resume.mode == "never":
        return None
    fix = ("-> delete or move that checkpoint directory (the previous complete one is then used), or set "
           "checkpoint.resume to an older checkpoint")
    if resume.mode == "path":
        path = resume.path
        _check_is_checkpoint(path)
        problems = _all_problems(path)
        if problems:
            err = DistillError(f"checkpoint.resume: '{path}' cannot be loaded: " + "; ".join(problems) + " " + fix)
            err.shared = True  # every rank took part in the check
            raise err
        return path
    # the candidates are listed once, on rank 0, and broadcast: ranks whose filesystems differ (node-local
    # output_dir, a lagging network filesystem) cannot pick different checkpoints, or some resume and others start
    # fresh (the files of each candidate are then checked on every rank)
    candidates = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        latest = find_latest(ckpt_root)
        candidates = [] if latest is None else [latest] + [
            os.path.join(ckpt_root, t) for t in reversed(complete_checkpoints(ckpt_root))
            if t < os.path.basename(latest)]
    candidates = engines.broadcast_object(candidates)
    if not candidates:
        return None
    for cand in candidates:
        problems = _all_problems(cand)
        if not problems:
            return cand
        notice(f"[ds_distill] checkpoint {cand} is unusable (" + "; ".join(problems) + "): falling back to the "
               "previous complete checkpoint")
    err = DistillError(f"checkpoint.resume: auto: no complete checkpoint in '{ckpt_root}' can be loaded (see the "
                       "files named above) -> delete the damaged checkpoint directories, or set checkpoint.resume: "
                       "never with a new output_dir")
    err.shared = True
    raise err


def set_aside_after(ckpt_root: str, path: str) -> list[str]:
    """Rank 0: the run continues from checkpoint `path`; move this run's complete checkpoints of later steps (an
    abandoned branch) into ckpt_root/set_aside/ and point `latest` at `path` when it is one of this run's. Returns
    the moved directories' new paths. Nothing is deleted (incomplete directories are replaced when their step is
    saved again)."""
    if not os.path.isdir(ckpt_root):
        return []
    tag = os.path.basename(path.rstrip("/"))
    own = _inside(path, ckpt_root)
    moved = []
    for d in sorted(os.listdir(ckpt_root)):
        if d.startswith("step_") and d > tag and os.path.isfile(os.path.join(ckpt_root, d, COMPLETE)):
            dest_root = os.path.join(ckpt_root, SET_ASIDE)
            os.makedirs(dest_root, mode=0o700, exist_ok=True)
            dest, n = os.path.join(dest_root, d), 1
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(dest_root, f"{d}.{n}")
            os.replace(os.path.join(ckpt_root, d), dest)
            moved.append(dest)
    latest = os.path.join(ckpt_root, LATEST)
    if own and _TAG.fullmatch(tag):
        _write_synced(latest + ".tmp", tag + "\n")
        os.replace(latest + ".tmp", latest)
    elif moved and os.path.exists(latest):
        os.remove(latest)  # it named a checkpoint now set aside; find_latest falls back to the newest complete
    return moved


def _check_is_checkpoint(path: str) -> None:
    """An explicit checkpoint.resume path: missing, not a checkpoint, or incomplete, each said as such."""
    if not os.path.isdir(path):
        raise DistillError(f"checkpoint.resume: '{path}' does not exist -> give a checkpoint directory "
                           "(output_dir/checkpoints/step_XXXXXXXX), or use checkpoint.resume: auto")
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        if not glob.glob(os.path.join(path, "*_model_states.pt")):
            raise DistillError(f"checkpoint.resume: '{path}' is not a checkpoint directory (no DeepSpeed files, no "
                               f"{COMPLETE}) -> give output_dir/checkpoints/step_XXXXXXXX of an earlier run")
        raise DistillError(f"checkpoint.resume: '{path}' is incomplete (no {COMPLETE} file: the run stopped while "
                           "writing it) -> resume from the previous checkpoint, or use checkpoint.resume: auto")


def load(engine, path: str, world_size: int) -> ResumeState:
    """Restore weights, optimizer, LR scheduler, this rank's RNG; return the resume state."""
    path = os.path.abspath(path.rstrip("/"))
    _check_is_checkpoint(path)
    zero_sharded = engine.zero_optimization_stage() > 0
    written_by = writer_world_size(path)
    if zero_sharded and written_by and written_by != world_size:
        raise DistillError(f"checkpoint.resume: '{path}' was written by {written_by} ranks and this run has "
                           f"{world_size} -> resume with {written_by} ranks (a ZeRO checkpoint holds one shard per "
                           "rank and the data order depends on the world size)")
    root, tag = os.path.dirname(path), os.path.basename(path)
    try:
        _, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    except engines.CheckpointFileError as e:
        # found by this rank only (the structural check passed): it prints this, exits, and the others stop
        fix = ("-> resume only from checkpoints your own runs wrote; delete that checkpoint directory" if e.refused
               else "-> delete or move that checkpoint directory (the previous complete one is then used)")
        raise DistillError(f"checkpoint.resume: cannot load {e.path}: {e.reason} {fix}") from None
    if client is None or "resume" not in client:
        raise DistillError(f"checkpoint.resume: '{path}' is not a ds_distill checkpoint (no resume state)")
    rng = os.path.join(path, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng):
        set_rng_state(torch.load(rng, weights_only=True))  # tensors and plain values only: no unpickling
    d = dict(client["resume"])
    names = {f.name for f in dataclasses.fields(ResumeState)}
    return ResumeState(**{k: d[k] for k in d if k in names})
