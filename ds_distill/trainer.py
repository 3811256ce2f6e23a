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
import math
import os
import shutil
import signal
import time
from typing import Optional

import torch

from . import checkpoint, data, engines, guards, lora, models, teacher_cache, vocab
from .config import DistillConfig, to_dict, validate
from .errors import ConfigError, DistillError, ModelError, NonFiniteError
from .tracking import Tracker
from . import evaluate, report

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
    teacher_eval_cache: Optional[evaluate.TeacherCache] = None  # filled by the first eval, reused after
    teacher_topk_cache: Optional[teacher_cache.TopKCache] = None  # teacher.cache: the offline teacher's top-k


def check_output_dir(cfg: DistillConfig, rank: int) -> None:
    """Refuse to start a fresh run over a different run's outputs, unless resuming or told to overwrite."""
    out = cfg.output_dir
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if cfg.checkpoint.resume not in ("auto", "never"):
        return  # an explicit checkpoint path: the user chose what to continue
    latest = checkpoint.find_latest(os.path.join(out, "checkpoints"))
    fix = "choose a new output_dir, or set overwrite_output_dir: true to replace it"
    if cfg.checkpoint.resume == "auto" and latest:
        saved = ((checkpoint.read_resume_json(latest) or {}).get("extra") or {}).get("run") or {}
        diffs = [f"{k}: {saved[k]!r} there, {v!r} now" for k, v in run_identity(cfg).items()
                 if k in saved and saved[k] != v]
        if not diffs:
            return
        why = f"holds a checkpoint of a different run ({latest}: " + "; ".join(diffs) + ")"
        fix += ", or resume with the run's own settings"
    elif latest:
        why = f"holds checkpoints ({latest}) and checkpoint.resume is 'never'"
    else:
        why = "already holds files of another run and has no checkpoint to resume"
    if cfg.overwrite_output_dir:
        if rank == 0:
            for name in ("checkpoints", "metrics.jsonl", "final", "final_adapter", "wandb", "report.md",
                         "report_data.json", "losses.png", "eval_ppl.png", "gap.png", "generations.md"):
                p = os.path.join(out, name)
                shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else (os.path.exists(p) and os.remove(p))
        engines.barrier()
        return
    raise DistillError(f"output_dir: '{out}' {why} -> {fix}")


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


def _declared_vocab_rows(path: str) -> Optional[int]:
    """lm_head rows a model directory's config.json declares (its text config's vocab_size), or None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError):
        return None
    v = c.get("text_config", c).get("vocab_size")
    return v if isinstance(v, int) else None


def check_top_k(cfg: DistillConfig, vocab_size: int) -> None:
    """loss.top_k can only be checked once the vocabulary is known."""
    L = cfg.loss
    if L.impl == "topk" and L.alpha > 0 and L.top_k > vocab_size:
        raise ConfigError([f"loss.top_k: {L.top_k} is larger than the vocabulary ({vocab_size} tokens) -> use "
                           f"loss.top_k <= {vocab_size} (typically 32-256), or loss.impl: chunked (exact)"])


def teacher_sharding(cfg: DistillConfig, dtype: torch.dtype) -> str:
    """teacher.sharding resolved: auto -> replicate or zero3 (planner.auto_teacher_sharding: from the teacher's size
    in config.json and this device's memory)."""
    if cfg.teacher.sharding != "auto":
        return cfg.teacher.sharding
    from . import planner

    memory = None if engines.on_cpu() else engines.device_memory_bytes()
    size = planner.read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code).params * dtype.itemsize if memory \
        else 0
    return planner.auto_teacher_sharding(size, memory, offload_params=cfg.teacher.offload_params)


