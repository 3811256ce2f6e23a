"""Build functions shared by the recipes (training: trainer.py, cache writing: cache_writer.py, evaluation:
eval_recipe.py): the process group, the tokenizer and vocabulary checks, the datasets, a teacher engine.

Each recipe composes these instead of repeating them, so the three cannot drift apart (a check added here reaches
every entry point). Nothing below this layer starts a process group.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from . import data, engines, guards, models, vocab
from .config import DistillConfig, validate
from .errors import DistillError, ModelError


def start(cfg: DistillConfig, *, check_world: bool = True) -> tuple[int, int]:
    """Check the device, start the process group (its timeout above the watchdog's), validate the config (with the
    world size when `check_world`: batch and rank checks; with train.precision resolved for this device).
    Returns (rank, world size)."""
    engines.check_device(cfg.train.device)  # before the process group: a silent CPU fallback would pick gloo
    rank, world, _ = engines.init_distributed(guards.process_group_timeout(cfg.train.watchdog_timeout_s))
    validate(cfg, world if check_world else None, precision=engines.resolve_precision(cfg.train.precision))
    return rank, world


def has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model", "vocab.json"))


def declared_vocab_rows(path: str) -> Optional[int]:
    """lm_head rows a model directory's config.json declares (its text config's vocab_size), or None."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError):
        return None
    v = c.get("text_config", c).get("vocab_size")
    return v if isinstance(v, int) else None


def check_model_dirs(cfg: DistillConfig) -> None:
    """student.path / teacher.path hold a model (safetensors unless allow_pickle_weights), before anything loads."""
    if cfg.student.path:
        models.check_model_dir(cfg.student.path, "student.path", cfg.student.allow_pickle_weights)
    if cfg.teacher.path:
        models.check_model_dir(cfg.teacher.path, "teacher.path", cfg.teacher.allow_pickle_weights)


def checked_tokenizer(cfg: DistillConfig):
    """The run's tokenizer, after checking that the teacher's and the student's tokenizers give the same ids and that
    a separate tokenizer_path gives the models' own ids (not just as many of them)."""
    tokenizer = models.load_tokenizer(cfg.resolved_tokenizer_path, cfg.tokenizer_trust_remote_code)
    if cfg.teacher.path and cfg.student.path:
        try:
            vocab.check_tokenizers_compatible(
                models.load_tokenizer(cfg.teacher.path, cfg.teacher.trust_remote_code),
                models.load_tokenizer(cfg.student.path, cfg.student.trust_remote_code))
        except ModelError as e:
            raise ModelError(f"teacher.path '{cfg.teacher.path}' / student.path '{cfg.student.path}': {e}") from None
    if cfg.tokenizer_path:
        key, ref = ("teacher.path", cfg.teacher.path) if cfg.teacher.path else ("student.path", cfg.student.path)
        if ref and has_tokenizer(ref):
            trust = cfg.teacher.trust_remote_code if cfg.teacher.path else cfg.student.trust_remote_code
            try:
                vocab.check_tokenizers_compatible(models.load_tokenizer(ref, trust), tokenizer)
            except ModelError as e:
                raise ModelError(f"tokenizer_path '{cfg.tokenizer_path}' does not match the tokenizer of {key} "
                                 f"'{ref}' (compared as teacher = {key}, student = tokenizer_path): {e}") from None
    return tokenizer


def declared_vocab_size(cfg: DistillConfig, tokenizer) -> Optional[int]:
    """The vocabulary both models share, from the row counts their config.json declare (None when undeclared):
    a mismatch fails here, before any weights load (the loaded heads are checked again by the recipe)."""
    s_rows = declared_vocab_rows(cfg.student.path) if cfg.student.path else None
    t_rows = declared_vocab_rows(cfg.teacher.path) if cfg.teacher.path else None
    if (cfg.student.path and s_rows is None) or (cfg.teacher.path and t_rows is None):
        return None
    try:
        return vocab.reconcile_vocab(t_rows or s_rows, s_rows or t_rows, len(tokenizer))[0]
    except ModelError as e:
        raise ModelError(f"teacher.path '{cfg.teacher.path}' / student.path '{cfg.student.path}' (vocab_size in "
                         f"config.json), tokenizer_path '{cfg.resolved_tokenizer_path}': {e}") from None


