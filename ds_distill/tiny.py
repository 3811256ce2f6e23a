"""Embedded default: build, offline, tiny Qwen3-shaped teacher and student, a tokenizer and data in every format.

    python -m ds_distill.tiny --out assets/tiny

writes
    assets/tiny/tokenizer/           a byte-level BPE tokenizer trained on the Python standard library's sources,
                                     with Qwen's special tokens and a ChatML chat template
    assets/tiny/teacher/, student/   Qwen3 models from configs (random init), safetensors, tokenizer copied in;
                                     the teacher's vocabulary is padded further than the student's (as Qwen2-7B vs
                                     Qwen2-1.5B) so vocabulary reconciliation is exercised
    assets/tiny/data/{text,guanaco,instruction,chat}_{train,eval}.jsonl

The text comes from the standard library (present on any machine with Python): module sources for `text`, and
function docstrings turned into question/answer pairs for the three supervised formats. Everything is
deterministic for a given Python version.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def stdlib_files(limit: int | None = None) -> list[Path]:
    """Sorted .py files of the standard library (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    files += sorted(p for p in root.glob("*/*.py") if "test" not in p.parts[-2] and "site-packages" not in str(p))
    return files[:limit] if limit else files


def docstring_pairs(files: list[Path]) -> list[tuple[str, str]]:
    """(question, answer) pairs from function docstrings: 'What does mod.func do?' -> first paragraph."""
    pairs = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and 20 <= len(doc) <= 600:
                    answer = doc.split("\n\n")[0].strip().replace("\n", " ")
                    pairs.append((f"What does {f.stem}.{node.name} do?", answer))
    return pairs


def build_tokenizer(out_dir: str | Path, vocab_size: int = 1000, files: list[Path] | None = None):
    """Train a byte-level BPE on stdlib sources and save a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = files or stdlib_files(limit=120)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_model(out_dir: str | Path, tokenizer, *, hidden: int, layers: int, heads: int, kv_heads: int,
                intermediate: int, vocab_rows: int, tie: bool, seed: int, max_pos: int = 2048):
    """A randomly initialised Qwen3 causal LM saved as safetensors, with the tokenizer copied beside it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=vocab_rows, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=max_pos, tie_word_embeddings=tie,
                      rope_theta=10000.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_data(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200,
               seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write {format}_{train,eval}.jsonl; returns {format: (train_path, eval_path)}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    rng = random.Random(seed)
    # text: paragraphs of source code, split on blank lines, 200-1200 characters each
    paras = []
    for f in files[:400]:
        for block in f.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if 200 <= len(block) <= 1200:
                paras.append(block)
    rng.shuffle(paras)
    pairs = docstring_pairs(files)
    rng.shuffle(pairs)
    need = n_train + n_eval
    if len(paras) < need or len(pairs) < need:
        raise RuntimeError(f"not enough stdlib text: {len(paras)} paragraphs, {len(pairs)} docstrings < {need}")

    def split(rows):
        return rows[:n_train], rows[n_train:need]

    made = {}
    rows = {
        "text": [{"text": t} for t in paras[:need]],
        "guanaco": [{"text": f"### Human: {q} ### Assistant: {a}"} for q, a in pairs[:need]],
        "instruction": [{"instruction": q, "input": "", "output": a} for q, a in pairs[:need]],
        "chat": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                 for q, a in pairs[:need]],
    }
    for fmt, all_rows in rows.items():
        tr, ev = split(all_rows)
        tp, ep = out / f"{fmt}_train.jsonl", out / f"{fmt}_eval.jsonl"
        write_jsonl(tp, tr)
        write_jsonl(ep, ev)
        made[fmt] = (str(tp), str(ep))
    return made


TEACHER_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192)
STUDENT_SHAPE = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=96)


def build_all(out: str | Path, vocab_size: int = 1000) -> dict[str, str]:
    """Tokenizer, teacher (untied, rows padded to a multiple of 128), student (tied, rows padded to 64), data."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out / "tokenizer", vocab_size=vocab_size)
    n = len(tok)
    build_model(out / "teacher", tok, vocab_rows=(n + 127) // 128 * 128, tie=False, seed=1, **TEACHER_SHAPE)
    build_model(out / "student", tok, vocab_rows=(n + 63) // 64 * 64, tie=True, seed=2, **STUDENT_SHAPE)
    build_data(out / "data")
    return {"tokenizer": str(out / "tokenizer"), "teacher": str(out / "teacher"), "student": str(out / "student"),
            "data": str(out / "data")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/tiny", help="output directory (default: assets/tiny)")
    ap.add_argument("--vocab_size", type=int, default=1000, help="BPE vocabulary size of the tokenizer")
    args = ap.parse_args(argv)
    paths = build_all(args.out, args.vocab_size)
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
