"""What each model family does to its logits after the final norm: the head every logits path must reproduce.

A model's head is its lm_head weight [V_rows, H], an optional bias [V_rows] and an output transform read from its
config (`transform_of`):

    raw = hidden @ weight^T (+ bias)          # [N, V_rows]
    z   = scale * raw                         # Cohere: logit_scale; Granite: 1 / logits_scaling
    z   = softcap * tanh(z / softcap)         # Gemma-2 / Gemma-3: final_logit_softcapping (when set)

The table `FAMILIES` maps a Hugging Face `model_type` to where its config keeps those numbers. A model type that
is not in the table is treated as plain (`hidden @ weight^T (+ bias)`) and the trainer's start-up probe
(`trainer.probe_heads`) compares that with the model's own forward before any step: a forward that does something
else (a new family, a `trust_remote_code` model, a patched forward) is refused there with the largest difference.

To add a family: read its `*ForCausalLM.forward` in transformers (what happens between `self.lm_head(...)` and the
returned logits), add one `FAMILIES` row naming the config attribute, add the family to the test matrix
(tests/scripts/family_driver.py, FAMILY_CONFIGS) and to README's list.

The transform functions below are pure tensor code, used by the losses (chunk by chunk, with their derivative),
evaluation, the offline teacher cache and the probe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class HeadTransform:
    """Element-wise map from raw logits to the model's logits: z = softcap(scale * raw)."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError(f"HeadTransform.scale={self.scale} must be finite and non-zero")
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ValueError(f"HeadTransform.softcap={self.softcap} must be a positive number or None")

    def __call__(self, raw: Tensor) -> Tensor:
        """z from raw logits, out of place and differentiable (the reference path)."""
        z = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def describe(self) -> str:
        parts = ([f"x {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"softcap {self.softcap:g}"] if self.softcap is not None else [])
        return ", ".join(parts) or "plain"


IDENTITY = HeadTransform()


def softcap_(scaled: Tensor, cap: float, deriv_out: Optional[Tensor] = None) -> Tensor:
    """In place: scaled -> cap * tanh(scaled / cap); with `deriv_out` ([same shape]) also writes dz/dscaled =
    1 - tanh^2 there (the chunked loss multiplies its logit gradient by it). Returns `scaled`."""
    scaled.div_(cap).tanh_()
    if deriv_out is not None:
        torch.mul(scaled, scaled, out=deriv_out).neg_().add_(1.0)
    return scaled.mul_(cap)


def head_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                transform: HeadTransform = IDENTITY, vocab_size: Optional[int] = None) -> Tensor:
    """The model's logits [N, V] of hidden [N, H] (differentiable; rows >= vocab_size dropped when given)."""
    w = weight[:vocab_size] if vocab_size is not None else weight
    raw = hidden.to(w.dtype) @ w.T
    if bias is not None:
        raw = raw + (bias[:vocab_size] if vocab_size is not None else bias)
    return transform(raw)


# ----------------------------------------------------------------------------------------------------------------
# The family table
# ----------------------------------------------------------------------------------------------------------------

# model_type -> (kind, config attribute). kind: "plain", "scale" (multiply), "divide", "softcap".
FAMILIES: dict[str, tuple[str, Optional[str]]] = {
    "llama": ("plain", None), "mistral": ("plain", None), "mixtral": ("plain", None), "qwen2": ("plain", None),
    "qwen2_moe": ("plain", None), "qwen3": ("plain", None), "qwen3_moe": ("plain", None), "phi3": ("plain", None),
    "phi": ("plain", None), "gemma": ("plain", None), "olmo2": ("plain", None),
    "gemma2": ("softcap", "final_logit_softcapping"), "gemma3_text": ("softcap", "final_logit_softcapping"),
    "cohere": ("scale", "logit_scale"), "cohere2": ("scale", "logit_scale"),
    "granite": ("divide", "logits_scaling"), "granitemoe": ("divide", "logits_scaling"),
    "granitemoeshared": ("divide", "logits_scaling"),
}
# The families a test runs end to end (tests/test_families.py); the others in FAMILIES follow their modeling code
# as read, and are checked by the start-up probe like any model.
TESTED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "cohere", "granite", "phi3")


def transform_of(config) -> HeadTransform:
    """The HeadTransform of a Hugging Face config (unknown model types: plain; the probe verifies them)."""
    kind, attr = FAMILIES.get(getattr(config, "model_type", ""), ("plain", None))
    value = getattr(config, attr, None) if attr else None
    if kind == "plain" or value is None:
        return IDENTITY
    if kind == "softcap":
        return HeadTransform(softcap=float(value))
    if kind == "scale":
        return HeadTransform(scale=float(value))
    if kind == "divide":
        return HeadTransform(scale=1.0 / float(value))
    raise ValueError(f"FAMILIES: unknown kind {kind!r}")


@dataclass
class Head:
    """A model's head: lm_head weight [V_rows, H], optional bias [V_rows], transform (partitioned under ZeRO-3:
    gather `params()` before reading the tensors)."""

    weight: Tensor
    bias: Optional[Tensor]
    transform: HeadTransform

    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def logits(self, hidden: Tensor, vocab_size: Optional[int] = None) -> Tensor:
        return head_logits(hidden, self.weight, self.bias, self.transform, vocab_size)


def of_model(model) -> Head:
    """The Head of a Hugging Face causal LM (a peft wrapper is looked through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head = base.get_output_embeddings()
    return Head(weight=lm_head.weight, bias=getattr(lm_head, "bias", None), transform=transform_of(base.config))
