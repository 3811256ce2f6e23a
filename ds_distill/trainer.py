"""The distillation loop: build everything from a DistillConfig, train, checkpoint, export.

One `train_step` for every world size and accumulation setting. The loss of a step is normalised by the number of
trained tokens of the WHOLE step (all micro-batches of all ranks), counted before the first forward; DeepSpeed's
own averaging over data-parallel ranks is compensated by multiplying by the world size, and its division by the
accumulation steps is switched off (`scale_wrt_gas=False`). The gradient is therefore exactly the gradient of the
global token mean, and the logged CE / KL / total are the same global token-weighted values.
"""
from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import shutil
import sys
import time
from typing import Optional

import torch

from . import (assembly, checkpoint, data, engines, faults, generation, guards, lora, models, served_teacher,
               teacher_apart, teacher_cache, teachers, vocab)
from .config import DistillConfig, to_dict
from .errors import ConfigError, DistillError, ModelError, NonFiniteError
from .losses import HEALTH_METRICS, LossSpec
from .tracking import Tracker
from . import evaluate, report, tasks

# Order of the per-step sums all-reduced once per step ("aux": an MoE student's router aux loss, summed over
# micro-batches; "micro_batches": how many were summed, over all ranks).


@dataclasses.dataclass
class StepSums:
    """One step's loss sums over every micro-batch and rank (host floats), what train_step returns.

    total / ce / kd: sums over the step's trained tokens (`tokens` of them); aux: the MoE router aux losses summed over
    the `micro_batches` forwards (all ranks), aux_coef their weight; health: losses.HEALTH_METRICS sums; global_*:
    trained tokens, real tokens and computed token slots of the step; peak_memory_gb: the largest rank's peak;
    extra: further logged values of the step (on-policy generation: generation.step_stats)."""
    total: float
    ce: float
    kd: float
    tokens: float
    aux: float
    micro_batches: float
    health: dict
    peak_memory_gb: float = 0.0
    global_tokens: float = 0.0
    global_seq_tokens: float = 0.0
    global_slots: float = 0.0
    aux_coef: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    DEVICE = ("total", "ce", "kd", "tokens", "aux", "micro_batches")  # the device vector: these, then health

    @classmethod
    def width(cls) -> int:
        return len(cls.DEVICE) + len(HEALTH_METRICS)

    @classmethod
    def from_vector(cls, v: list[float], **rest) -> "StepSums":
        n = len(cls.DEVICE)
        return cls(**dict(zip(cls.DEVICE, v[:n])), health=dict(zip(HEALTH_METRICS, v[n:n + len(HEALTH_METRICS)])),
                   **rest)
# The start-up probe: positions of the first micro-batch run through each model's own forward, and the largest
# |own - fused| allowed, relative to the largest |own logit| (fp32: rounding is ~1e-6; bf16/fp16 round the logits
# to 8-11 bits, and the HF forward rounds at other places than the fused head)
PROBE_POSITIONS = 16
PROBE_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 1e-2}


@dataclasses.dataclass
class Run:
    """Everything built for a run (what `train` needs), so tests and tools can build once and inspect."""
    cfg: DistillConfig
    rank: int
    world_size: int
    tokenizer: object
    student_engine: object
    teacher: teachers.TeacherSource  # what train_step asks for the teacher's side of each micro-batch
    stream: data.MicroBatchStream
    eval_dataset: Optional[object]
    loss: LossSpec  # the loss settings (also held by the student wrapper, which computes the loss)
    state: checkpoint.ResumeState
    ckpt_root: str
    precision: str  # train.precision resolved for this device (engines.resolve_precision): fp32, bf16 or fp16
    vocab_message: str = ""
    teacher_eval_cache: Optional[evaluate.TeacherCache] = None  # filled by the first eval, reused after
    on_policy: Optional[generation.OnPolicy] = None  # on_policy.lmbda / seq_kd > 0: a step's sampled micro-batches

    @property
    def teacher_engine(self):
        """The teacher model's engine when the teacher is a model on these ranks (held-out evaluation and the
        start-up probe run it), else None."""
        return self.teacher.engine if isinstance(self.teacher, teachers.EngineTeacher) else None


# What a run writes (and overwrite_output_dir removes).
OUTPUT_NAMES = ("checkpoints", "metrics.jsonl", "final", "final_adapter", "wandb", "report.md", "report_data.json",
                "losses.png", "eval_ppl.png", "gap.png", "generations.md", "tasks", teacher_apart.TIMELINE_DIR)


def check_output_dir(cfg: DistillConfig, rank: int) -> bool:
    """Refuse to start a fresh run over a different run's outputs, unless resuming or told to overwrite.

    Deletes nothing: returns True when the previous outputs are to be replaced (overwrite_output_dir), which
    `build` does only once the data and the models have loaded. An output_dir that cannot be written (under a file,
    read-only) is refused here, before any model loads.
    """
    out = cfg.output_dir
    _check_writable(out)
    if not os.path.isdir(out) or not os.listdir(out):
        return False
    ckpt_root = os.path.join(out, "checkpoints")
    latest = checkpoint.find_latest(ckpt_root)
    fix = "choose a new output_dir, or set overwrite_output_dir: true to replace it"
    if latest and cfg.checkpoint.resume_request.mode != "never":  # auto, or an explicit path into this output_dir
        saved = ((checkpoint.read_resume_json(latest) or {}).get("extra") or {}).get("run") or {}
        diffs = [f"{k}: {saved[k]!r} there, {v!r} now" for k, v in run_identity(cfg).items()
                 if k in saved and saved[k] != v]
        if not diffs:
            return False
        why = f"holds a checkpoint of a different run ({latest}: " + "; ".join(diffs) + ")"
        fix += ", or resume with the run's own settings"
    elif latest:
        why = f"holds checkpoints ({latest}) and checkpoint.resume is 'never'"
    else:
        present = sorted(n for n in os.listdir(out) if n in OUTPUT_NAMES) or sorted(os.listdir(out))[:5]
        why = (f"already holds files ({', '.join(present)}) and no complete checkpoint to resume: another run's "
               "outputs, or a run stopped before its first checkpoint (its checkpoint.every_steps)")
    if cfg.overwrite_output_dir:
        return True
    raise DistillError(f"output_dir: '{out}' {why} -> {fix}")


