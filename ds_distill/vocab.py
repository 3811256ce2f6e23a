"""Vocabulary checks between teacher and student: same tokenizer, and which lm_head rows are real.

Distillation compares the two models' distributions id by id, so both must map every real token to the same id.
Their lm_heads may still have different row counts (Qwen2-7B: 152,064 rows, Qwen2-1.5B: 151,936, for 151,665 real
tokens): rows at or beyond the tokenizer's vocabulary are padding, which the loss slices off in both models (it
never zero-pads, which would give padded ids probability).
"""
from __future__ import annotations

from .errors import ModelError

_SHOWN = 5  # differing tokens quoted in an error message


def check_tokenizers_compatible(teacher_tok, student_tok) -> None:
    """Raise ModelError unless both tokenizers map every token (added/special ones included) to the same id.

    The message counts and quotes the tokens that differ: present in only one tokenizer, or under different ids.
    """
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab == s_vocab:
        return
    only_t = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)
    only_s = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)
    moved = sorted((tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]), key=t_vocab.get)
    problems = []
    if moved:
        ex = ", ".join(f"{tok!r}: teacher id {t_vocab[tok]} vs student id {s_vocab[tok]}" for tok in moved[:_SHOWN])
        problems.append(f"{len(moved)} token(s) have different ids ({ex}{', ...' if len(moved) > _SHOWN else ''})")
    for name, only, vocab in (("teacher", only_t, t_vocab), ("student", only_s, s_vocab)):
        if only:
            ex = ", ".join(f"{tok!r} (id {vocab[tok]})" for tok in only[:_SHOWN])
            problems.append(f"{len(only)} token(s) only in the {name} tokenizer ({ex}"
                            f"{', ...' if len(only) > _SHOWN else ''})")
    raise ModelError(
        f"teacher and student tokenizers differ (teacher {len(t_vocab)} tokens, student {len(s_vocab)}): "
        + "; ".join(problems)
        + ". Token-level distillation compares the two distributions id by id -> use a teacher and a student from "
          "the same tokenizer family (e.g. Qwen2.5-7B -> Qwen2.5-0.5B), or train with loss.alpha: 0 (CE only).")


def reconcile_vocab(teacher_rows: int, student_rows: int, tokenizer_vocab: int) -> tuple[int, str]:
    """Return (vocab_size used by the loss, one-line message for the log).

    `tokenizer_vocab` is len(tokenizer) (added tokens included); rows beyond it are padding in either lm_head and
    get no probability. Raises ModelError when the tokenizer has more tokens than a model has rows.
    """
    for name, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < tokenizer_vocab:
            raise ModelError(
                f"the tokenizer has {tokenizer_vocab} tokens but the {name} lm_head has only {rows} rows: ids "
                f">= {rows} would have no logit -> use the tokenizer saved with the models (tokenizer_path), or "
                f"resize the {name}'s embeddings to at least {tokenizer_vocab}")
    if teacher_rows == student_rows == tokenizer_vocab:
        return tokenizer_vocab, f"vocab: tokenizer, teacher and student all have {tokenizer_vocab} tokens"
    parts = [f"{name} lm_head {rows} rows ({rows - tokenizer_vocab} padding rows masked)"
             if rows > tokenizer_vocab else f"{name} lm_head {rows} rows"
             for name, rows in (("teacher", teacher_rows), ("student", student_rows))]
    return tokenizer_vocab, (f"vocab: KD and CE over the tokenizer's {tokenizer_vocab} tokens; "
                             + ", ".join(parts))