def train_dataset(cfg: DistillConfig, tokenizer):
    """data.train_files tokenised, labelled, with stable sample ids (data.build_dataset)."""
    d = cfg.data
    return data.build_dataset(d.train_files, d.format, tokenizer, d.max_length, d.text_field)


def datasets(cfg: DistillConfig, tokenizer):
    """(train, eval or None): train_dataset and data.eval_files the same way."""
    d = cfg.data
    train = train_dataset(cfg, tokenizer)
    held_out = data.build_dataset(d.eval_files, d.format, tokenizer, d.max_length, d.text_field) \
        if d.eval_files else None
    return train, held_out


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


def micro_batch_stream(cfg: DistillConfig, train_ds, tokenizer, *, rank: int, world: int,
                       samples_consumed: int = 0) -> data.MicroBatchStream:
    """Rank `rank`'s micro-batch stream of the training data (train.micro_batch_size, train.seed, packing): the
    trainer's, and the one a separate teacher rank rebuilds for each student it serves."""
    d, T = cfg.data, cfg.train
    return data.MicroBatchStream(train_ds, rank=rank, world_size=world, micro_batch_size=T.micro_batch_size,
                                 seed=T.seed, pad_token_id=tokenizer.pad_token_id, samples_consumed=samples_consumed,
                                 pack_capacity=(d.pack_length or 2 * d.max_length) if d.packing else 0)


def load_teacher_model(cfg: DistillConfig, dtype: torch.dtype):
    return models.load_causal_lm(cfg.teacher.path, dtype=dtype, trust_remote_code=cfg.teacher.trust_remote_code,
                                 allow_pickle=cfg.teacher.allow_pickle_weights)


def teacher_engine(cfg: DistillConfig, *, sharding: str, world: int, precision: str, micro_batch_size: int,
                   expect_rows: Optional[int] = None):
    """The teacher as an inference engine returning final hidden states (models.TeacherHidden): a ZeRO-3 engine
    with teacher.ds_config (`sharding` zero3) or a full replica per rank (replicate). Returns (engine, lm_head
    rows). `expect_rows`: the row count config.json declares; a loaded head with another count is refused."""
    if sharding == "replicate":
        teacher = load_teacher_model(cfg, engines.torch_dtype(precision))
        rows = models.vocab_rows(teacher)
        engine = engines.ReplicatedTeacher(models.TeacherHidden(teacher), engines.device())
    else:
        engine, rows = inference_engine(cfg.teacher.path, ds_config=cfg.teacher.ds_config, world=world,
                                        precision=precision, micro_batch_size=micro_batch_size,
                                        offload_params=cfg.teacher.offload_params,
                                        trust_remote_code=cfg.teacher.trust_remote_code,
                                        allow_pickle=cfg.teacher.allow_pickle_weights)
    if expect_rows is not None and rows != expect_rows:
        raise DistillError(f"teacher.path: config.json says {expect_rows} vocabulary rows, the lm_head has {rows}")
    return engine, rows


def inference_engine(path: str, *, ds_config: str, world: int, precision: str, micro_batch_size: int,
                     offload_params: bool = False, trust_remote_code: bool = False, allow_pickle: bool = False):
    """A model loaded straight into ZeRO-3 shards (DeepSpeed JSON `ds_config`) as an inference engine returning final
    hidden states, its head (weight, bias, transform) at `engine.module.head`. Returns (engine, lm_head rows)."""
    ds = engines.teacher_ds_config(ds_config, micro_batch_size=micro_batch_size, world_size=world,
                                   precision=precision, offload_params=offload_params)
    model = engines.load_partitioned(lambda: models.load_causal_lm(
        path, dtype=engines.torch_dtype(precision), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle),
        ds)
    rows = models.vocab_rows(model)
    return engines.build_teacher_engine(models.TeacherHidden(model), ds), rows
