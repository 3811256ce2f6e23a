"""Offline sequence-level KD: the teacher's completions for the config's prompts, written as a training file.

    deepspeed --num_gpus N launch/generate.py --config X.yaml --out FILE.jsonl [--section.key value ...]

Prompts are those on-policy training uses (generation.prompt_lengths: text -> the first on_policy.prompt_length
tokens, guanaco / instruction -> everything before the response) of every row of data.train_files; each is
completed by the teacher (teacher.path) with on_policy.max_new_tokens / temperature / top_p. The output is jsonl in
the config's data.format, to train on later like any data (data.train_files: [FILE.jsonl]):

    text         {"text": prompt + completion, "sample_id": i}
    guanaco      {"text": "### Human: ... ### Assistant:" + completion, "sample_id": i}
    instruction  {"text": "Instruction: ...\\nResponse: " + completion, "sample_id": i}  (the one-text-field form)

(text is decoded from token ids: re-tokenising it may merge tokens across the prompt / completion boundary.)
`chat` data is refused for now (its records would need the original messages).

Sharded and deterministic: rank r completes the rows whose sample id is r modulo the world size, one row at a time
with seed generation.sample_seed(train.seed, 0, 0, sample_id), so a row's completion depends on its sample id only
(not on the world size or batch). Resumable: each rank appends finished rows to FILE.parts/rank{r}.jsonl (flushed
per row); a restart skips every sample id found in any part (a torn last line is dropped); at the end rank 0 merges
the parts in sample-id order into FILE (written to FILE.partial, then renamed).
"""
from __future__ import annotations

import glob
import json
import os

from . import assembly, data, engines, generation
from .config import DistillConfig
from .errors import ConfigError

FORMATS = ("text", "guanaco", "instruction")


def _done_ids(parts_dir: str) -> set[int]:
    done: set[int] = set()
    for path in glob.glob(os.path.join(parts_dir, "rank*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(int(json.loads(line)["sample_id"]))
                except (ValueError, KeyError):
                    continue  # a line torn by a kill: the row is redone
    return done


def generate_dataset(cfg: DistillConfig, out: str) -> dict:
    """Write `out` (see the module docstring); returns {"rows": n, "generated": rows completed by this call}."""
    rank, world = assembly.start(cfg)
    problems = []
    if cfg.teacher.path is None:
        problems.append("teacher.path: launch/generate.py samples the teacher's completions -> set teacher.path")
    if cfg.data.format not in FORMATS:
        problems.append(f"data.format: '{cfg.data.format}' is not supported by launch/generate.py yet -> one of "
                        f"{', '.join(FORMATS)}")
    if problems:
        raise ConfigError(problems)
    dev = engines.device()
    dtype = engines.torch_dtype(engines.resolve_precision(cfg.train.precision))
    assembly.check_model_dirs(cfg)  # the same build functions as training (assembly.py)
    tokenizer = assembly.checked_tokenizer(cfg)
    dataset = assembly.train_dataset(cfg, tokenizer)
    teacher = assembly.load_teacher_model(cfg, dtype).to(dev).eval()
    op = cfg.on_policy
    settings = generation.SamplingSettings(
        max_new_tokens=op.max_new_tokens, temperature=op.temperature, top_p=op.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    parts = out + ".parts"
    if rank == 0:
        os.makedirs(parts, exist_ok=True)
    engines.barrier()
    own = os.path.join(parts, f"rank{rank}.jsonl")
    if os.path.exists(own):  # drop a line torn by a kill before appending after it
        with open(own, encoding="utf-8") as f:
            kept = [line for line in f if line.endswith("\n")]
        with open(own, "w", encoding="utf-8") as f:
            f.writelines(kept)
    engines.barrier()
    done = _done_ids(parts)
    mine = [i for i in range(len(dataset)) if int(dataset[i]["sample_id"]) % world == rank]
    generated = 0
    with open(own, "a", encoding="utf-8") as f:
        for i in mine:
            row = dataset[i]
            sid = int(row["sample_id"])
            if sid in done:
                continue
            mb = data.collate([row], tokenizer.pad_token_id)
            p = generation.prompt_lengths(mb, cfg.data.format, op.prompt_length)[0]
            prompt = row["input_ids"][:p]
            (completion,), _ = generation.sample(teacher, [prompt], settings,
                                                 generation.sample_seed(cfg.train.seed, 0, 0, sid), dev)
            if completion and completion[-1] == tokenizer.eos_token_id:
                completion = completion[:-1]  # the data pipeline appends its own end of sample
            text = tokenizer.decode(prompt, skip_special_tokens=False) + tokenizer.decode(completion)
            f.write(json.dumps({cfg.data.text_field: text, "sample_id": sid}, ensure_ascii=False) + "\n")
            f.flush()
            generated += 1
    engines.barrier()
    if rank == 0:
        rows: dict[int, str] = {}
        for path in sorted(glob.glob(os.path.join(parts, "rank*.jsonl"))):
            with open(path, encoding="utf-8") as pf:
                for line in pf:
                    try:
                        rows.setdefault(int(json.loads(line)["sample_id"]), line if line.endswith("\n") else line
                                        + "\n")
                    except (ValueError, KeyError):
                        continue
        with open(out + ".partial", "w", encoding="utf-8") as of:
            for sid in sorted(rows):
                of.write(rows[sid])
        os.replace(out + ".partial", out)
    engines.barrier()
    return {"rows": len(dataset), "generated": generated}