def build(cfg: DistillConfig) -> Run:
    engines.check_device(cfg.train.device)  # before the process group: a silent CPU fallback would pick gloo
    rank, world, _ = engines.init_distributed(guards.process_group_timeout(cfg.train.watchdog_timeout_s))
    validate(cfg, world)
    check_output_dir(cfg, rank)
    precision = engines.resolve_precision(cfg.train.precision)
    if rank == 0:
        print(f"[ds_distill] {engines.describe_device(precision)} (train.device: {cfg.train.device}, "
              f"train.precision: {cfg.train.precision})", flush=True)
    dtype = engines.torch_dtype(precision)
    T = cfg.train

    # --- models and tokenizers: checked before anything is loaded
    models.check_model_dir(cfg.student.path, "student.path", cfg.student.allow_pickle_weights)
    if cfg.teacher.path:
        models.check_model_dir(cfg.teacher.path, "teacher.path", cfg.teacher.allow_pickle_weights)
    tokenizer = models.load_tokenizer(cfg.resolved_tokenizer_path, cfg.teacher.trust_remote_code
                                      or cfg.student.trust_remote_code)
    pair = f"teacher.path '{cfg.teacher.path}' / student.path '{cfg.student.path}'"
    if cfg.teacher.path:
        try:
            vocab.check_tokenizers_compatible(
                models.load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code),
                models.load_tokenizer(cfg.student.path, cfg.student.trust_remote_code))
        except ModelError as e:
            raise ModelError(f"{pair}: {e}") from None
    # lm_head rows as declared in config.json: a vocabulary mismatch or loss.top_k beyond the vocabulary fails here,
    # before any engine is built (checked again below with the loaded weights' real row counts)
    s_rows = _declared_vocab_rows(cfg.student.path)
    t_rows = _declared_vocab_rows(cfg.teacher.path) if cfg.teacher.path else None
    if s_rows is not None and (t_rows is not None or not cfg.teacher.path):
        try:
            early_vocab = vocab.reconcile_vocab(t_rows or s_rows, s_rows, len(tokenizer))[0]
        except ModelError as e:
            raise ModelError(f"{pair} (vocab_size in config.json), tokenizer_path "
                             f"'{cfg.resolved_tokenizer_path}': {e}") from None
        check_top_k(cfg, early_vocab)

    # --- data: each rank its own shard
    train_ds = data.build_dataset(cfg.data.train_files, cfg.data.format, tokenizer, cfg.data.max_length,
                                  cfg.data.text_field)
    eval_ds = (data.build_dataset(cfg.data.eval_files, cfg.data.format, tokenizer, cfg.data.max_length,
                                  cfg.data.text_field) if cfg.data.eval_files else None)

    # --- offline teacher: checked against this run's tokenizer and data before any model loads
    topk_cache = None
    if cfg.teacher.cache and cfg.loss.alpha > 0:
        topk_cache = teacher_cache.TopKCache(cfg.teacher.cache)
        topk_cache.verify(tokenizer_fp=teacher_cache.tokenizer_fingerprint(tokenizer),
                          data_fp=teacher_cache.data_fingerprint(train_ds), max_length=cfg.data.max_length,
                          top_k=cfg.loss.top_k)

    # --- student engine (loaded straight into ZeRO-3 shards at stage 3)
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

    # --- teacher: ZeRO-3 inference engine with its own DeepSpeed config
    teacher_engine = None
    teacher_rows = None
    if cfg.teacher.path and cfg.loss.alpha > 0:
        # one decision for all ranks (GPUs of different sizes must not give ranks different teacher layouts)
        sharding = engines.broadcast_object(teacher_sharding(cfg, dtype) if rank == 0 else None)
        if rank == 0:
            print(f"[ds_distill] teacher: {sharding} (teacher.sharding: {cfg.teacher.sharding})", flush=True)

        def load_teacher():
            return models.load_causal_lm(cfg.teacher.path, dtype=dtype,
                                         trust_remote_code=cfg.teacher.trust_remote_code,
                                         allow_pickle=cfg.teacher.allow_pickle_weights)

        if sharding == "replicate":
            teacher = load_teacher()
            teacher_rows = models.vocab_rows(teacher)
            teacher_engine = engines.ReplicatedTeacher(models.TeacherHidden(teacher), engines.device())
        else:
            teacher_ds = engines.teacher_ds_config(cfg.teacher.ds_config, micro_batch_size=T.micro_batch_size,
                                                   world_size=world, precision=precision,
                                                   offload_params=cfg.teacher.offload_params)
            teacher = engines.load_partitioned(load_teacher, teacher_ds)
            teacher_rows = models.vocab_rows(teacher)
            teacher_engine = engines.build_teacher_engine(models.TeacherHidden(teacher), teacher_ds)
    if topk_cache is not None:
        teacher_rows = int(topk_cache.manifest["teacher_vocab_rows"])
    vocab_size, vocab_message = vocab.reconcile_vocab(teacher_rows or models.vocab_rows(student),
                                                      models.vocab_rows(student), len(tokenizer))
    check_top_k(cfg, vocab_size)
    if topk_cache is not None:
        topk_cache.check_vocab_size(vocab_size)
        vocab_message += "\n" + topk_cache.describe()

    L = cfg.loss
    loss_kwargs = dict(vocab_size=vocab_size, alpha=L.alpha, temperature=L.temperature, divergence=L.divergence,
                       beta=L.beta, skew_lambda=L.skew_lambda, impl=L.impl, chunk_size=L.chunk_size, top_k=L.top_k,
                       layout=L.layout)

    # --- resume
    ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
    state = checkpoint.ResumeState()
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        # decided once, on rank 0, and broadcast: ranks whose filesystems differ (node-local output_dir, a lagging
        # network filesystem) cannot pick different checkpoints, or some resume and others start fresh
        resume_from = engines.broadcast_object(checkpoint.find_latest(ckpt_root) if rank == 0 else None)
    elif cfg.checkpoint.resume != "never":
        resume_from = cfg.checkpoint.resume
    if resume_from:
        state = checkpoint.load(student_engine, resume_from, world)
    if len(train_ds) < world:  # checked here so that every rank raises it (the stream would fail on some only)
        raise data.DataError(f"data.train_files: {len(train_ds)} usable training samples cannot feed {world} ranks "
                             "-> add data or use fewer ranks")
    stream = data.MicroBatchStream(train_ds, rank=rank, world_size=world, micro_batch_size=T.micro_batch_size,
                                   seed=T.seed, pad_token_id=tokenizer.pad_token_id,
                                   samples_consumed=state.samples_consumed,
                                   pack_capacity=(cfg.data.pack_length or 2 * cfg.data.max_length)
                                   if cfg.data.packing else 0)
    if state.data_state:
        stream.load_state_dict(state.data_state)  # same seed, rows and world size, or a DataError
    state.extra["run"] = run_identity(cfg)
    run = Run(cfg=cfg, rank=rank, world_size=world, tokenizer=tokenizer, student_engine=student_engine,
              teacher_engine=teacher_engine, stream=stream, eval_dataset=eval_ds, loss_kwargs=loss_kwargs,
              state=state, ckpt_root=ckpt_root, vocab_message=vocab_message, teacher_topk_cache=topk_cache)
    if resume_from:
        run.vocab_message += f"\nresumed from {resume_from} at step {state.step}"
    return run