def _check_writable(out: str) -> None:
    """output_dir, or its nearest existing parent, must be a writable directory (checked before any model loads)."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise DistillError(f"output_dir: '{out}' cannot be created: '{probe}' is a file, not a directory -> choose "
                           "another output_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DistillError(f"output_dir: '{out}' cannot be written: '{probe}' is read-only for this user -> choose "
                           "another output_dir, or fix its permissions")


def remove_previous_outputs(out: str) -> None:
    """overwrite_output_dir, rank 0: delete what an earlier run wrote in `out` (OUTPUT_NAMES only)."""
    for name in OUTPUT_NAMES:
        p = os.path.join(out, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))


def run_identity(cfg: DistillConfig) -> dict:
    """What makes a checkpoint this run's: resuming it with other models, data, seed or batch layout would not
    continue the same run (stored in every checkpoint's resume state and compared by check_output_dir)."""
    def ab(p):
        return os.path.abspath(p) if p else None

    return {"student.path": ab(cfg.student.path), "teacher.path": ab(cfg.teacher.path),
            "teacher.cache": ab(cfg.teacher.cache), "data.train_files": [ab(f) for f in cfg.data.train_files],
            "data.format": cfg.data.format, "data.max_length": cfg.data.max_length, "train.seed": cfg.train.seed,
            "train.micro_batch_size": cfg.train.micro_batch_size, "train.grad_accum_steps": cfg.train.grad_accum_steps,
            "student.lora.rank": cfg.student.lora.rank}


def schedule_settings(cfg: DistillConfig) -> dict:
    """What sets the LR of every step (stored in each checkpoint: a resume with other values applies them)."""
    T = cfg.train
    return {"train.lr": T.lr, "train.warmup_steps": T.warmup_steps, "train.max_steps": T.max_steps,
            "train.min_lr_ratio": T.min_lr_ratio}


def apply_schedule_changes(cfg: DistillConfig, engine, state: checkpoint.ResumeState) -> list[str]:
    """DeepSpeed restores the checkpoint's LR scheduler, whose base LR is the old train.lr (warmup, max_steps and
    min_lr_ratio come from this run's schedule function). Apply this run's train.lr and say what changed."""
    saved = (state.extra or {}).get("schedule") or {}
    now = schedule_settings(cfg)
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    if not changed:
        return []
    sched = engine.lr_scheduler
    sched.base_lrs = [cfg.train.lr for _ in sched.base_lrs]
    factor = engines.lr_schedule(sched.last_epoch, warmup_steps=cfg.train.warmup_steps,
                                 max_steps=cfg.train.max_steps, min_lr_ratio=cfg.train.min_lr_ratio)
    for group in sched.optimizer.param_groups:
        group["lr"] = cfg.train.lr * factor
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    return [f"the LR schedule changed since the checkpoint, applied from step {state.step + 1}: "
            + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())]


def check_top_k(cfg: DistillConfig, vocab_size: int) -> None:
    """loss.top_k can only be checked once the vocabulary is known."""
    L = cfg.loss
    if L.impl == "topk" and L.alpha > 0 and L.top_k > vocab_size:
        raise ConfigError([f"loss.top_k: {L.top_k} is larger than the vocabulary ({vocab_size} tokens) -> use "
                           f"loss.top_k <= {vocab_size} (typically 32-256), or loss.impl: chunked (exact)"])


def compiled_loss(cfg: DistillConfig, loss_kwargs: dict, device: torch.device) -> tuple[bool, str]:
    """loss.compile resolved for this device: whether the chunked loss's slabs run compiled, and the start-up line
    saying which path runs. When they do, they are compiled here and compared with the eager path on a small input
    (losses.compiled_selfcheck), so a missing compiler stops the run now (exit 2), never mid-training."""
    from .losses import CompiledLossError, compile_choice, compiled_selfcheck

    L = cfg.loss
    on, why = compile_choice(L.compile, device.type)
    if on and (L.impl != "chunked" or L.alpha == 0):
        return False, (f"loss element-wise part: eager (loss.compile: {L.compile}; only the chunked KD loss is "
                       f"compiled, this run has loss.impl: {L.impl}, loss.alpha: {L.alpha})")
    if not on:
        return False, f"loss element-wise part: eager (loss.compile: {why})"
    start = time.perf_counter()
    try:
        diff = compiled_selfcheck(device, **loss_kwargs)
    except CompiledLossError as e:
        raise DistillError(f"loss.compile: {L.compile}: {e}") from e
    return True, (f"loss element-wise part: compiled with torch.compile (loss.compile: {why}; compiled and checked "
                  f"against the eager path in {time.perf_counter() - start:.1f} s, relative difference {diff:.1e})")


def resume_state(cfg: DistillConfig, student_engine, *, rank: int, world: int, overwrite: bool):
    """The checkpoint to continue from (checkpoint.resume; none when overwriting), loaded into the engine, with the
    notices to print (a fallback, set-aside later checkpoints, schedule changes). Returns (state, from, notices)."""
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    state = checkpoint.ResumeState()
    notices: list[str] = []
    resume_from = None if overwrite else checkpoint.select_resume(  # a fallback's notice is printed at once
        ckpt_root, cfg.checkpoint.resume_request, lambda m: rank == 0 and print(m, file=sys.stderr, flush=True))
    if resume_from:
        state = checkpoint.load(student_engine, resume_from, world)
        moved = checkpoint.set_aside_after(ckpt_root, resume_from) if rank == 0 else []
        engines.barrier()
        if moved:
            names = ", ".join(map(os.path.basename, moved))
            notices.append(f"continuing from {resume_from}: the later checkpoints of the abandoned branch were moved "
                           f"to {os.path.join(ckpt_root, checkpoint.SET_ASIDE)} ({names})")
        notices += apply_schedule_changes(cfg, student_engine, state)
    return state, resume_from, notices


