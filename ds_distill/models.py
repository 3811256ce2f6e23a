"""Hugging Face models: safe loading, the student-with-loss and teacher-hidden wrappers, and the HF export.

The wrappers exist for the fused loss: the student's forward returns the loss sums computed from its final hidden
states and its head (lm_head weight, bias, the family's logit transform: heads.py; never a [B, S, V] logits tensor),
and the teacher's forward returns only its final hidden states; its head is passed into the student's loss while
gathered. Both can also run the model's own HF forward on a few positions (`probe`) so that the trainer can check,
before step 1, that the fused head reproduces it. An MoE student's forward also returns the router's load-balancing
(aux) loss, computed by the model family's own function from its router logits.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Optional

import torch
from torch import nn

from . import heads
from .errors import ModelError
from .losses import HEALTH_METRICS, IGNORE_INDEX, LossSpec, LossSums, distill_loss



def check_model_dir(path: str, key: str, allow_pickle: bool = False) -> None:
    """Refuse a missing directory, one without config.json, or one holding only pickle weights (unless allowed)."""
    if not os.path.isdir(path):
        raise ModelError(f"{key}: '{path}' is not a directory -> give a local Hugging Face model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{key}: '{path}' has no config.json -> is it a Hugging Face model directory?")
    safet = glob.glob(os.path.join(path, "*.safetensors"))
    pickles = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
    if not safet and pickles and not allow_pickle:
        raise ModelError(
            f"{key}: '{path}' holds only pickle weights ({os.path.basename(pickles[0])}); unpickling can run "
            f"arbitrary code -> convert it to safetensors, or set {key.rsplit('.', 1)[0]}.allow_pickle_weights: "
            "true if you trust the files")
    if not safet and not pickles:
        raise ModelError(f"{key}: '{path}' has no weights (*.safetensors) -> check the directory")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"tokenizer_path: cannot load a tokenizer from '{path}': {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False,
                   allow_pickle: bool = False) -> nn.Module:
    """AutoModelForCausalLM from a local directory; safetensors only unless pickle is explicitly allowed."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                use_safetensors=None if allow_pickle else True,
                                                local_files_only=True)


def vocab_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.ds_shape[0] if hasattr(
        model.get_output_embeddings().weight, "ds_shape") else model.get_output_embeddings().weight.shape[0]


def _decoder(model: nn.Module) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    return base.get_decoder()


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model


class MoeAux:
    """How an MoE causal LM computes its router load-balancing loss: its family's `load_balancing_loss_func` (from
    its own modeling module), expert counts and `router_aux_loss_coef`, as in its HF forward with
    `output_router_logits=True`. `of(model)` is None for dense models."""

    def __init__(self, fn, num_experts: int, top_k: int, coef: float):
        self.fn, self.num_experts, self.top_k, self.coef = fn, num_experts, top_k, coef

    @staticmethod
    def of(model: nn.Module) -> Optional["MoeAux"]:
        import sys

        base = _base(model)
        coef = getattr(base.config, "router_aux_loss_coef", None)
        fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
        n_exp = getattr(base, "num_experts", None)
        if coef is None or fn is None or not n_exp:
            return None
        return MoeAux(fn, int(n_exp), int(getattr(base, "num_experts_per_tok", 2)), float(coef))

    def __call__(self, router_logits, attention_mask) -> torch.Tensor:
        return self.fn(router_logits, self.num_experts, self.top_k, attention_mask)


def _lm_head(model: nn.Module) -> nn.Module:
    return _base(model).get_output_embeddings()


def _head_params(model: nn.Module) -> list:
    head = _lm_head(model)
    return [head.weight] + ([head.bias] if getattr(head, "bias", None) is not None else [])