def host_prepare(mb: dict, vocab_size: int, topk: Optional[tuple] = None) -> tuple[dict, int, int]:
    """Host side of a micro-batch, before it is copied to the device: everything that reads values (not only
    shapes) is done here, where reading a tensor costs no device synchronisation.

    Returns (the micro-batch with `keep` [n]: flat indices of the trained positions of labels[:, 1:], what the loss
    reads; trained tokens n; attended tokens). Checks the labels and a cached top-k's ids against the vocabulary,
    which the loss then does not re-check on the device.
    """
    targets = mb["labels"][:, 1:].reshape(-1)  # [B*(S-1)]
    keep = (targets != models.IGNORE_INDEX).nonzero().squeeze(1)
    lab = targets.index_select(0, keep)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= vocab_size):
        raise data.DataError(f"data: label ids in [{int(lab.min())}, {int(lab.max())}] outside the vocabulary of "
                             f"{vocab_size} tokens (sample ids {mb['sample_ids'].tolist()}) -> the tokenizer and "
                             "the models disagree: check tokenizer_path")
    if topk is not None and topk[0].numel() and (int(topk[0].min()) < 0 or int(topk[0].max()) >= vocab_size):
        raise data.DataError(f"teacher.cache: top-k ids outside [0, {vocab_size}) -> rebuild the cache with this "
                             "run's teacher and tokenizer")
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
               guard: Optional[guards.StepGuard] = None) -> dict:
    """One optimizer step over `grad_accum_steps` micro-batches; returns the step's global sums (host floats).

    `before_step(local_sums)` runs after the last backward and before the optimizer step, on every rank: the
    gradients of the whole step are then complete (read them with `engines.full_grad`), and the weights untouched.

    Host synchronisations: one in `guard.check` (its flags decide before the last backward) and one at the end
    (the step's sums and this rank's peak memory, all-reduced together). The token counts are known on the host
    before any copy; the normaliser stays a device tensor. tests/test_gpu_readiness.py counts them.
    """
    eng, teacher = run.student_engine, run.teacher_engine
    dev = engines.device()
    topks = []
    if run.teacher_topk_cache is not None:  # rows by sample id, aligned with labels[:, 1:]: [B, S-1, k] each
        topks = [run.teacher_topk_cache.batch(mb["sample_ids"], mb["attention_mask"]) for mb in micro_batches]
    prepared = [host_prepare(mb, run.loss_kwargs["vocab_size"], topks[i] if topks else None)
                for i, mb in enumerate(micro_batches)]
    micro_batches = [p[0] for p in prepared]
    # Global number of trained tokens of this step, known before any forward: the single normaliser.
    local_tokens, local_seq_tokens = sum(p[1] for p in prepared), sum(p[2] for p in prepared)
    local_slots = sum(token_slots(mb) for mb in micro_batches)
    counts = engines.all_reduce_sum(_to_device({"n": torch.tensor([local_tokens, local_seq_tokens, local_slots],
                                                                  dtype=torch.float64)}, dev)["n"])
    scale = run.world_size / counts[0].clamp(min=1.0)  # x world: DeepSpeed averages gradients over ranks

    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=dev)
    for i, mb in enumerate(micro_batches):
        teacher_topk = None
        if topks:
            teacher_topk = tuple(_to_device({"ids": topks[i][0], "lps": topks[i][1]}, dev).values())
        mb = _to_device(mb, dev)
        position_ids = mb.get("position_ids")  # packed rows: no attention_mask, positions restart per sample
        attention_mask = mb["attention_mask"] if position_ids is None else None
        teacher_hidden, teacher_weight = None, None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden = teacher(mb["input_ids"], attention_mask, position_ids)  # [B, S, Ht]
        with engines.gathered([teacher.module.lm_head_weight] if teacher is not None else []):
            if teacher is not None:
                teacher_weight = teacher.module.lm_head_weight
            total, ce, kd, tokens, metrics = eng(mb["input_ids"], attention_mask, mb["labels"],
                                                 run.loss_kwargs, teacher_hidden=teacher_hidden,
                                                 teacher_weight=teacher_weight, teacher_topk=teacher_topk,
                                                 keep=mb["keep"], position_ids=position_ids)
        sums += torch.cat([torch.stack([total.detach(), ce, kd, tokens]).double(), metrics.double()])
        loss = total * scale
        if guard is not None and eng.is_gradient_accumulation_boundary():
            loss = guard.check(sums, loss)  # collective: a non-finite loss on any rank, SIGTERM (guards.py)
        eng.backward(loss, scale_wrt_gas=False)
        if before_step is not None and eng.is_gradient_accumulation_boundary():
            before_step(sums)
        eng.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
    # this rank's peak memory in its own slot: the sum over ranks gathers them, max taken on the host
    peaks = torch.zeros(run.world_size, dtype=torch.float64, device=dev)
    peaks[run.rank] = engines.local_peak_memory_gb()
    reduced = engines.all_reduce_sum(torch.cat([sums, peaks]))
    host = torch.cat([reduced, counts]).tolist()  # host sync: once per step (counts are global already)
    out = dict(zip(SUM_KEYS, host))
    out["mem/peak_gb"] = max(host[len(SUM_KEYS):len(SUM_KEYS) + run.world_size])
    out["global_tokens"], out["global_seq_tokens"], out["global_slots"] = host[-3:]
    return out