def build_student(cfg: DistillConfig, *, rank: int, world: int, precision: str):
    """The student's training engine (models.StudentWithLoss under DeepSpeed ZeRO, LoRA when asked), loaded straight
    into ZeRO-3 shards at stage 3. Returns (engine, the HF model)."""
    T, dtype = cfg.train, engines.torch_dtype(precision)
    student_ds = engines.student_ds_config(
        micro_batch_size=T.micro_batch_size, grad_accum_steps=T.grad_accum_steps, world_size=world,
        zero_stage=T.zero_stage, precision=precision, lr=T.lr, betas=T.betas, weight_decay=T.weight_decay,
        grad_clip=T.grad_clip, offload_optimizer=T.offload_optimizer,
        optimizer=engines.resolve_optimizer(T.optimizer), hpz_partition_size=T.zero_hpz_partition_size,
        overrides=cfg.ds_config_overrides)
    torch.manual_seed(T.seed)
    student = engines.load_partitioned(lambda: models.load_causal_lm(
        cfg.student.path, dtype=dtype, trust_remote_code=cfg.student.trust_remote_code,
        allow_pickle=cfg.student.allow_pickle_weights), student_ds)
    if cfg.student.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    lcfg = cfg.student.lora
    if lcfg.rank > 0:  # adapters go on after loading (partitioned under ZeRO-3), before the engine (see lora.py)
        student = lora.apply_lora(student, rank=lcfg.rank, alpha=lcfg.alpha, dropout=lcfg.dropout,
                                  target_modules=lcfg.target_modules)
        n_train, n_all = lora.trainable_counts(student)
        if rank == 0:
            print(f"[ds_distill] LoRA r={lcfg.rank} on {lcfg.target_modules}: {n_train} trainable of {n_all} "
                  f"parameter elements ({100.0 * n_train / max(n_all, 1):.2f}%)", flush=True)
    wrapper = models.StudentWithLoss(student, engines.register_external_param)
    student_engine = engines.build_student_engine(wrapper, student_ds, warmup_steps=T.warmup_steps,
                                                  max_steps=T.max_steps, min_lr_ratio=T.min_lr_ratio)
    # from_pretrained returns the model in eval mode: without train(), activation checkpointing (which HF applies
    # only in training mode) and dropout (LoRA's included) would silently be off
    student_engine.train()
    if rank == 0:
        print(f"[ds_distill] optimizer: {engines.describe_optimizer(student_engine)} (train.optimizer: "
              f"{T.optimizer})", flush=True)
    held, total = engines.partition_counts(student_engine.module)
    print(f"[ds_distill] rank {rank}/{world}: student ZeRO-{T.zero_stage} holds {held} of {total} parameter "
          f"elements ({100.0 * held / max(total, 1):.1f}%)", flush=True)

    return student_engine, student


def checked_teacher_without_model(cfg: DistillConfig, rank: int, tokenizer, train_ds):
    """The teacher source that needs no model on the training ranks (teacher.cache: an offline top-k cache;
    teacher.server_url: a served teacher), checked against this run's tokenizer and data; None otherwise."""
    if cfg.loss.alpha == 0:
        return teachers.NoTeacher()
    if cfg.teacher.cache:
        topk_cache = teacher_cache.TopKCache(cfg.teacher.cache)
        topk_cache.verify(tokenizer_fp=teacher_cache.tokenizer_fingerprint(tokenizer),
                          data_fp=teacher_cache.data_fingerprint(train_ds), max_length=cfg.data.max_length,
                          top_k=cfg.loss.top_k, temperature=cfg.loss.temperature)
        return teachers.CachedTeacher(topk_cache)
    if cfg.teacher.server_url:
        served = served_teacher.build(cfg, rank)
        served.verify(tokenizer=tokenizer, tokenizer_fp=teacher_cache.tokenizer_fingerprint(tokenizer),
                      max_length=cfg.data.max_length, temperature=cfg.loss.temperature)
        return served
    return None


def teacher_model_source(cfg: DistillConfig, *, rank: int, world: int, precision: str) -> teachers.TeacherSource:
    """The teacher model's source: on its own ranks (teacher.placement: separate: its head arrives from there), or
    on these ranks as a ZeRO-3 inference engine with its own DeepSpeed config or a replica (teacher.sharding)."""
    if cfg.teacher.placement == "separate":
        return teacher_apart.connect_student(cfg, rank)
    if not cfg.teacher.path:
        return teachers.NoTeacher()
    # one decision for all ranks (GPUs of different sizes must not give ranks different teacher layouts)
    dtype = engines.torch_dtype(precision)
    sharding = engines.broadcast_object(assembly.teacher_sharding(cfg, dtype) if rank == 0 else None)
    if rank == 0:
        print(f"[ds_distill] teacher: {sharding} (teacher.sharding: {cfg.teacher.sharding})", flush=True)
    engine, rows = assembly.teacher_engine(cfg, sharding=sharding, world=world, precision=precision,
                                           micro_batch_size=cfg.train.micro_batch_size)
    return teachers.EngineTeacher(engine, sharding, rows)


