"""The distillation loop: build everything from a DistillConfig, train, checkpoint, export.

One `train_step` for every world size and accumulation setting. The loss of a step is normalised by the number of
trained tokens of the WHOLE step (all micro-batches of all ranks), counted before the first forward; DeepSpeed's
own averaging over data-parallel ranks is compensated by multiplying by the world size, and its division by the
accumulation steps is switched off (`scale_wrt_gas=False`). The gradient is therefore exactly the gradient of the
global token mean, and the logged CE / KL / total are the same global token-weighted values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from typing import Optional

import torch

from . import checkpoint, data, engines, models, vocab
from .config import DistillConfig, to_dict, validate
from .errors import DistillError, NonFiniteError
from .tracking import Tracker

# Order of the per-step sums all-reduced once per step.
SUM_KEYS = ("total", "ce", "kd", "tokens") + tuple(f"kd/{k}" for k in models.StudentWithLoss.METRIC_KEYS)


@dataclasses.dataclass
class Run:
    """Everything built for a run (what `train` needs), so tests and tools can build once and inspect."""
    cfg: DistillConfig
    rank: int
    world_size: int
    tokenizer: object
    student_engine: object
    teacher_engine: Optional[object]
    stream: data.MicroBatchStream
    eval_dataset: Optional[object]
    loss_kwargs: dict
    state: checkpoint.ResumeState
    ckpt_root: str
    vocab_message: str = ""


def check_output_dir(cfg: DistillConfig, rank: int) -> None:
    """Refuse to start a fresh run over a different run's outputs, unless resuming or told to overwrite."""
    out = cfg.output_dir
    if not os.path.isdir(out) or not os.listdir(out):
        return
    has_ckpt = checkpoint.find_latest(os.path.join(out, "checkpoints")) is not None
    if cfg.checkpoint.resume == "auto" and has_ckpt:
        return
    if cfg.checkpoint.resume not in ("auto", "never"):
        return
    if cfg.overwrite_output_dir:
        if rank == 0:
            for name in ("checkpoints", "metrics.jsonl", "final", "wandb", "report.md"):
                p = os.path.join(out, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
        engines.barrier()
        return
    raise DistillError(f"output_dir: '{out}' already holds files of another run and has no checkpoint to resume "
                       f"-> choose a new output_dir, or set overwrite_output_dir: true to replace it")


def build(cfg: DistillConfig) -> Run:
    rank, world, _ = engines.init_distributed(cfg.train.watchdog_timeout_s or 1800.0)
    validate(cfg, world)
    check_output_dir(cfg, rank)
    precision = engines.resolve_precision(cfg.train.precision)
    dtype = engines.torch_dtype(precision)
    T = cfg.train

    # --- models and tokenizers: checked before anything is loaded
    models.check_model_dir(cfg.student.path, "student.path", cfg.student.allow_pickle_weights)
    if cfg.teacher.path:
        models.check_model_dir(cfg.teacher.path, "teacher.path", cfg.teacher.allow_pickle_weights)
    tokenizer = models.load_tokenizer(cfg.resolved_tokenizer_path, cfg.teacher.trust_remote_code
                                      or cfg.student.trust_remote_code)
    if cfg.teacher.path:
        vocab.check_tokenizers_compatible(models.load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code),
                                          models.load_tokenizer(cfg.student.path, cfg.student.trust_remote_code))

    # --- data: each rank its own shard
    train_ds = data.build_dataset(cfg.data.train_files, cfg.data.format, tokenizer, cfg.data.max_length,
                                  cfg.data.text_field)
    eval_ds = (data.build_dataset(cfg.data.eval_files, cfg.data.format, tokenizer, cfg.data.max_length,
                                  cfg.data.text_field) if cfg.data.eval_files else None)

    # --- student engine (loaded straight into ZeRO-3 shards at stage 3)
    student_ds = engines.student_ds_config(
        micro_batch_size=T.micro_batch_size, grad_accum_steps=T.grad_accum_steps, world_size=world,
        zero_stage=T.zero_stage, precision=precision, lr=T.lr, betas=T.betas, weight_decay=T.weight_decay,
        grad_clip=T.grad_clip, warmup_steps=T.warmup_steps, max_steps=T.max_steps, min_lr_ratio=T.min_lr_ratio,
        offload_optimizer=T.offload_optimizer, overrides=cfg.ds_config_overrides)
    torch.manual_seed(T.seed)
    student = engines.load_partitioned(lambda: models.load_causal_lm(
        cfg.student.path, dtype=dtype, trust_remote_code=cfg.student.trust_remote_code,
        allow_pickle=cfg.student.allow_pickle_weights), student_ds)
    if cfg.student.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    wrapper = models.StudentWithLoss(student, engines.register_external_param)
    student_engine = engines.build_student_engine(wrapper, student_ds)
    held, total = engines.partition_counts(student_engine.module)
    print(f"[ds_distill] rank {rank}/{world}: student ZeRO-{T.zero_stage} holds {held} of {total} parameter "
          f"elements ({100.0 * held / max(total, 1):.1f}%)", flush=True)

    # --- teacher: ZeRO-3 inference engine with its own DeepSpeed config
    teacher_engine = None
    teacher_rows = None
    if cfg.teacher.path and cfg.loss.alpha > 0:
        teacher_ds = engines.teacher_ds_config(cfg.teacher.ds_config, micro_batch_size=T.micro_batch_size,
                                               world_size=world, precision=precision,
                                               offload_params=cfg.teacher.offload_params)
        teacher = engines.load_partitioned(lambda: models.load_causal_lm(
            cfg.teacher.path, dtype=dtype, trust_remote_code=cfg.teacher.trust_remote_code,
            allow_pickle=cfg.teacher.allow_pickle_weights), teacher_ds)
        teacher_rows = models.vocab_rows(teacher)
        teacher_engine = engines.build_teacher_engine(models.TeacherHidden(teacher), teacher_ds)
    vocab_size, vocab_message = vocab.reconcile_vocab(teacher_rows or models.vocab_rows(student),
                                                      models.vocab_rows(student), len(tokenizer))

    L = cfg.loss
    loss_kwargs = dict(vocab_size=vocab_size, alpha=L.alpha, temperature=L.temperature, divergence=L.divergence,
                       beta=L.beta, skew_lambda=L.skew_lambda, impl=L.impl, chunk_size=L.chunk_size, top_k=L.top_k)

    # --- resume
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    state = checkpoint.ResumeState()
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        resume_from = checkpoint.find_latest(ckpt_root)
    elif cfg.checkpoint.resume != "never":
        resume_from = cfg.checkpoint.resume
    if resume_from:
        state = checkpoint.load(student_engine, resume_from)
    stream = data.MicroBatchStream(train_ds, rank=rank, world_size=world, micro_batch_size=T.micro_batch_size,
                                   seed=T.seed, pad_token_id=tokenizer.pad_token_id,
                                   samples_consumed=state.samples_consumed)
    run = Run(cfg=cfg, rank=rank, world_size=world, tokenizer=tokenizer, student_engine=student_engine,
              teacher_engine=teacher_engine, stream=stream, eval_dataset=eval_ds, loss_kwargs=loss_kwargs,
              state=state, ckpt_root=ckpt_root, vocab_message=vocab_message)
    if resume_from:
        run.vocab_message += f"\nresumed from {resume_from} at step {state.step}"
    return run


