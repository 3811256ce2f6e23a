"""Held-out evaluation: perplexity of student and teacher, KL(teacher || student), top-1 agreement; generations.

No DeepSpeed in here: the caller passes the forward functions, the lm_head weights and (under ZeRO-3) a `gather`
context that makes a partitioned weight whole, so the same code serves the trainer's ZeRO-3 engines and plain
Hugging Face models in `launch/eval.py`.

What is counted (only the trained tokens: labels != -100, shifted as in training; responses only for the
instruction / guanaco / chat formats, every token for text):
    student_nll, teacher_nll  sum of -log p(label), ppl = exp(nll / tokens)
    kl                        sum of KL(teacher || student) at temperature 1
    agree                     positions where the teacher's and the student's argmax coincide
All softmaxes are over the first `vocab_size` ids, the tokenizer's vocabulary (`vocab.reconcile_vocab`): lm_head rows
beyond it are padding that the training loss masks, so they are masked here too. For a model without padding rows
the perplexity is exactly that of `model(input_ids, labels=labels).loss`.
    tokens                    number of trained tokens
Multi-rank: each rank sums over its shard, the five sums are all-reduced once, and only then divided: the result
is the token-weighted mean over the whole eval set (never a mean of per-rank or per-batch means), and equals a
single-rank evaluation up to float summation order.

Logits are never built for a whole batch: positions go through the lm_head `chunk_size` at a time ([chunk, V]).
They are the models' own logits: each head (`heads.Head`) applies its bias and its family's transform (softcap,
scale), so the numbers equal those of `model(input_ids).logits`.

The teacher's side is computed once per run: `TeacherCache` keeps, per eval sample (keyed by its `sample_id`), the
teacher's final hidden states at that sample's trained positions, on CPU, in the teacher's dtype (memory per rank:
its shard's trained tokens x teacher hidden size x 2-4 bytes, e.g. 100k tokens x 4096 x 2 B = 0.8 GB). Later evals
skip the teacher's decoder and only redo its lm_head product, which keeps the KL exact (a cached top-k would make it
approximate). Every rank fills its cache in the same eval call, so all ranks switch to the cache together and
ZeRO-3's collectives stay matched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import torch

from .heads import Head
from .losses import IGNORE_INDEX, divergence_from_logprobs

STAT_KEYS = ("student_nll", "teacher_nll", "kl", "agree", "tokens")
TEMPERATURES = (0.1, 0.7, 1.2)

HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> [B, S, H]


def _no_gather(params) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place when a process group with several ranks exists; a no-op otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def token_stats(student_hidden: torch.Tensor, student_head: Head, targets: torch.Tensor, *,
                teacher_hidden: Optional[torch.Tensor] = None, teacher_head: Optional[Head] = None,
                vocab_size: Optional[int] = None, chunk_size: int = 1024) -> torch.Tensor:
    """Sums over N trained positions, in STAT_KEYS order, as float64 [5] (teacher entries 0 without a teacher).

    student_hidden [N, Hs] (the hidden state that predicts each target), student_head (weight [Vs, Hs], bias,
    transform), targets [N]; teacher_hidden [N, Ht], teacher_head likewise. Logits are made `chunk_size` positions
    at a time in the weight's dtype and upcast to fp32; every softmax is over the first `vocab_size` ids (default:
    all rows).
    """
    out = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=student_hidden.device)
    n = targets.shape[0]
    out[4] = n
    has_teacher = teacher_hidden is not None
    for i in range(0, n, chunk_size):
        y = targets[i:i + chunk_size].unsqueeze(1)  # [c, 1]
        s_logits = student_head.logits(student_hidden[i:i + chunk_size], vocab_size)  # [c, V]: padded rows dropped
        s_lp = torch.log_softmax(s_logits.float(), -1)
        out[0] -= s_lp.gather(1, y).sum().double()
        if not has_teacher:
            continue
        t_logits = teacher_head.logits(teacher_hidden[i:i + chunk_size], vocab_size)  # [c, V]
        t_lp = torch.log_softmax(t_logits.float(), -1)
        if t_lp.shape[1] != s_lp.shape[1]:
            raise ValueError(f"teacher has {t_lp.shape[1]} output rows, student {s_lp.shape[1]} -> pass vocab_size")
        out[1] -= t_lp.gather(1, y).sum().double()
        out[2] += divergence_from_logprobs(t_lp, s_lp, "forward_kl").sum().double()
        out[3] += (s_lp.argmax(-1) == t_lp.argmax(-1)).sum().double()
    return out


def finalize(sums: Sequence[float], has_teacher: bool) -> dict:
    """Token-weighted means of global sums:
    {student_ppl, student_nll, [teacher_ppl, teacher_nll, kl, agree], tokens}."""
    s_nll, t_nll, kl, agree, tokens = (float(x) for x in sums)
    n = max(tokens, 1.0)
    out = {"student_nll": s_nll / n, "student_ppl": math.exp(s_nll / n), "tokens": tokens}
    if has_teacher:
        out.update({"teacher_nll": t_nll / n, "teacher_ppl": math.exp(t_nll / n), "kl": kl / n, "agree": agree / n})
    return out


class TeacherCache:
    """sample_id -> the teacher's final hidden states at that sample's trained positions [n_i, Ht], on CPU.

    `ready` turns true after one complete evaluation has stored every sample of the rank's shard; from then on
    `evaluate` reads the cache instead of running the teacher (same eval batches every call, so same sample ids).
    """

    def __init__(self):
        self.hidden: dict[int, torch.Tensor] = {}
        self.ready = False

    def put(self, sample_ids: torch.Tensor, per_row_counts: list[int], hidden: torch.Tensor) -> None:
        for sid, piece in zip(sample_ids.tolist(), hidden.split(per_row_counts)):
            if sid >= 0:
                self.hidden[sid] = piece.detach().to("cpu", copy=True)

    def get(self, sample_ids: torch.Tensor, per_row_counts: list[int], device) -> torch.Tensor:
        pieces = []
        for sid, c in zip(sample_ids.tolist(), per_row_counts):
            if c == 0:
                continue
            if sid not in self.hidden:
                raise KeyError(f"eval sample {sid} is not in the teacher cache: the eval batches changed between "
                               "evaluations")
            pieces.append(self.hidden[sid])
        if not pieces:
            return torch.zeros(0, 0, device=device)
        return torch.cat(pieces).to(device, non_blocking=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.hidden.values())


@torch.no_grad()
def evaluate(batches: Iterable[dict], *, student_hidden_fn: HiddenFn, student_head: Head,
             teacher_hidden_fn: Optional[HiddenFn] = None, teacher_head: Optional[Head] = None,
             teacher_cache: Optional[TeacherCache] = None, vocab_size: Optional[int] = None, chunk_size: int = 1024,
             device: torch.device | str = "cpu",
             gather: Callable[[list], contextlib.AbstractContextManager] = _no_gather,
             all_reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum) -> dict:
    """Evaluate over this rank's batches (from `data.eval_batches`), all-reduce the sums, return `finalize`'s dict.

    Every rank must pass the same number of batches (eval_batches guarantees it): under ZeRO-3 each forward and
    each `gather` is a collective. `gather(params)` must make partitioned weights whole (engines.gathered); the heads'
    tensors are read only inside it.
    """
    device = torch.device(device)
    has_teacher = teacher_hidden_fn is not None or (teacher_cache is not None and teacher_cache.ready)
    use_cache = teacher_cache is not None and teacher_cache.ready
    sums = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=device)
    for mb in batches:
        ids = mb["input_ids"].to(device)
        mask = mb["attention_mask"].to(device)
        targets = mb["labels"][:, 1:].to(device)  # [B, S-1]: hidden[t] predicts labels[t+1]
        keep = targets != IGNORE_INDEX
        counts = keep.sum(1).tolist()
        t_h = None
        if has_teacher:
            if use_cache:
                t_h = teacher_cache.get(mb["sample_ids"], counts, device)
            else:
                t_h = teacher_hidden_fn(ids, mask)[:, :-1][keep]  # [N, Ht]
                if teacher_cache is not None:
                    teacher_cache.put(mb["sample_ids"], counts, t_h)
        s_h = student_hidden_fn(ids, mask)[:, :-1][keep]  # [N, Hs]
        params = student_head.params() + (teacher_head.params() if has_teacher else [])
        with gather(params):  # collective under ZeRO-3: every rank, every batch, even with no tokens
            sums += token_stats(s_h, student_head, targets[keep], teacher_hidden=t_h,
                                teacher_head=teacher_head if has_teacher else None, vocab_size=vocab_size,
                                chunk_size=chunk_size)
    if teacher_cache is not None and has_teacher:
        teacher_cache.ready = True
    all_reduce(sums)
    return finalize(sums.tolist(), has_teacher)


# ----------------------------------------------------------------------------------------------------------------
# Plain Hugging Face models (launch/eval.py, tests)
# ----------------------------------------------------------------------------------------------------------------

def hf_parts(model: torch.nn.Module) -> tuple[HiddenFn, Head]:
    """(hidden_fn, head) of a Hugging Face causal LM: the decoder's final hidden states, and its head."""
    from . import heads

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()

    def hidden_fn(input_ids, attention_mask):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    return hidden_fn, heads.of_model(model)