def build(cfg: DistillConfig) -> Run:
    """The training recipe's assembly: process group, checks, data, engines, teacher source, resume state."""
    rank, world = assembly.start(cfg)
    overwrite = check_output_dir(cfg, rank)  # nothing is deleted before the data and models are checked
    precision = engines.resolve_precision(cfg.train.precision)
    if rank == 0:
        print(f"[ds_distill] {engines.describe_device(precision)} (train.device: {cfg.train.device}, "
              f"train.precision: {cfg.train.precision})", flush=True)
    dtype = engines.torch_dtype(precision)
    T = cfg.train

    # --- models and tokenizers: checked before anything is loaded
    assembly.check_model_dirs(cfg)
    tokenizer = assembly.checked_tokenizer(cfg)
    early_vocab = assembly.declared_vocab_size(cfg, tokenizer)
    if early_vocab is not None:
        check_top_k(cfg, early_vocab)  # checked again below with the loaded weights' real row counts

    # --- data: each rank its own shard
    train_ds, eval_ds = assembly.datasets(cfg, tokenizer)
    if len(train_ds) < world:  # every rank raises it (the stream would fail on some only)
        raise data.DataError(f"data.train_files: {len(train_ds)} usable training samples cannot feed {world} ranks "
                             "-> add data or use fewer ranks")

    # --- a teacher without a model here (offline cache, server): checked before any model loads
    source = checked_teacher_without_model(cfg, rank, tokenizer, train_ds)
    student_engine, student = build_student(cfg, rank=rank, world=world, precision=precision)
    if source is None:  # the teacher model: on these ranks (ZeRO-3 / replica), on its own ranks, or none
        source = teacher_model_source(cfg, rank=rank, world=world, precision=precision)
    vocab_size, vocab_message = vocab.reconcile_vocab(source.vocab_rows or models.vocab_rows(student),
                                                      models.vocab_rows(student), len(tokenizer))
    check_top_k(cfg, vocab_size)
    source.check_vocab_size(vocab_size)
    L = cfg.loss
    loss_spec = LossSpec(vocab_size=vocab_size, alpha=L.alpha, temperature=L.temperature, divergence=L.divergence,
                         beta=L.beta, skew_lambda=L.skew_lambda, impl=L.impl, chunk_size=L.chunk_size,
                         top_k=L.top_k, layout=L.layout, teacher_transform=source.transform)
    wrapper_s = student_engine.module
    wrapper_s.loss_spec = loss_spec
    vocab_message += (f"\nstudent head: {_model_type(student)} ({wrapper_s.transform.describe()}"
                      + (", bias" if wrapper_s.head.bias is not None else "") + ")"
                      + (f"; MoE router aux loss x {wrapper_s.aux_coef:g}" if wrapper_s.moe_aux is not None else ""))
    if source.describe():
        vocab_message += "\n" + source.describe()

    compiled, compile_message = compiled_loss(
        cfg, {**loss_spec.kwargs(), "student_transform": wrapper_s.transform}, engines.device())
    loss_spec = wrapper_s.loss_spec = dataclasses.replace(loss_spec, compiled=compiled)
    if rank == 0:
        print(f"[ds_distill] {compile_message}", flush=True)

    # --- the previous run's outputs go only now: every input has been checked and loaded
    if overwrite:
        if rank == 0:
            remove_previous_outputs(cfg.output_dir)
        engines.barrier()

    # --- resume
    state, resume_from, notices = resume_state(cfg, student_engine, rank=rank, world=world,
                                               overwrite=overwrite)
    stream = assembly.micro_batch_stream(cfg, train_ds, tokenizer, rank=rank, world=world,
                                         samples_consumed=state.samples_consumed)
    if state.data_state:
        stream.load_state_dict(state.data_state)  # same seed, rows and world size, or a DataError
    if isinstance(source, teacher_apart.ApartTeacher):  # the teacher ranks read the same rows from here on
        source.start(stream.state_dict(), state.step, max(0, T.max_steps - state.step) * T.grad_accum_steps,
                    T.grad_accum_steps)
    state.extra["run"] = run_identity(cfg)
    state.extra["schedule"] = schedule_settings(cfg)
    run = Run(cfg=cfg, rank=rank, world_size=world, tokenizer=tokenizer, student_engine=student_engine,
              teacher=source, stream=stream, eval_dataset=eval_ds, loss=loss_spec, state=state,
              ckpt_root=os.path.join(cfg.output_dir, "checkpoints"), precision=precision,
              vocab_message=vocab_message)
    run.on_policy = generation.build_on_policy(cfg, rank, tokenizer, student_engine, loss_spec.vocab_size,
                                               dtype, run.teacher_engine)
    if run.on_policy is not None:
        run.vocab_message += "\n" + generation.describe_on_policy(cfg)
    if resume_from:
        run.vocab_message += f"\nresumed from {resume_from} at step {state.step}"
    for m in notices:
        run.vocab_message += "\n" + m
    return run


def _model_type(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "model_type", "?")


def probe_heads(run: Run, mb: dict) -> dict:
    """Before the first step: the first PROBE_POSITIONS positions of the first sequence of `mb` through each model's
    own HF forward (`model(...).logits`, ZeRO-3 parameters gathered by the engines' hooks) and through the fused
    head (heads.py: lm_head, bias, the family's transform), compared. Collective (every rank probes its own batch,
    the worst difference is all-reduced), so every rank raises the same ModelError (exit 2) when a model's forward
    does something the head table does not know, naming the model, its type and the largest difference. Returns
    {"student": rel_diff, "teacher": rel_diff}."""
    cfg, eng, teacher = run.cfg, run.student_engine, run.teacher_engine
    dev = engines.device()
    ids = mb["input_ids"][:1, :PROBE_POSITIONS].to(dev)
    mask = mb["attention_mask"][:1, :PROBE_POSITIONS].to(dev)
    V = run.loss.vocab_size

    def rel_diff(own, fused):  # [B, S, V] each: the largest difference over the real vocabulary and trained tokens
        own, fused = own[..., :V].float(), fused[..., :V].float()
        keep = mask.bool()
        diff = (own - fused).abs()[keep].max()
        return torch.stack([diff / own.abs()[keep].max().clamp_min(1e-6), diff])

    out = {}
    was_training = eng.training
    eng.eval()  # no dropout: the probe must neither change nor consume any RNG
    try:
        with torch.no_grad():
            own, fused = eng(ids, mask, probe=True)
            diffs = [rel_diff(own, fused)]
            if teacher is not None:
                own_t, hidden_t = teacher(ids, mask, probe=True)
                head = teacher.module.head
                with engines.gathered(head.params()):
                    diffs.append(rel_diff(own_t, head.logits(hidden_t)))
    finally:
        eng.train(was_training)
        for engine in (eng, teacher):
            if engine is not None:
                engines.forget_forward_trace(engine)
    worst = engines.all_reduce_max(torch.stack(diffs).double())  # [models, 2]
    tol = PROBE_TOLERANCE[run.precision]
    named = [("student", cfg.student.path, eng.module.model, eng.module.head)] + (
        [("teacher", cfg.teacher.path, teacher.module.model, teacher.module.head)] if teacher is not None else [])
    for (role, path, model, head), (rel, absolute) in zip(named, worst.tolist()):
        out[role] = rel
        if not rel <= tol:  # also catches NaN
            err = ModelError(
                f"{role}.path '{path}' (model_type '{_model_type(model)}'): the model's own forward gives other "
                f"logits than the fused head (lm_head{', bias' if head.bias is not None else ''}, transform "
                f"{head.transform.describe()}): largest difference {absolute:.4g} = "
                f"{rel:.3g} of the largest logit (tolerance {tol:g}) -> its forward does something ds_distill's "
                "head table (ds_distill/heads.py FAMILIES) does not know (a trust_remote_code or patched model, a "
                "new family): add its logit transform there (README: 'Model families'), or use a supported model")
            err.shared = True  # decided by one all-reduce: every rank raises it
            raise err
    return out


