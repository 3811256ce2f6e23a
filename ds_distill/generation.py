"""On-policy distillation: the student samples completions, the teacher scores them with the step's exact loss.

The training step (trainer.train_step) calls `OnPolicy.prepare(micro_batches, step)` before the teacher source and
the student forward. It picks, seeded per step and identically on every rank, which micro-batches are on-policy
(on_policy.lmbda of them), keeps each of their rows' prompt, has a `Generator` sample a completion for each, and
returns micro-batches in the data pipeline's format with the completion as the trained part:

    input_ids  [prompt | completion (EOS included when the sample ended) | right padding]
    labels     -100 on the prompt and the padding, the completion's ids on the completion: nothing after EOS
    attention_mask over prompt + completion

Everything after that is the unchanged step: the teacher source scores the new rows, the loss is the configured
exact loss (any divergence; reverse KL is the usual on-policy choice), and the step normaliser counts the trained
tokens of all micro-batches of all ranks, i.e. the generated tokens.

Prompt of a row: data.format text -> its first on_policy.prompt_length tokens (at most all but one); guanaco /
instruction / chat -> everything before the first trained token (the response).

Sampling RNG. Micro-batch m of rank r at optimizer step s samples with torch's global generator seeded with
`sample_seed(train.seed, s, r, m)` (forked: the training RNG is untouched). The state of the sampler at every step is
therefore a function of the checkpointed step: a resumed run samples exactly what the uninterrupted run sampled, and
a separate process reproduces a step's completions with HF `generate` after `torch.manual_seed(sample_seed(...))`
on the same left-padded prompt batch (tests/test_on_policy.py does).

Generators (the `Generator` protocol: `sync()` once per step before sampling, `generate(prompts, seed)`):
- `ReplicaGenerator` (on_policy.generator: gathered): a plain, unsharded copy of the student on each rank, whose
  weights are refreshed from the ZeRO-3 shards once per step that samples (engines.copy_gathered: one all-gather of
  the parameters in groups, not one per layer per token). Sampling then has no collective at all, so a rank whose
  samples all ended stops at once. Costs one full student copy of memory per rank (launch/plan.py's arithmetic: the
  student's weights in the training dtype). DeepSpeed's hybrid engine applies the same idea.
- Sequence-level KD (on_policy.seq_kd): the teacher samples, with a `ReplicaGenerator` copied once from its ZeRO-3
  shards (teacher.sharding zero3; its weights never change) or directly (`PlainGenerator`, teacher.sharding
  replicate).
- `EngineGenerator` (on_policy.generator: engine): the sampling loop through the ZeRO-3 student itself, whose hooks
  all-gather every layer for every token. Every rank runs exactly max_new_tokens decode forwards (ranks whose
  samples ended keep stepping), so the collectives stay symmetric. For a student too large to copy; the naive
  baseline of benchmarks/on_policy.py.
A vLLM engine fits the same protocol: `sync()` loads the gathered weights into it, `generate()` samples.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Callable, Optional, Protocol

import torch

from . import engines, models

IGNORE_INDEX = -100
_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """The documented sampling seed of micro-batch `micro_batch` of rank `rank` at optimizer step `step`."""
    return ((((int(seed) * 1_000_003 + int(step)) * 10_007 + int(rank)) * 101 + int(micro_batch)) * 2_654_435_761) \
        & _MASK64


def choose_micro_batches(seed: int, step: int, n: int, lmbda: float, seq_kd: float = 0.0) -> list[str]:
    """For each of a step's `n` micro-batches: 'student' (probability lmbda), 'teacher' (seq_kd) or 'data'.
    Seeded by (seed, step) only, so every rank takes the same decision (the generators' collectives must match)."""
    if lmbda <= 0 and seq_kd <= 0:
        return ["data"] * n
    rng = random.Random(int(seed) * 7_919 + int(step))
    out = []
    for _ in range(n):
        u = rng.random()
        out.append("student" if u < lmbda else "teacher" if u < lmbda + seq_kd else "data")
    return out


def process_logits(logits: torch.Tensor, *, vocab_size: int, temperature: float, top_p: float) -> torch.Tensor:
    """[B, rows] fp32 next-token logits -> sampling scores: rows >= vocab_size (lm_head padding) at -inf, then
    temperature, then nucleus (top-p) filtering exactly as transformers' TopPLogitsWarper (min_tokens_to_keep 1)."""
    if logits.shape[-1] > vocab_size:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = 0
        remove = remove.scatter(1, sorted_indices, remove)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@dataclasses.dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: int
    pad_token_id: int
    vocab_size: int


def left_pad(prompts: list[list[int]], pad_token_id: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [B, P], attention_mask [B, P]) left-padded, as HF generate expects a batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(dev), mask.to(dev)


@torch.no_grad()
def sample(model, prompts: list[list[int]], s: SamplingSettings, seed: int, dev: torch.device, *,
           run_to_max: bool = False) -> tuple[list[list[int]], int]:
    """Batched sampling with a KV cache (the model's own DynamicCache). Returns (completions: per prompt the sampled
    ids, ending with EOS when the sample ended before max_new_tokens; decode forwards run).

    Draws one multinomial over the whole batch per new token from torch's global generator seeded with `seed`
    (forked, restored afterwards), as HF generate does, so HF generate with the same seed on the same left-padded
    batch samples the same ids. Finished rows keep being fed the pad token and are ignored. `run_to_max`: run all
    max_new_tokens decode forwards even when every row has ended (collectives inside the forward: every rank must
    make the same calls).
    """
    from transformers import DynamicCache

    ids, mask = left_pad(prompts, s.pad_token_id, dev)
    B = ids.shape[0]
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        cache = DynamicCache(config=model.config)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        tokens = []
        forwards = 1
        for t in range(s.max_new_tokens):
            logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
            scores = process_logits(logits, vocab_size=s.vocab_size, temperature=s.temperature, top_p=s.top_p)
            nxt = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, s.pad_token_id), nxt)
            tokens.append(nxt)
            done = done | (nxt == s.eos_token_id)
            if t == s.max_new_tokens - 1 or (not run_to_max and bool(done.all())):  # host sync: once per token
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
            forwards += 1
        if run_to_max:  # the remaining decode forwards of a rank whose rows all ended early: same calls everywhere
            for _ in range(s.max_new_tokens - forwards):
                mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
                pos = pos[:, -1:] + 1
                out = model(input_ids=torch.full((B, 1), s.pad_token_id, dtype=torch.long, device=dev),
                            attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
                forwards += 1
    gen = torch.stack(tokens, dim=1).tolist()  # [B, <= max_new_tokens]
    completions = []
    for row in gen:
        end = row.index(s.eos_token_id) + 1 if s.eos_token_id in row else len(row)
        completions.append(row[:end])
    return completions, forwards


class Generator(Protocol):
    """What on-policy training asks of a sampler (a vLLM engine can implement it: sync = load the weights)."""

    def sync(self) -> None:
        """Make the sampler's weights the student's current ones (collective: every rank calls it once per step
        that samples)."""

    def generate(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], int]:
        """(completions, decode forwards) for `prompts`, sampled with `seed` (see `sample`)."""