class TeacherHidden(nn.Module):
    """Teacher forward that stops before the lm_head: returns final hidden states [B, S, H]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def head(self) -> heads.Head:
        """weight, bias, transform (partitioned under ZeRO-3: gather head.params() before reading them)."""
        return heads.of_model(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                position_ids: Optional[torch.Tensor] = None, probe: bool = False):
        """attention_mask None + position_ids: packed rows (data.collate_packed), attention within each sample."""
        hidden = _decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state
        if probe:  # (the model's own logits [B, S, V], hidden [B, S, H]) for trainer.probe_heads
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).logits, hidden
        return hidden


class StudentWithLoss(nn.Module):
    """Student forward + distillation loss in one module call, so ZeRO-3 gathers the lm_head for the loss.

    Returns the loss sums of `losses.distill_loss` as a tuple (DeepSpeed hooks tensors in tuples):
    (total, ce, kd, tokens, metrics [losses.HEALTH_METRICS], aux), aux being an
    MoE student's router load-balancing loss of the micro-batch (with grad; 0 for dense students).
    Only the positions whose label is trained are passed to the loss (shifted: hidden[t] predicts labels[t+1]).
    """

    def __init__(self, model: nn.Module, register_external=None, loss_spec: Optional[LossSpec] = None):
        super().__init__()
        self.model = model
        self.loss_spec = loss_spec  # losses.LossSpec; trainer.build sets it once the vocabulary is reconciled
        self.transform = heads.transform_of(_base(model).config)
        self.moe_aux = MoeAux.of(model)
        if register_external is not None:
            for p in _head_params(model):
                register_external(self, p)

    @property
    def head(self) -> heads.Head:
        """The head the loss uses (its transform included), which is also what the start-up probe checks."""
        lm_head = _lm_head(self.model)
        return heads.Head(lm_head.weight, getattr(lm_head, "bias", None), self.transform)

    @property
    def aux_coef(self) -> float:
        """The router aux loss coefficient of an MoE student (its config's router_aux_loss_coef), 0 otherwise."""
        return self.moe_aux.coef if self.moe_aux is not None else 0.0

    @property
    def hf_model(self) -> nn.Module:
        return self.model

    def forward(self, input_ids, attention_mask, labels=None, teacher_hidden=None, teacher_weight=None,
                teacher_topk=None, hidden_only: bool = False, teacher_bias=None, probe: bool = False, keep=None,
                position_ids=None, token_mask=None):
        """The loss is `self.loss_spec`'s (set once by trainer.build). `keep` [n]: the flat indices of the trained
        positions of labels[:, 1:] when the caller computed them on the host (trainer.host_prepare: labels already
        checked against the vocabulary); then nothing here reads a value on the device. Without it they are found here
        (a host synchronisation). `position_ids` with attention_mask None: packed rows; `token_mask` [B, S] then marks
        the real tokens (padding excluded from an MoE router's aux loss, as the attention mask does unpacked)."""
        want_aux = self.moe_aux is not None and not hidden_only and not probe
        extra = {"output_router_logits": True} if want_aux else {}
        out_dec = _decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False, **extra)
        hidden = out_dec.last_hidden_state  # [B, S, H]
        if hidden_only:  # evaluation (evaluate.py): the final hidden states, through the engine's ZeRO-3 hooks
            return hidden
        if probe:  # the model's own logits and the fused head's, on these few positions (trainer.probe_heads)
            own = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).logits
            return own, self.head.logits(hidden)
        # the router load-balancing loss of this micro-batch, as the HF forward computes it (a mean over its tokens)
        if want_aux:
            mask = attention_mask if token_mask is None else token_mask
            aux = self.moe_aux(out_dec.router_logits, mask).float().reshape(())
        else:
            aux = torch.zeros((), device=hidden.device)
        if self.loss_spec is None:
            raise RuntimeError("StudentWithLoss.loss_spec is not set: build the wrapper with loss_spec=LossSpec(...)")
        targets = labels[:, 1:].reshape(-1)  # [N]
        checked = keep is not None
        if keep is None:
            keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        loss_rows = None  # the trained rows among the kept ones: all of them, unless none is trained
        if keep.numel() == 0:  # fully masked micro-batch: one ignored row keeps every rank's graph identical
            keep = torch.zeros(1, dtype=torch.long, device=targets.device)
            if checked:
                loss_rows = torch.zeros(0, dtype=torch.long, device=targets.device)
        elif checked:
            loss_rows = torch.arange(keep.numel(), device=targets.device)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
        t_h = None
        if teacher_hidden is not None:
            t_h = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1]).index_select(0, keep)
        t_topk = None
        if teacher_topk is not None:
            ids, lps = teacher_topk  # [B, S-1, k] aligned with targets
            t_topk = (ids.reshape(-1, ids.shape[-1]).index_select(0, keep),
                      lps.reshape(-1, lps.shape[-1]).index_select(0, keep))
        head = _lm_head(self.model)
        out: LossSums = distill_loss(h, head.weight, targets.index_select(0, keep),
                                     teacher_hidden=t_h, teacher_weight=teacher_weight, teacher_topk=t_topk,
                                     teacher_bias=teacher_bias, student_bias=getattr(head, "bias", None),
                                     student_transform=self.transform, rows=loss_rows, **self.loss_spec.kwargs())
        metrics = torch.stack([out.metrics.get(k, torch.zeros((), device=h.device)).float().reshape(())
                               for k in HEALTH_METRICS])
        return out.total, out.ce, out.kd, out.tokens.float(), metrics, aux


def unsharded_copy(model: nn.Module, dev: torch.device, dtype: torch.dtype) -> nn.Module:
    """An empty (uninitialised) plain module of `model`'s class and config on `dev` in `dtype`, no ZeRO hooks, tied
    weights tied as in the original: filled by engines.copy_gathered (on-policy sampling's student copy)."""
    import copy

    base = _base(model)
    config = copy.deepcopy(base.config)
    config.use_cache = True
    with torch.device("meta"):
        replica = type(base)(config)
    replica = replica.to_empty(device=dev).to(dtype)
    if getattr(config, "tie_word_embeddings", False):
        replica.tie_weights()
    return replica


def save_hf_export(model: nn.Module, state_dict: dict, out_dir: str, tokenizer, resolved_config: dict) -> None:
    """Write a plain HF model (safetensors) + tokenizer + the run's resolved config. Rank 0 only."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "ds_distill_config.json"), "w") as f:
        json.dump(resolved_config, f, indent=1, default=str)