def host_prepare(mb: dict, vocab_size: int) -> tuple[dict, int, int]:
    """Host side of a micro-batch, before it is copied to the device: everything that reads values (not only
    shapes) is done here, where reading a tensor costs no device synchronisation.

    Returns (the micro-batch with `keep` [n]: flat indices of the trained positions of labels[:, 1:], what the loss
    reads; trained tokens n; attended tokens). Checks the labels against the vocabulary, which the loss then does
    not re-check on the device (the teacher source checks its own host data: teachers.py).
    """
    targets = mb["labels"][:, 1:].reshape(-1)  # [B*(S-1)]
    keep = (targets != models.IGNORE_INDEX).nonzero().squeeze(1)
    lab = targets.index_select(0, keep)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab_size):
        raise data.DataError(f"data: label ids in [{int(lab.min())}, {int(lab.max())}] outside the vocabulary of "
                             f"{vocab_size} tokens (sample ids {mb['sample_ids'].tolist()}) -> the tokenizer and "
                             "the models disagree: check tokenizer_path")
    return {**mb, "keep": keep}, int(keep.numel()), int(mb["attention_mask"].sum())


def token_slots(mb: dict) -> int:
    """Token positions the models compute for a micro-batch (real tokens + padding): data/fill's denominator."""
    return mb["input_ids"].numel()


def _to_device(mb: dict, dev: torch.device) -> dict:
    """Copy a micro-batch to `dev`: from pinned host memory on accelerators (an asynchronous DMA; a pageable copy
    makes the host wait for it)."""
    if dev.type == "cpu":
        return dict(mb)
    return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in mb.items()}


def train_step(run: Run, micro_batches: list[dict], before_step=None,
               guard: Optional[guards.StepGuard] = None) -> StepSums:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the step's global sums (host floats).

    `before_step(local_sums)` runs after the last backward and before the optimizer step, on every rank: the
    gradients of the whole step are then complete (read them with `engines.full_grad`), and the weights untouched.

    Host synchronisations: one in `guard.check` (its flags decide before the last backward) and one at the end
    (the step's sums and this rank's peak memory, all-reduced together). The token counts are known on the host
    before any copy; the normaliser stays a device tensor. tests/test_gpu_readiness.py counts them.
    """
    eng = run.student_engine
    dev = engines.device()
    gen_stats = None
    if run.on_policy is not None:  # the sampled completions in place of the chosen micro-batches (generation.py)
        micro_batches, gen_stats = run.on_policy.prepare(micro_batches, run.state.step + 1)
    payloads = run.teacher.host_side(micro_batches, run.loss.vocab_size)  # the teacher's host work (teachers.py)
    prepared = [host_prepare(mb, run.loss.vocab_size) for mb in micro_batches]
    micro_batches = [p[0] for p in prepared]
    # Global number of trained tokens of this step, known before any forward: the single normaliser.
    local_tokens, local_seq_tokens = sum(p[1] for p in prepared), sum(p[2] for p in prepared)
    local_slots = sum(token_slots(mb) for mb in micro_batches)
    counts = engines.all_reduce_sum(_to_device({"n": torch.tensor([local_tokens, local_seq_tokens, local_slots],
                                                                  dtype=torch.float64)}, dev)["n"])
    scale = run.world_size / counts[0].clamp(min=1.0)  # x world: DeepSpeed averages gradients over ranks

    sums = torch.zeros(StepSums.width(), dtype=torch.float64, device=dev)
    # an MoE student's router aux loss is a per-forward mean (as in its HF forward): each micro-batch's gets weight
    # coef / (micro-batches x ranks) in the step's objective; DeepSpeed's average over ranks supplies the 1 / ranks
    aux_weight = eng.module.aux_coef / len(micro_batches)
    for mb, payload in zip(micro_batches, payloads):
        mb = _to_device(mb, dev)
        # packed rows: no attention_mask for the models, positions restart per sample (data.collate_packed)
        mb["model_mask"] = mb["attention_mask"] if mb.get("position_ids") is None else None
        with run.teacher.side(mb, payload, dev) as teacher_kwargs:
            total, ce, kd, tokens, metrics, aux = eng(
                mb["input_ids"], mb["model_mask"], mb["labels"], keep=mb["keep"],
                position_ids=mb.get("position_ids"), token_mask=mb["attention_mask"], **teacher_kwargs)
        one = torch.ones((), dtype=total.dtype, device=dev)
        sums += torch.cat([torch.stack([total.detach(), ce, kd, tokens, aux.detach().to(total.dtype), one]).double(),
                           metrics.double()])
        loss = total * scale
        if aux_weight:
            loss = loss + aux * aux_weight
        if guard is not None and eng.is_gradient_accumulation_boundary():
            loss = guard.check(sums, loss)  # collective: a non-finite loss on any rank, SIGTERM (guards.py)
        eng.backward(loss, scale_wrt_gas=False)
        if before_step is not None and eng.is_gradient_accumulation_boundary():
            before_step(sums)
        eng.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
    # this rank's peak memory in its own slot: the sum over ranks gathers them, max taken on the host
    peaks = torch.zeros(run.world_size, dtype=torch.float64, device=dev)
    peaks[run.rank] = engines.local_peak_memory_gb()
    gen = torch.tensor(gen_stats or [], dtype=torch.float64, device=dev)  # on-policy counts (generation.STAT_KEYS)
    reduced = engines.all_reduce_sum(torch.cat([sums, peaks, gen]))
    host = torch.cat([reduced, counts]).tolist()  # host sync: once per step (counts are global already)
    w = StepSums.width()
    at = w + run.world_size
    extra = generation.step_stats(dict(zip(generation.STAT_KEYS, host[at:at + len(gen_stats)])), run.world_size) \
        if gen_stats is not None else {}
    return StepSums.from_vector(host, peak_memory_gb=max(host[w:at]), global_tokens=host[-3],
                                global_seq_tokens=host[-2], global_slots=host[-1], aux_coef=eng.module.aux_coef,
                                extra=extra)


def step_metrics(sums: StepSums, *, lr: float, grad_norm: Optional[float], seconds: float) -> dict:
    """Logged row: token means of the step's global sums (the values the gradient came from); for an MoE student
    also `loss/aux`, the mean over micro-batches (all ranks) of its router aux loss, and `loss/total` includes
    coef * loss/aux."""
    n = max(sums.tokens, 1.0)
    total = sums.total / n
    aux = None
    if sums.aux_coef:
        aux = sums.aux / max(sums.micro_batches, 1.0)
        total += sums.aux_coef * aux
    row = {"loss/total": total, "loss/ce": sums.ce / n, "loss/kl": sums.kd / n, "lr": lr,
           "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
           "tokens_per_sec": sums.global_seq_tokens / max(seconds, 1e-9), "tokens": sums.tokens,
           # real (non-padding) tokens per computed token slot, teacher and student alike
           "data/fill": sums.global_seq_tokens / max(sums.global_slots, 1.0),
           "mem/peak_gb": sums.peak_memory_gb}
    row.update({f"kd/{k}": v / n for k, v in sums.health.items()})
    if aux is not None:
        row["loss/aux"] = aux
    row.update(sums.extra)
    return row


def save_checkpoint(run: Run, rng: Optional[dict] = None) -> str:
    """Collective: checkpoint of run.state.step with the stream's position (and `rng`, default: the RNG now)."""
    run.state.data_state = run.stream.state_dict()
    run.state.samples_consumed = run.state.data_state["samples_consumed"]
    return checkpoint.save(run.student_engine, run.ckpt_root, run.state, run.cfg.checkpoint.keep_last, rng=rng,
                           before_complete=faults.in_checkpoint)