class ReplicaGenerator:
    """A plain unsharded copy of a model (no ZeRO hooks), refreshed by `copy_weights(replica)` (engines.py: gathers
    the ZeRO-3 shards, one group of parameters at a time) once per step that samples; `frozen` (the teacher, whose
    weights never change): only the first time."""

    def __init__(self, build_replica: Callable[[], torch.nn.Module], copy_weights: Callable[[torch.nn.Module], None],
                 settings: SamplingSettings, dev: torch.device, frozen: bool = False):
        self.replica = build_replica().to(dev).eval()
        for p in self.replica.parameters():
            p.requires_grad_(False)
        self.copy_weights, self.settings, self.dev = copy_weights, settings, dev
        self.frozen, self.synced = frozen, False

    def sync(self) -> None:
        if not (self.frozen and self.synced):
            self.copy_weights(self.replica)
        self.synced = True

    def generate(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], int]:
        return sample(self.replica, prompts, self.settings, seed, self.dev)


class PlainGenerator:
    """A model already whole on this rank, sampled directly in eval mode (no dropout), no collective: the replicated
    teacher (teacher.sharding: replicate) or a student below ZeRO stage 3 (its weights are whole on every rank).
    `after` runs once after sampling."""

    run_to_max = False  # every rank runs max_new_tokens decode forwards (needed when sampling makes collectives)

    def __init__(self, model: torch.nn.Module, settings: SamplingSettings, dev: torch.device,
                 after: Optional[Callable[[], None]] = None):
        self.model, self.settings, self.dev, self.after = model, settings, dev, after

    def sync(self) -> None:
        pass

    def generate(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], int]:
        was_training = self.model.training
        self.model.eval()
        try:
            return sample(self.model, prompts, self.settings, seed, self.dev, run_to_max=self.run_to_max)
        finally:
            self.model.train(was_training)
            if self.after is not None:
                self.after()