def step_metrics(sums: dict, *, lr: float, grad_norm: Optional[float], seconds: float) -> dict:
    """Logged row: token means of the step's global sums (the values the gradient came from)."""
    n = max(sums["tokens"], 1.0)
    row = {"loss/total": sums["total"] / n, "loss/ce": sums["ce"] / n, "loss/kl": sums["kd"] / n, "lr": lr,
           "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
           "tokens_per_sec": sums["global_seq_tokens"] / max(seconds, 1e-9), "tokens": sums["tokens"],
           # real (non-padding) tokens per computed token slot, teacher and student alike
           "data/fill": sums["global_seq_tokens"] / max(sums["global_slots"], 1.0)}
    for k in models.StudentWithLoss.METRIC_KEYS:
        row[f"kd/{k}"] = sums[f"kd/{k}"] / n
    return row


def save_checkpoint(run: Run, rng: Optional[dict] = None) -> str:
    """Collective: checkpoint of run.state.step with the stream's position (and `rng`, default: the RNG now)."""
    run.state.data_state = run.stream.state_dict()
    run.state.samples_consumed = run.state.data_state["samples_consumed"]
    return checkpoint.save(run.student_engine, run.ckpt_root, run.state, run.cfg.checkpoint.keep_last, rng=rng)


def export(run: Run) -> str:
    """Gather the student from ZeRO shards and write output_dir/final as a plain HF model (rank 0)."""
    out = os.path.join(run.cfg.output_dir, "final")
    sd = engines.consolidated_state_dict(run.student_engine)  # collective
    if run.rank == 0:
        sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
        hf_model = run.student_engine.module.hf_model
        if lora.is_peft_model(hf_model):  # merge the adapters into a plain HF model (+ the adapter alone)
            adapter_dir = os.path.join(run.cfg.output_dir, "final_adapter") if run.cfg.student.lora.save_adapter \
                else None
            lora.save_merged(hf_model, sd, out, adapter_dir, lambda m, msd, d: models.save_hf_export(
                m, msd, d, run.tokenizer, to_dict(run.cfg)))
        else:
            models.save_hf_export(hf_model, sd, out, run.tokenizer, to_dict(run.cfg))
    engines.barrier()
    return out