def save_abandoning_step(run: Run, pos_before: int, rng_before: dict) -> str:
    """Collective: checkpoint of the last completed step when the current one is abandoned: the stream rewound to
    its position before this step's micro-batches, the RNG as it was then."""
    run.stream.samples_consumed = pos_before
    return save_checkpoint(run, rng=rng_before)


def export(run: Run) -> str:
    """Gather the student from ZeRO shards and write output_dir/final as a plain HF model (rank 0).

    Written into final.partial, then renamed: `final` is either the previous export or the whole new one, never a
    directory without weights. A full disk becomes a DistillError (exit 2) naming the directory.
    """
    out = os.path.join(run.cfg.output_dir, "final")
    sd = engines.consolidated_state_dict(run.student_engine)  # collective
    if run.rank == 0:
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        hf_model = run.student_engine.module.hf_model
        adapter_dir = os.path.join(run.cfg.output_dir, "final_adapter") if run.cfg.student.lora.save_adapter \
            and lora.is_peft_model(hf_model) else None
        staged = [(out + ".partial", out)] + ([(adapter_dir + ".partial", adapter_dir)] if adapter_dir else [])
        try:
            for tmp, _ in staged:
                shutil.rmtree(tmp, ignore_errors=True)
            if lora.is_peft_model(hf_model):  # merge the adapters into a plain HF model (+ the adapter alone)
                lora.save_merged(hf_model, sd, staged[0][0], adapter_dir and staged[1][0],
                                 lambda m, msd, d: models.save_hf_export(m, msd, d, run.tokenizer, to_dict(run.cfg)))
            else:
                models.save_hf_export(hf_model, sd, staged[0][0], run.tokenizer, to_dict(run.cfg))
            for tmp, final in staged:
                _replace_dir(tmp, final)
        except Exception as e:  # noqa: BLE001 -- any write failure: remove the partial copy, say why
            for tmp, _ in staged:
                shutil.rmtree(tmp, ignore_errors=True)
            if not _is_disk_full(e):
                raise
            raise DistillError(f"output_dir: cannot write the final export {out} ({_first_line(e)}) -> free space on "
                               f"the disk of output_dir and run the same command again: it resumes from the complete "
                               f"checkpoint of step {run.state.step} and only exports") from None
    engines.barrier()
    return out


def _is_disk_full(e: BaseException) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        m in str(e) for m in ("No space left", "Disk quota exceeded", "os error 28"))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _replace_dir(new: str, dest: str) -> None:
    """Move directory `new` to `dest`, replacing what is there (the old one goes only once the new one is in)."""
    old = dest + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def run_eval(run: Run) -> Optional[dict]:
    """Held-out student (and teacher) metrics on data.eval_files, token-weighted over all ranks (collective).

    The student runs through its engine (`hidden_only`), so ZeRO-3 gathers its layers as in training; the heads
    (lm_head, bias, the family's transform) are gathered per batch inside evaluate. The teacher's hidden states are
    cached after the first call (eval.cache_teacher). Returns None without eval files.
    """
    if run.eval_dataset is None:
        return None
    cfg, eng, teacher = run.cfg, run.student_engine, run.teacher_engine
    batches = data.eval_batches(run.eval_dataset, rank=run.rank, world_size=run.world_size,
                                micro_batch_size=cfg.eval.micro_batch_size or cfg.train.micro_batch_size,
                                pad_token_id=run.tokenizer.pad_token_id)
    if cfg.eval.max_batches:
        batches = itertools.islice(batches, cfg.eval.max_batches)  # the same first batches on every rank
    if teacher is not None and cfg.eval.cache_teacher and run.teacher_eval_cache is None:
        run.teacher_eval_cache = evaluate.TeacherCache()
    was_training = eng.training
    eng.eval()
    try:
        return evaluate.evaluate(
            batches, student_hidden_fn=lambda ids, mask: eng(ids, mask, hidden_only=True),
            student_head=eng.module.head,
            teacher_hidden_fn=(lambda ids, mask: teacher(ids, mask)) if teacher is not None else None,
            teacher_head=teacher.module.head if teacher is not None else None,
            teacher_cache=run.teacher_eval_cache, vocab_size=run.loss.vocab_size,
            chunk_size=cfg.loss.chunk_size, device=engines.device(), gather=engines.gathered,
            all_reduce=engines.all_reduce_sum)
    finally:
        eng.train(was_training)