class EngineGenerator(PlainGenerator):
    """Sampling through the ZeRO-3 student (`model`: the HF model under the engine's hooks), every layer gathered
    for every token; every rank runs max_new_tokens decode forwards. `after` runs once after sampling (the engine
    forgets the trace of these forwards: engines.forget_forward_trace)."""

    run_to_max = True


def prompt_lengths(mb: dict, fmt: str, prompt_length: int) -> list[int]:
    """Prompt length of each row of a (right-padded, unpacked) micro-batch: see the module docstring."""
    n_real = mb["attention_mask"].sum(dim=1).tolist()
    out = []
    for i, n in enumerate(n_real):
        n = int(n)
        if fmt == "text":
            out.append(max(1, min(prompt_length, n - 1)))
        else:
            trained = (mb["labels"][i, :n] != IGNORE_INDEX).nonzero()
            first = int(trained[0]) if trained.numel() else n
            out.append(max(1, first))
    return out


def completion_batch(mb: dict, prompts: list[list[int]], completions: list[list[int]], pad_token_id: int) -> dict:
    """The trained micro-batch: prompt + completion per row, right-padded; labels only on the completion."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(c, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_ids": mb["sample_ids"].clone()}


# logged per step (summed over ranks by the step's one all-reduce; see OnPolicy.stats)
STAT_KEYS = ("onpolicy/micro_batches", "onpolicy/all_micro_batches", "onpolicy/completions",
             "onpolicy/generated_tokens", "onpolicy/gen_seconds", "onpolicy/decode_forwards",
             "onpolicy/teacher_micro_batches")


class OnPolicy:
    """Builds a step's on-policy micro-batches (see the module docstring). `generator` samples for the student
    ('student' micro-batches); `teacher_generator` (optional) for the teacher ('teacher': sequence-level KD)."""

    def __init__(self, *, lmbda: float, seq_kd: float, start_step: int, seed: int, rank: int, fmt: str,
                 prompt_length: int, pad_token_id: int, generator: Generator,
                 teacher_generator: Optional[Generator] = None, record: Optional[Callable[[dict], None]] = None):
        self.lmbda, self.seq_kd, self.start_step, self.seed, self.rank = lmbda, seq_kd, start_step, seed, rank
        self.fmt, self.prompt_length, self.pad_token_id = fmt, prompt_length, pad_token_id
        self.generators = {"student": generator, "teacher": teacher_generator}
        self.record = record  # called with each sampled micro-batch's prompts, completions and seed (samples file)

    def prepare(self, micro_batches: list[dict], step: int) -> tuple[list[dict], list[float]]:
        """(the step's micro-batches, completions in place of the data's where chosen; stats in STAT_KEYS order).
        Steps up to on_policy.start_step train on the data (off-policy warm start)."""
        n = len(micro_batches)
        kinds = (choose_micro_batches(self.seed, step, n, self.lmbda, self.seq_kd) if step > self.start_step
                 else ["data"] * n)
        stats = [0.0] * len(STAT_KEYS)
        stats[1] = float(n)
        synced = set()
        out = []
        t0 = time.perf_counter()
        for m, (mb, kind) in enumerate(zip(micro_batches, kinds)):
            if kind == "data":
                out.append(mb)
                continue
            gen = self.generators[kind]
            if kind not in synced:  # collective, the same on every rank (kinds are chosen per step, not per rank)
                gen.sync()
                synced.add(kind)
            lengths = prompt_lengths(mb, self.fmt, self.prompt_length)
            prompts = [mb["input_ids"][i, :p].tolist() for i, p in enumerate(lengths)]
            seed = sample_seed(self.seed, step, self.rank, m)
            completions, forwards = gen.generate(prompts, seed)
            out.append(completion_batch(mb, prompts, completions, self.pad_token_id))
            stats[0 if kind == "student" else 6] += 1
            stats[2] += len(completions)
            stats[3] += sum(len(c) for c in completions)
            stats[5] += forwards
            if self.record is not None:
                self.record({"step": step, "rank": self.rank, "micro_batch": m, "kind": kind, "seed": seed,
                             "prompts": prompts, "completions": completions})
        stats[4] = time.perf_counter() - t0 if stats[0] + stats[6] else 0.0
        return out, stats


def step_stats(reduced: dict, world_size: int) -> dict:
    """Logged on-policy metrics from the step's summed STAT_KEYS."""
    mbs, all_mbs = reduced["onpolicy/micro_batches"], max(reduced["onpolicy/all_micro_batches"], 1.0)
    seconds = reduced["onpolicy/gen_seconds"] / max(world_size, 1)  # mean over ranks
    tokens = reduced["onpolicy/generated_tokens"]
    return {"onpolicy/frac": mbs / all_mbs,  # student-sampled
            "onpolicy/seq_kd_frac": reduced["onpolicy/teacher_micro_batches"] / all_mbs,  # teacher-sampled
            "onpolicy/generated_tokens": tokens,
            "onpolicy/completion_len": tokens / max(reduced["onpolicy/completions"], 1.0),
            "onpolicy/gen_seconds": seconds,
            "onpolicy/gen_tokens_per_sec": tokens / seconds if seconds > 0 else 0.0,
            "onpolicy/decode_forwards": reduced["onpolicy/decode_forwards"]}  # sampler forwards, all ranks


