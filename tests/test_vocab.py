"""ds_distill.vocab: tokenizer compatibility between teacher and student, lm_head row reconciliation."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ds_distill.errors import ModelError
from ds_distill.vocab import check_tokenizers_compatible, reconcile_vocab

WORDS = ["<unk>", "<pad>", "hello", "world", "the", "cat", "sat", "on", "mat", "."]


def word_level(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def bpe(vocab: dict[str, int], merges) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_same_tokenizer_is_accepted():
    vocab = {w: i for i, w in enumerate(WORDS)}
    check_tokenizers_compatible(word_level(vocab), word_level(dict(vocab)))
    merges = [("h", "e"), ("l", "l")]
    bvocab = {"<unk>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6}
    check_tokenizers_compatible(bpe(bvocab, merges), bpe(dict(bvocab), list(merges)))


def test_swapped_ids_are_refused_with_the_tokens_named():
    vocab = {w: i for i, w in enumerate(WORDS)}
    swapped = dict(vocab)
    swapped["cat"], swapped["mat"] = vocab["mat"], vocab["cat"]
    t, s = word_level(vocab), word_level(swapped)
    assert t("the cat").input_ids != s("the cat").input_ids  # the same text, different ids: KD would be garbage
    with pytest.raises(ModelError) as err:
        check_tokenizers_compatible(t, s)
    msg = str(err.value)
    assert "2 token(s) have different ids" in msg
    assert "'cat': teacher id 5 vs student id 8" in msg and "'mat'" in msg
    assert "loss.alpha: 0" in msg  # says how to proceed


def test_different_vocabularies_are_refused():
    merges = [("h", "e"), ("l", "l")]
    teacher = bpe({"<unk>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6}, merges)
    student = bpe({"<unk>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "lo": 6}, [("h", "e"), ("l", "o")])
    with pytest.raises(ModelError) as err:
        check_tokenizers_compatible(teacher, student)
    msg = str(err.value)
    assert "only in the teacher tokenizer ('ll' (id 6))" in msg
    assert "only in the student tokenizer ('lo' (id 6))" in msg


def test_added_special_token_counts_as_a_difference():
    vocab = {w: i for i, w in enumerate(WORDS)}
    t, s = word_level(vocab), word_level(vocab)
    s.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    with pytest.raises(ModelError, match=r"<\|im_end\|>"):
        check_tokenizers_compatible(t, s)


def test_reconcile_vocab():
    # Qwen2-7B (152,064 rows) teacher, Qwen2-1.5B (151,936 rows) student, 151,665 real tokens
    size, msg = reconcile_vocab(152064, 151936, 151665)
    assert size == 151665
    assert "\n" not in msg
    assert "teacher lm_head 152064 rows (399 padding rows masked)" in msg
    assert "student lm_head 151936 rows (271 padding rows masked)" in msg
    size, msg = reconcile_vocab(1000, 1000, 1000)
    assert size == 1000 and "all have 1000 tokens" in msg
    size, msg = reconcile_vocab(1024, 1000, 1000)
    assert size == 1000 and "teacher lm_head 1024 rows (24 padding rows masked)" in msg


def test_tokenizer_larger_than_a_model_is_refused():
    with pytest.raises(ModelError, match="student lm_head has only 151936 rows"):
        reconcile_vocab(152064, 151936, 152000)
    with pytest.raises(ModelError, match="teacher lm_head has only 900 rows"):
        reconcile_vocab(900, 1000, 950)