def eval_and_log(run: Run, tracker: Tracker) -> Optional[dict]:
    """run_eval, then one metrics.jsonl / W&B row {"step": s, "eval/...": ...} and a console line."""
    t0 = time.time()
    m = run_eval(run)
    if m is None:
        return None
    tracker.log(run.state.step, {f"eval/{k}": v for k, v in m.items()})
    line = f"eval @ step {run.state.step}: student ppl {m['student_ppl']:.3f}"
    if "teacher_ppl" in m:
        line += f", teacher ppl {m['teacher_ppl']:.3f}, KL {m['kl']:.4f}, top-1 agree {m['agree']:.1%}"
    tracker.message(line + f" ({m['tokens']:.0f} tokens, {time.time() - t0:.1f} s)")
    return m


def write_generations(run: Run) -> Optional[str]:
    """Rank 0: output_dir/generations.md, teacher / student before / student after side by side (plain HF models
    loaded one at a time from teacher.path, student.path and output_dir/final). Other ranks wait at a barrier."""
    cfg, E = run.cfg, run.cfg.eval
    path = os.path.join(cfg.output_dir, "generations.md")
    if E.generations <= 0 or (E.prompts_file is None and run.eval_dataset is None):
        return None
    if run.rank == 0:
        if E.prompts_file:
            prompts = evaluate.prompts_from_file(E.prompts_file, run.tokenizer, cfg.data.format)[:E.generations]
        else:
            prompts = evaluate.prompts_from_dataset(run.eval_dataset, E.generations)
        names = ([("teacher", cfg.teacher.path)] if cfg.teacher.path else []) + [
            ("student before", cfg.student.path), ("student after", os.path.join(cfg.output_dir, "final"))]
        rows = evaluate.side_by_side(names, prompts, run.tokenizer, temperatures=E.temperatures, seed=E.seed,
                                     max_new_tokens=E.max_new_tokens, device=engines.device(),
                                     dtype=engines.torch_dtype(run.precision))
        evaluate.write_generations_md(rows, path, title=f"Generations: {os.path.basename(cfg.output_dir)}")
    engines.barrier()
    return path


TASK_MODEL_NAMES = {"teacher": "teacher", "student_before": "student before", "student_after": "student after"}


def run_task_evals(run: Run, tracker: Tracker) -> Optional[dict]:
    """eval.tasks at the end of training: rank 0 evaluates the models of eval.tasks.models (plain HF models, one
    at a time, the export as 'student after'), writes output_dir/tasks/ (tasks.json, per-sample records) and logs
    one metrics.jsonl / W&B row 'tasks/<model>/<task>/<metric>' at the last step (also the W&B summary). The other
    ranks wait at a barrier. Returns {model: results} on rank 0, None elsewhere or when nothing is configured."""
    cfg, T = run.cfg, run.cfg.eval.tasks
    if not tasks.wanted(T):
        return None
    results = None
    if run.rank == 0:
        paths = {"teacher": cfg.teacher.path, "student_before": cfg.student.path,
                 "student_after": os.path.join(cfg.output_dir, "final")}
        out_dir = os.path.join(cfg.output_dir, "tasks")
        os.makedirs(out_dir, exist_ok=True)
        results = tasks.evaluate_models([(TASK_MODEL_NAMES[m], paths[m]) for m in T.models], T, out_dir=out_dir,
                                        device=engines.device(),
                                        dtype=engines.torch_dtype(run.precision),
                                        tokenizer_path=cfg.tokenizer_path, log=tracker.message)
        with open(os.path.join(out_dir, "tasks.json"), "w") as f:
            json.dump({"results": results, "options": dataclasses.asdict(T)}, f, indent=1)
        row = {f"tasks/{name}/{k}": v for name, col in results.items() for k, v in tasks.flat_metrics(col).items()}
        tracker.log(run.state.step, row)
        tracker.summary(row)
        tracker.message("task accuracy:\n" + tasks.markdown_table(results))
    engines.barrier()
    return results