class SampleWriter:
    """on_policy.samples_every: each sampled micro-batch of every `every`-th step appended to
    `directory`/step_{step:08d}_rank{rank}.jsonl (step, rank, micro_batch, kind, seed, prompts, completions)."""

    def __init__(self, directory: str, every: int):
        self.directory, self.every = directory, every
        self.started: set = set()  # files this process has begun (a step redone after a resume is rewritten)

    def __call__(self, row: dict) -> None:
        import json
        import os

        if row["step"] % self.every:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"step_{row['step']:08d}_rank{row['rank']}.jsonl")
        mode = "a" if path in self.started else "w"
        self.started.add(path)
        with open(path, mode) as f:
            f.write(json.dumps(row) + "\n")


@torch.no_grad()
def own_sample_kl(student, teacher, prompts: list[list[int]], settings: SamplingSettings, seed: int,
                  dev: torch.device, batch_size: int = 16) -> dict:
    """The teacher-scored KL on the student's own samples: the student samples a completion per prompt (`sample`,
    seed + batch index), then at every completion position (EOS included) the exact reverse KL over the vocabulary,
    KL(student || teacher) of the next-token distributions at T = 1, averaged over all completion tokens.
    Plain HF models in one process (launch/demo.py). Returns {"kl", "tokens", "completion_len"}."""
    total, tokens, n = 0.0, 0, 0
    V = settings.vocab_size
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        completions, _ = sample(student, batch, settings, seed + b, dev)
        rows = [p + c for p, c in zip(batch, completions)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), settings.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        lq = torch.log_softmax(student(input_ids=ids, attention_mask=mask).logits[..., :V].float(), -1)
        lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[..., :V].float(), -1)
        kl = (lq.exp() * (lq - lp)).sum(-1)  # [B, S]: position t predicts token t + 1
        for i, (p, c) in enumerate(zip(batch, completions)):
            total += float(kl[i, len(p) - 1:len(p) - 1 + len(c)].sum())
            tokens += len(c)
            n += 1
    return {"kl": total / max(tokens, 1), "tokens": tokens, "completion_len": tokens / max(n, 1)}