def _to_device(mb: dict, dev: torch.device) -> dict:
    return {k: v.to(dev, non_blocking=True) for k, v in mb.items()}


def train_step(run: Run, micro_batches: list[dict], before_step=None) -> dict:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the step's global sums (host floats).

    `before_step(local_sums)` runs after the last backward and before the optimizer step, on every rank: the
    gradients of the whole step are then complete (read them with `engines.full_grad`), and the weights untouched.
    """
    eng, teacher = run.student_engine, run.teacher_engine
    dev = engines.device()
    # Global number of trained tokens of this step, known before any forward: the single normaliser.
    local_tokens = sum(int((mb["labels"][:, 1:] != models.IGNORE_INDEX).sum()) for mb in micro_batches)
    local_seq_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    counts = engines.all_reduce_sum(torch.tensor([local_tokens, local_seq_tokens], dtype=torch.float64, device=dev))
    global_tokens, global_seq_tokens = counts.tolist()
    scale = run.world_size / max(global_tokens, 1.0)  # x world: DeepSpeed averages gradients over ranks

    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=dev)
    for mb in micro_batches:
        mb = _to_device(mb, dev)
        teacher_hidden, teacher_weight = None, None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden = teacher(mb["input_ids"], mb["attention_mask"])  # [B, S, Ht]
        with engines.gathered([teacher.module.lm_head_weight] if teacher is not None else []):
            if teacher is not None:
                teacher_weight = teacher.module.lm_head_weight
            total, ce, kd, tokens, metrics = eng(mb["input_ids"], mb["attention_mask"], mb["labels"],
                                                 run.loss_kwargs, teacher_hidden=teacher_hidden,
                                                 teacher_weight=teacher_weight)
        eng.backward(total * scale, scale_wrt_gas=False)
        sums += torch.cat([torch.stack([total.detach(), ce, kd, tokens]).double(), metrics.double()])
        if before_step is not None and eng.is_gradient_accumulation_boundary():
            before_step(sums)
        eng.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
    engines.all_reduce_sum(sums)
    out = dict(zip(SUM_KEYS, sums.tolist()))  # host sync: once per step
    out["global_tokens"] = global_tokens
    out["global_seq_tokens"] = global_seq_tokens
    return out


def step_metrics(sums: dict, *, lr: float, grad_norm: Optional[float], seconds: float) -> dict:
    """Logged row: token means of the step's global sums (the values the gradient came from)."""
    n = max(sums["tokens"], 1.0)
    row = {"loss/total": sums["total"] / n, "loss/ce": sums["ce"] / n, "loss/kl": sums["kd"] / n, "lr": lr,
           "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
           "tokens_per_sec": sums["global_seq_tokens"] / max(seconds, 1e-9), "tokens": sums["tokens"]}
    for k in models.StudentWithLoss.METRIC_KEYS:
        row[f"kd/{k}"] = sums[f"kd/{k}"] / n
    return row