def run_eval(run: Run) -> Optional[dict]:
    """Held-out student (and teacher) metrics on data.eval_files, token-weighted over all ranks (collective).

    The student runs through its engine (`hidden_only`), so ZeRO-3 gathers its layers as in training; the lm_heads
    are gathered per batch inside evaluate. The teacher's hidden states are cached after the first call
    (eval.cache_teacher). Returns None without eval files.
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
            batches, student_hidden_fn=lambda ids, mask: eng(ids, mask, None, None, hidden_only=True),
            student_weight=eng.module.lm_head_weight,
            teacher_hidden_fn=(lambda ids, mask: teacher(ids, mask)) if teacher is not None else None,
            teacher_weight=teacher.module.lm_head_weight if teacher is not None else None,
            teacher_cache=run.teacher_eval_cache, vocab_size=run.loss_kwargs["vocab_size"],
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
                                     dtype=engines.torch_dtype(engines.resolve_precision(cfg.train.precision)))
        evaluate.write_generations_md(rows, path, title=f"Generations: {os.path.basename(cfg.output_dir)}")
    engines.barrier()
    return path


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
    guards.validate_mode(cfg.train.nonfinite, guard.discards, cfg.train.zero_stage,
                         engines.resolve_precision(cfg.train.precision))
    nan_hook = guards.nan_hook(guard, run.rank)  # test fault only
    hook_handle = eng.module.register_forward_hook(nan_hook) if nan_hook else None
    if run.vocab_message:
        tracker.message(run.vocab_message)
    last: dict = {}
    if run.state.step == 0:
        eval_and_log(run, tracker)  # the student before training: the report's "before" column
    while run.state.step < cfg.train.max_steps:
        t0 = time.time()
        lr = eng.get_lr()[0]  # the LR this step's update uses (the scheduler advances inside the step)
        step = run.state.step + 1
        guard.begin(step)
        # data position and RNG before this step: what an abort's checkpoint of the last good step must hold
        pos_before, rng_before = run.stream.samples_consumed, checkpoint.rng_state()
        micro_batches = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]
        sums = train_step(run, micro_batches, guard=guard, before_step=None if guard.discards else
                          lambda _: guard.check_grads(eng.module.parameters()))
        try:
            skipped = guard.after_step(eng.was_step_applied(), fp16=eng.fp16_enabled())
        except NonFiniteError as e:  # the weights are still those of step - 1: checkpoint them, then stop
            run.stream.samples_consumed = pos_before
            path = save_checkpoint(run, rng=rng_before)
            raise NonFiniteError(f"{e}. The weights of the last good step {run.state.step} are saved in {path}") \
                from None
        run.state.step = step
        if skipped:
            run.state.skipped_steps = guard.skipped_steps
            tracker.message(guard.skip_message())
        else:
            run.state.tokens_seen += int(sums["tokens"])
            grad_norm = eng.get_global_grad_norm()
            last = step_metrics(sums, lr=lr, grad_norm=grad_norm, seconds=time.time() - t0)
            last["mem/peak_gb"] = sums["mem/peak_gb"]  # max over ranks, all-reduced with the step's sums
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
        guards.fault_after_step(step, run.rank)  # test fault only
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
    code = 1
    try:
        run = build(cfg)
        run.state.wandb_run_id = run.state.wandb_run_id or None
        tracker = Tracker(output_dir=cfg.output_dir, is_rank0=run.rank == 0, total_steps=cfg.train.max_steps,
                          start_step=run.state.step, wandb_mode=cfg.wandb.mode, wandb_project=cfg.wandb.project,
                          wandb_run_name=cfg.wandb.run_name, wandb_entity=cfg.wandb.entity,
                          wandb_run_id=run.state.wandb_run_id, config=to_dict(cfg))
        run.state.wandb_run_id = tracker.run_id
        restore_sigterm = guards.install_sigterm_handler()  # from here SIGTERM = checkpoint at the next step, exit
        watchdog = guards.Watchdog(cfg.train.watchdog_timeout_s, run.rank).start()
        last = train(run, tracker, watchdog)
        watchdog.beat("export")
        path = export(run)
        watchdog.stop()
        tracker.message(f"done: step {run.state.step}, loss {last.get('loss/total', float('nan')):.4f}; "
                        f"model exported to {path}")
        gen_path = write_generations(run)
        if run.rank == 0:  # report.md + plots from metrics.jsonl (all steps, including before a resume)
            notes = ["generations side by side: [generations.md](generations.md)"] if gen_path else None
            report.write_report(cfg.output_dir, report.read_rows(tracker.metrics_path), notes=notes,
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
        if restore_sigterm is not None:
            restore_sigterm()
        if tracker is not None:
            tracker.finish(exit_code=code)
    return code