def build_on_policy(cfg, rank: int, tokenizer, student_engine, vocab_size: int,
                    dtype: torch.dtype, teacher_engine=None) -> Optional["OnPolicy"]:
    """on_policy.lmbda or seq_kd > 0 (cfg: a DistillConfig): the step's batch builder with the configured generators,
    built by trainer.build once the engines exist; None when both are 0 (today's training, unchanged)."""
    op = cfg.on_policy
    if op.lmbda <= 0 and op.seq_kd <= 0:
        return None
    dev = engines.device()
    settings = SamplingSettings(
        max_new_tokens=op.max_new_tokens, temperature=op.temperature, top_p=op.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size)
    hf_model = student_engine.module.model
    teacher_gen = None
    if op.seq_kd > 0:  # the teacher samples: its weights never change, so its copy is gathered once
        t_model = teacher_engine.module.model
        if isinstance(teacher_engine, engines.ReplicatedTeacher):
            teacher_gen = PlainGenerator(t_model, settings, dev)
        else:
            teacher_gen = ReplicaGenerator(lambda: models.unsharded_copy(t_model, dev, dtype),
                                                      lambda replica: engines.copy_gathered(t_model, replica),
                                                      settings, dev, frozen=True)
    if op.lmbda <= 0:
        gen = None
    elif not any(engines.is_partitioned(p) for p in hf_model.parameters()):  # ZeRO 0-2: already whole here
        gen = PlainGenerator(hf_model, settings, dev)
    elif op.generator == "gathered":
        gen = ReplicaGenerator(lambda: models.unsharded_copy(hf_model, dev, dtype),
                                          lambda replica: engines.copy_gathered(hf_model, replica), settings, dev)
    else:
        gen = EngineGenerator(hf_model, settings, dev,
                                         after=lambda: engines.forget_forward_trace(student_engine))
    record = (SampleWriter(os.path.join(cfg.output_dir, "onpolicy_samples"), op.samples_every)
              if op.samples_every else None)
    return OnPolicy(lmbda=op.lmbda, seq_kd=op.seq_kd, start_step=op.start_step, seed=cfg.train.seed,
                               rank=rank, fmt=cfg.data.format, prompt_length=op.prompt_length,
                               pad_token_id=tokenizer.pad_token_id, generator=gen, teacher_generator=teacher_gen,
                               record=record)


def describe_on_policy(cfg) -> str:
    op = cfg.on_policy
    return (f"on-policy: {op.lmbda:.0%} of the micro-batches sampled by the student, {op.seq_kd:.0%} by the teacher, "
            f"after step {op.start_step} (generator: {op.generator}, max_new_tokens {op.max_new_tokens}, temperature "
            f"{op.temperature}, top_p {op.top_p}), scored by the teacher with loss.divergence {cfg.loss.divergence}")