# ----------------------------------------------------------------------------------------------------------------
# Generations side by side
# ----------------------------------------------------------------------------------------------------------------

def prompts_from_dataset(dataset, n: int, text_prompt_tokens: int = 32) -> list[list[int]]:
    """Prompt token ids from the first n eval samples: everything before the first trained target (the
    instruction / user turn), or for plain text (trained from the start) the first `text_prompt_tokens` tokens."""
    prompts = []
    for i in range(min(n, len(dataset))):
        row = dataset[i]
        ids, labels = row["input_ids"], row["labels"]
        first = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), len(labels))
        cut = first if first > 1 else min(text_prompt_tokens, max(1, len(ids) // 2))
        prompts.append(list(ids[:cut]))
    return prompts


def prompts_from_file(path: str, tokenizer, fmt: str) -> list[list[int]]:
    """Prompts from a .txt (one per line, '\\n' escapes allowed) or .jsonl ({"prompt": str} or {"messages": [...]},
    rendered with the chat template and its generation prompt). A plain prompt is wrapped in the chat template when
    fmt is 'chat'; otherwise it is used verbatim."""
    out = []
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    for line in lines:
        if path.endswith(".jsonl"):
            rec = json.loads(line)
            if "messages" in rec:
                out.append(list(tokenizer.apply_chat_template(rec["messages"], tokenize=True,
                                                              add_generation_prompt=True, return_dict=False)))
                continue
            text = rec["prompt"]
        else:
            text = line.replace("\\n", "\n")
        if fmt == "chat":
            out.append(list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                          add_generation_prompt=True, return_dict=False)))
        else:
            out.append(tokenizer(text, add_special_tokens=True)["input_ids"])
    return out


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, temperature: float, seed: int, max_new_tokens: int,
             eos_token_id: Optional[int], pad_token_id: Optional[int]) -> list[int]:
    """Sampled continuation (token ids) with the global RNG seeded first: same model + prompt + seed -> same ids."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=dev)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                         top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def side_by_side(models: list[tuple[str, str]], prompts: list[list[int]], tokenizer, *,
                 temperatures: Sequence[float] = TEMPERATURES, seed: int = 0, max_new_tokens: int = 48,
                 device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """Generate from each (name, model_dir) in turn (one model in memory at a time) for every prompt and
    temperature. Seed for prompt i at temperature j: seed + 1000 * i + j, the same for every model, so the
    columns differ only by the model. Returns [{prompt, temperature, seed, outputs: {name: text}}]."""
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": tokenizer.decode(p), "temperature": t, "seed": seed + 1000 * i + j, "outputs": {}}
            for i, p in enumerate(prompts) for j, t in enumerate(temperatures)]
    for name, path in models:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     use_safetensors=True).to(device).eval()  # never a pickle
        k = 0
        for i, p in enumerate(prompts):
            for j, t in enumerate(temperatures):
                ids = generate(model, p, temperature=t, seed=seed + 1000 * i + j, max_new_tokens=max_new_tokens,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                rows[k]["outputs"][name] = tokenizer.decode(ids)
                k += 1
        del model
    return rows


def _fence(text: str) -> str:
    text = text.replace("```", "`\u200b``")
    return "```\n" + text + "\n```"


def write_generations_md(rows: list[dict], path: str, title: str = "Generations side by side") -> None:
    """Markdown: per prompt, the prompt then per temperature each model's output (fenced, verbatim)."""
    lines = [f"# {title}", "",
             "Sampled with the same seed per (prompt, temperature) for every model; top_k/top_p off.", ""]
    last_prompt = None
    n = 0
    for r in rows:
        if r["prompt"] != last_prompt:
            n += 1
            lines += [f"## Prompt {n}", "", _fence(r["prompt"]), ""]
            last_prompt = r["prompt"]
        lines += [f"### temperature {r['temperature']} (seed {r['seed']})", ""]
        for name, text in r["outputs"].items():
            lines += [f"**{name}**", "", _fence(text), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------

ROWS = (("student_ppl", "student perplexity", "{:.3f}"), ("teacher_ppl", "teacher perplexity", "{:.3f}"),
        ("kl", "KL(teacher || student) / token", "{:.4f}"), ("agree", "top-1 agreement", "{:.2%}"),
        ("tokens", "eval tokens", "{:.0f}"))


def markdown_table(columns: dict[str, dict]) -> str:
    """| metric | col1 | col2 |... from {column name: finalize() dict}; missing values shown as '-'."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, fmt in ROWS:
        if not any(key in c for c in columns.values()):
            continue
        cells = [fmt.format(columns[n][key]) if key in columns[n] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