def train(run: Run, tracker: Tracker, watchdog: Optional[guards.Watchdog] = None) -> dict:
    """The loop: fetch micro-batches, step, log, checkpoint; returns the last logged row.

    Every step: `guard.check` (inside train_step) all-reduces the non-finite and SIGTERM flags once, so all ranks take
    the same decision; a non-finite step is discarded by DeepSpeed before the optimizer touches the weights, then
    aborts (saving the last good step) or is skipped (train.nonfinite); SIGTERM saves a checkpoint and raises
    guards.Preempted after the step.
    """
    cfg, eng = run.cfg, run.student_engine
    guard = guards.StepGuard(rank=run.rank, world_size=run.world_size, nonfinite=cfg.train.nonfinite,
                             max_skipped_steps=cfg.train.max_skipped_steps,
                             deepspeed_discards_nonfinite=hasattr(eng.optimizer, "overflow"),
                             device=engines.device(), all_reduce_sum=engines.all_reduce_sum,
                             skipped_steps=run.state.skipped_steps, watchdog=watchdog)
    guards.validate_mode(cfg.train.nonfinite, guard.discards, cfg.train.zero_stage, run.precision)
    nan_hook = faults.nan_hook(lambda: guard.step, run.rank)
    hook_handle = eng.module.register_forward_hook(nan_hook) if nan_hook else None
    if run.vocab_message:
        tracker.message(run.vocab_message)
    last: dict = {}
    first = None  # (data position, RNG, micro-batches) of this process's first step, fetched for the probe
    if run.state.step < cfg.train.max_steps:
        pos0, rng0 = run.stream.samples_consumed, checkpoint.rng_state()
        first = (pos0, rng0, [next(run.stream) for _ in range(cfg.train.grad_accum_steps)])
        # once per process, before any eval or step (also after a resume): exit 2 when a head is not the model's
        diffs = probe_heads(run, first[2][0])
        tracker.message("head probe: the fused heads reproduce the models' own forwards (largest difference "
                        + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()) + " of the largest logit)")
    if run.state.step == 0:
        eval_and_log(run, tracker)  # the student before training: the report's "before" column
    while run.state.step < cfg.train.max_steps:
        t0 = time.time()
        lr = eng.get_lr()[0]  # the LR this step's update uses (the scheduler advances inside the step)
        step = run.state.step + 1
        guard.begin(step)
        faults.at_step_start(step, run.rank)
        # data position and RNG before this step: what an abort's checkpoint of the last good step must hold
        if first is not None:
            (pos_before, rng_before, micro_batches), first = first, None
        else:
            pos_before, rng_before = run.stream.samples_consumed, checkpoint.rng_state()
            micro_batches = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]
        try:
            sums = train_step(run, micro_batches, guard=guard, before_step=None if guard.discards else
                              lambda _: guard.check_grads(eng.module.parameters()))
        except served_teacher.TeacherUnavailable as e:  # raised on every rank before any forward of this step:
            path = save_abandoning_step(run, pos_before, rng_before)  # the weights are the last step's; keep them
            raise served_teacher.TeacherUnavailable(f"{e}. The last completed step {run.state.step} is saved in "
                                                    f"{path}") from None
        try:
            skipped = guard.after_step(eng.was_step_applied(), fp16=eng.fp16_enabled())
        except NonFiniteError as e:  # the weights are still those of step - 1: checkpoint them, then stop
            path = save_abandoning_step(run, pos_before, rng_before)
            raise NonFiniteError(f"{e}. The weights of the last good step {run.state.step} are saved in {path}") \
                from None
        run.state.step = step
        if skipped:
            run.state.skipped_steps = guard.skipped_steps
            tracker.message(guard.skip_message())
        else:
            run.state.tokens_seen += int(sums.tokens)
            grad_norm = eng.get_global_grad_norm()
            last = step_metrics(sums, lr=lr, grad_norm=grad_norm, seconds=time.time() - t0)
            if run.state.step % cfg.train.log_every == 0 or run.state.step == cfg.train.max_steps:
                tracker.log(run.state.step, last)
        every = cfg.checkpoint.every_steps
        if every and run.state.step % every == 0 and run.state.step < cfg.train.max_steps:
            save_checkpoint(run)
        every = cfg.eval.every_steps
        if every and run.state.step % every == 0 and run.state.step < cfg.train.max_steps:
            eval_and_log(run, tracker)
        if guard.stop_requested and run.state.step < cfg.train.max_steps:  # SIGTERM on some rank: all stop here
            raise guards.Preempted(run.state.step, save_checkpoint(run))
        faults.after_step(step, run.rank)
    if hook_handle is not None:
        hook_handle.remove()
    save_checkpoint(run)
    eval_and_log(run, tracker)  # the final held-out numbers (after the checkpoint: an eval failure loses nothing)
    return last


def main(cfg: DistillConfig) -> int:
    """Build, train, export, always finishing the tracker and the process group. Returns the exit code."""
    tracker = None
    watchdog: Optional[guards.Watchdog] = None
    restore_sigterm = None
    stop_watch = None
    code = 1
    try:
        # teacher.placement: separate: the teacher ranks run teacher_apart.serve instead of training
        if cfg.teacher.placement == "separate" and teacher_apart.start(cfg) == "teacher":
            code = teacher_apart.serve(cfg, PROBE_POSITIONS,
                                       PROBE_TOLERANCE[engines.resolve_precision(cfg.train.precision)])
            return code
        run = build(cfg)
        run.state.wandb_run_id = run.state.wandb_run_id or None
        tracker = Tracker(output_dir=cfg.output_dir, is_rank0=run.rank == 0, total_steps=cfg.train.max_steps,
                          start_step=run.state.step, wandb_mode=cfg.wandb.mode, wandb_project=cfg.wandb.project,
                          wandb_run_name=cfg.wandb.run_name, wandb_entity=cfg.wandb.entity,
                          wandb_run_id=run.state.wandb_run_id, config=to_dict(cfg))
        run.state.wandb_run_id = tracker.run_id
        restore_sigterm = guards.install_sigterm_handler()  # from here SIGTERM = checkpoint at the next step, exit
        stop_watch = guards.watch_launcher()  # the launcher ending (killed, SIGTERM'd) counts as a SIGTERM
        watchdog = guards.Watchdog(cfg.train.watchdog_timeout_s, run.rank).start()
        last = train(run, tracker, watchdog)
        watchdog.beat("export")
        path = export(run)
        watchdog.stop()
        trained = (f"loss {last['loss/total']:.4f}" if "loss/total" in last else
                   "no step left to train (the checkpoint was already at train.max_steps)")
        tracker.message(f"done: step {run.state.step}, {trained}; model exported to {path}")
        gen_path = write_generations(run)
        task_results = run_task_evals(run, tracker)
        if run.rank == 0:  # report.md + plots from metrics.jsonl (all steps, including before a resume)
            notes = ["generations side by side: [generations.md](generations.md)"] if gen_path else None
            report.write_report(cfg.output_dir, report.read_rows(tracker.metrics_path), notes=notes,
                                task_results=task_results,
                                task_note=tasks.describe(cfg.eval.tasks) if task_results else "",
                                title=f"ds_distill run report: {os.path.basename(os.path.abspath(cfg.output_dir))}")
            tracker.message(f"report: {os.path.join(cfg.output_dir, 'report.md')}")
        code = 0
    except guards.Preempted as e:
        if tracker is not None:
            tracker.message(f"[ds_distill] {e}")
        code = guards.EXIT_PREEMPTED
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DistillError(f"output_dir: the disk of '{cfg.output_dir}' is full ({e}) -> free space or point "
                               "output_dir elsewhere; the latest complete checkpoint is intact") from None
        raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        if stop_watch is not None:
            stop_watch()
        if restore_sigterm is not None:
            restore_sigterm()
        if tracker is not None:
            tracker.finish(exit_code=code)
    return code