def save_checkpoint(run: Run) -> str:
    run.state.samples_consumed = run.stream.state_dict()["samples_consumed"]
    return checkpoint.save(run.student_engine, run.ckpt_root, run.state, run.cfg.checkpoint.keep_last)


def export(run: Run) -> str:
    """Gather the student from ZeRO shards and write output_dir/final as a plain HF model (rank 0)."""
    out = os.path.join(run.cfg.output_dir, "final")
    sd = engines.consolidated_state_dict(run.student_engine)  # collective
    if run.rank == 0:
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        models.save_hf_export(run.student_engine.module.hf_model, sd, out, run.tokenizer, to_dict(run.cfg))
    engines.barrier()
    return out


def train(run: Run, tracker: Tracker) -> dict:
    """The loop: fetch micro-batches, step, log, checkpoint; returns the last logged row."""
    cfg, eng = run.cfg, run.student_engine
    if run.vocab_message:
        tracker.message(run.vocab_message)
    last: dict = {}
    while run.state.step < cfg.train.max_steps:
        t0 = time.time()
        micro_batches = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]
        sums = train_step(run, micro_batches)
        if not math.isfinite(sums["total"]):
            raise NonFiniteError(f"non-finite loss at step {run.state.step + 1} -> lower train.lr or check the data")
        run.state.step += 1
        run.state.tokens_seen += int(sums["tokens"])
        grad_norm = eng.get_global_grad_norm()
        last = step_metrics(sums, lr=eng.get_lr()[0], grad_norm=grad_norm, seconds=time.time() - t0)
        last["mem/peak_gb"] = engines.peak_memory_gb()  # collective (max over ranks)
        if run.state.step % cfg.train.log_every == 0 or run.state.step == cfg.train.max_steps:
            tracker.log(run.state.step, last)
        every = cfg.checkpoint.every_steps
        if every and run.state.step % every == 0 and run.state.step < cfg.train.max_steps:
            save_checkpoint(run)
    save_checkpoint(run)
    return last


def main(cfg: DistillConfig) -> int:
    """Build, train, export, always finishing the tracker and the process group. Returns the exit code."""
    tracker = None
    code = 1
    try:
        run = build(cfg)
        run.state.wandb_run_id = run.state.wandb_run_id or None
        tracker = Tracker(output_dir=cfg.output_dir, is_rank0=run.rank == 0, total_steps=cfg.train.max_steps,
                          start_step=run.state.step, wandb_mode=cfg.wandb.mode, wandb_project=cfg.wandb.project,
                          wandb_run_name=cfg.wandb.run_name, wandb_entity=cfg.wandb.entity,
                          wandb_run_id=run.state.wandb_run_id, config=to_dict(cfg))
        run.state.wandb_run_id = tracker.run_id
        last = train(run, tracker)
        path = export(run)
        tracker.message(f"done: step {run.state.step}, loss {last.get('loss/total', float('nan')):.4f}; "
                        f"model exported to {path}")
        code = 0
    finally:
        if tracker is not None:
            tracker.finish(exit_code=code)
    return code
