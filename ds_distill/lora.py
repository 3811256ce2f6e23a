"""LoRA students through peft: wrap before the engine is built, merge at export.

Under ZeRO-3 the student is already partitioned (every base weight is a [0]-shaped shard) when `apply_lora` runs.
peft only reads `in_features` / `out_features` and the base weight's dtype and device, so it wraps the partitioned
Linear modules as they are; the new `lora_A` / `lora_B` weights are ordinary tensors until `deepspeed.initialize`
converts them into ZeRO parameters, broadcasting rank 0's initial values to every rank (so the adapters start
identical even if the ranks' RNG streams differ). Stages 0-2 broadcast the whole module at initialize too.

Only the adapter weights require grad: `engines.build_student_engine` hands DeepSpeed just those, so the optimizer
states and gradient partitions exist for the adapters alone; the frozen base still costs its parameter memory.

At export the gathered state dict (base weights + adapters, on rank 0) is loaded into a peft model built on the
meta device (no second allocation), `merge_and_unload` folds W + (alpha / r) * B @ A into each targeted weight, and
the result is saved as a plain Hugging Face model; the adapter alone can be saved next to it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .errors import ModelError


def peft_config(*, rank: int, alpha: float, dropout: float, target_modules: list[str]):
    from peft import LoraConfig, TaskType

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type=TaskType.CAUSAL_LM)


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> nn.Module:
    """Wrap `model` (plain or ZeRO-3 partitioned) with LoRA adapters; only the adapter weights require grad."""
    from peft import get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise ModelError(f"student.lora.target_modules: {missing} match no linear module of the student -> "
                         f"choose among {sorted(present)}")
    peft_model = get_peft_model(model, peft_config(rank=rank, alpha=alpha, dropout=dropout,
                                                   target_modules=target_modules))
    for name, p in peft_model.named_parameters():  # peft freezes the base; make the contract explicit
        p.requires_grad_(is_adapter_param(name))
    return peft_model


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name or ".lora_magnitude_" in name


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable elements, all elements), using ZeRO-3's full shapes when partitioned."""
    def numel(p):
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    seen, train, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += numel(p)
        train += numel(p) if p.requires_grad else 0
    return train, total


def save_merged(peft_model: nn.Module, state_dict: dict, out_dir: str, adapter_dir: Optional[str],
                save_fn) -> None:
    """Rank 0: merge the adapters of a gathered `state_dict` (PeftModel keys) and save a plain HF model.

    `peft_model` is the trained (possibly partitioned) PeftModel: only its config and adapter settings are read.
    A twin is built on the meta device and takes the gathered tensors by assignment (no copy), so the merge costs
    no memory beyond the gathered state dict: the targeted weights of `state_dict` are merged IN PLACE (pass a copy
    if its tensors are still in use). `save_fn(model, state_dict, out_dir)` writes the merged model.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_cfg = peft_model.get_base_model().config
    lora_cfg = peft_model.peft_config["default"]
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(base_cfg, dtype=next(iter(state_dict.values())).dtype)
    twin = get_peft_model(twin, lora_cfg)
    missing, unexpected = twin.load_state_dict(state_dict, strict=False, assign=True)
    # tied models: the gathered dict may name the shared weight once; tie_weights restores the second name
    twin.get_base_model().tie_weights()
    still_meta = [n for n, p in twin.named_parameters() if p.device.type == "meta"]
    if still_meta or unexpected:
        raise ModelError(f"LoRA export: gathered weights do not match the student (missing {still_meta[:4]}, "
                         f"unexpected {unexpected[:4]})")
    if adapter_dir is not None:
        twin.save_pretrained(adapter_dir, safe_serialization=True)
    merged = twin.merge_and_unload()
    # non-persistent buffers (rotary inv_freq) stay on meta; they are recomputed from the config when loading
    merged_sd = {k: v for k, v in merged.state_dict().items() if v.device.type != "meta"}
    save_fn(merged, merged_sd, out_dir)
    if adapter_dir is not None:
        _note_base(adapter_dir, base_cfg)


def _note_base(adapter_dir: str, base_cfg) -> None:
    """A README next to the adapter saying which weights it applies to."""
    with open(os.path.join(adapter_dir, "README.md"), "w") as f:
        f.write("# LoRA adapter written by ds_distill\n\n"
                f"Apply it to the student's INITIAL weights ({base_cfg._name_or_path or 'student.path'}):\n\n"
                "    from peft import PeftModel\n"
                "    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STUDENT), ADAPTER)\n\n"
                "The merged model (output_dir/final) already contains it.\n")
