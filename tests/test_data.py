"""Data pipeline: formats and loss masks against hand-built expectations, bad input, sharded streams.

Expected token ids are written as the concatenation of the pieces the format defines (prompt untrained, response
trained, eos), each encoded on its own with the test tokenizer, so a mask that is off by one token fails.
"""
from __future__ import annotations

import itertools
import json
import logging
import os

import datasets
import pytest
import torch

from ds_distill.data import IGNORE_INDEX, MicroBatchStream, build_dataset, eval_batches
from ds_distill.errors import DataError

M = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from ds_distill.tiny import build_tokenizer
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def enc(tok, s: str) -> list[int]:
    return tok(s, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def masked(ids):
    return [M] * len(ids)


# ---------------------------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------------------------

def test_text_every_token_trained_plus_eos(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "def f(x):\n    return x"}, {"text": "import os"}])
    ds = build_dataset([f], "text", tok, max_length=64)
    assert sorted(ds.column_names) == ["input_ids", "labels", "sample_id"]
    want = enc(tok, "def f(x):\n    return x") + [tok.eos_token_id]
    assert ds[0]["input_ids"] == want
    assert ds[0]["labels"] == want
    assert ds["sample_id"] == [0, 1]
    assert tok.eos_token == "<|im_end|>"


def test_guanaco_trains_only_assistant_span(tok, tmp_path):
    text = "### Human: What is 2+2? ### Assistant: It is 4."
    f = write_jsonl(tmp_path / "g.jsonl", [{"text": text}])
    r = build_dataset([f], "guanaco", tok, max_length=64)[0]
    prompt, answer = enc(tok, "### Human: What is 2+2? ### Assistant: "), enc(tok, "It is 4.")
    eos = tok.eos_token_id
    assert r["input_ids"] == prompt + answer + [eos]
    assert r["labels"] == masked(prompt) + answer + [eos]
    assert tok.decode([t for t in r["labels"] if t != M]) == "It is 4.<|im_end|>"


def test_guanaco_multi_turn_trains_every_assistant_turn_through_end_of_turn(tok, tmp_path):
    text = "### Human: Hi ### Assistant: Hello. ### Human: Sum 1 and 2 ### Assistant: 3"
    f = write_jsonl(tmp_path / "g.jsonl", [{"text": text}])
    r = build_dataset([f], "guanaco", tok, max_length=128)[0]
    p1 = enc(tok, "### Human: Hi ### Assistant: ")
    a1 = enc(tok, "Hello. ### Human:")           # first turn ends with the next '### Human:' marker (stop string)
    p2 = enc(tok, " Sum 1 and 2 ### Assistant: ")
    a2 = enc(tok, "3")
    eos = tok.eos_token_id
    assert r["input_ids"] == p1 + a1 + p2 + a2 + [eos]
    assert r["labels"] == masked(p1) + a1 + masked(p2) + a2 + [eos]


def test_guanaco_text_field_is_used(tok, tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"content": "### Human: q ### Assistant: a"}])
    r = build_dataset([f], "guanaco", tok, max_length=64, text_field="content")[0]
    assert tok.decode([t for t in r["labels"] if t != M]) == "a<|im_end|>"


def test_instruction_without_input(tok, tmp_path):
    f = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "What is 2+2?", "input": "", "output": "4"}])
    r = build_dataset([f], "instruction", tok, max_length=64)[0]
    prompt = enc(tok, "Instruction: What is 2+2?\nResponse: ")
    resp = enc(tok, "4") + [tok.eos_token_id]
    assert r["input_ids"] == prompt + resp
    assert r["labels"] == masked(prompt) + resp


def test_instruction_with_input_and_absent_input_key(tok, tmp_path):
    f = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
                                           {"instruction": "Say hi.", "output": "hi"}])
    ds = build_dataset([f], "instruction", tok, max_length=64)
    prompt = enc(tok, "Instruction: Add.\nInput: 2 and 3\nResponse: ")
    resp = enc(tok, "5") + [tok.eos_token_id]
    assert ds[0]["input_ids"] == prompt + resp
    assert ds[0]["labels"] == masked(prompt) + resp
    prompt2 = enc(tok, "Instruction: Say hi.\nResponse: ")
    assert ds[1]["labels"] == masked(prompt2) + enc(tok, "hi") + [tok.eos_token_id]


def test_instruction_as_one_text_field(tok, tmp_path):
    f = write_jsonl(tmp_path / "i.jsonl", [{"text": "Instruction: What is 2+2?\nResponse: 4"}])
    r = build_dataset([f], "instruction", tok, max_length=64)[0]
    prompt = enc(tok, "Instruction: What is 2+2?\nResponse: ")
    assert r["input_ids"] == prompt + enc(tok, "4") + [tok.eos_token_id]
    assert r["labels"] == masked(prompt) + enc(tok, "4") + [tok.eos_token_id]


def test_chat_trains_assistant_content_and_im_end_only(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6"}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    r = build_dataset([f], "chat", tok, max_length=256)[0]
    end = [tok.convert_tokens_to_ids("<|im_end|>")]
    u1 = enc(tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                  "<|im_start|>assistant\n")
    a1 = enc(tok, "It is 4.") + end
    u2 = enc(tok, "\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n")
    a2 = enc(tok, "6") + end
    u3 = enc(tok, "\n")
    assert r["input_ids"] == u1 + a1 + u2 + a2 + u3
    assert r["labels"] == masked(u1) + a1 + masked(u2) + a2 + masked(u3)
    # the whole sequence is exactly what the chat template tokenizes to
    assert r["input_ids"] == enc(tok, tok.apply_chat_template(msgs, tokenize=False))


def test_chat_trains_empty_assistant_end_token(tok, tmp_path):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    r = build_dataset([f], "chat", tok, max_length=64)[0]
    assert [t for t in r["labels"] if t != M] == [tok.convert_tokens_to_ids("<|im_end|>")]


# ---------------------------------------------------------------------------------------------------------------
# truncation and dropping
# ---------------------------------------------------------------------------------------------------------------

def test_truncation_keeps_first_max_length_tokens(tok, tmp_path):
    text = "alpha beta gamma delta epsilon zeta eta theta"
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": text}])
    r = build_dataset([f], "text", tok, max_length=5)[0]
    assert r["input_ids"] == enc(tok, text)[:5]
    assert r["labels"] == r["input_ids"]


def test_sample_fully_masked_after_truncation_is_dropped_and_logged(tok, tmp_path, caplog):
    long_q = "word " * 40
    f = write_jsonl(tmp_path / "i.jsonl", [{"instruction": long_q, "output": "a"},
                                           {"instruction": "short", "output": "b"}])
    short = len(enc(tok, "Instruction: short\nResponse: ")) + 2
    assert len(enc(tok, f"Instruction: {long_q}\nResponse: ")) > short
    with caplog.at_level(logging.WARNING, logger="ds_distill.data"):
        ds = build_dataset([f], "instruction", tok, max_length=short)
    assert ds["sample_id"] == [1]  # stable ids: the survivor keeps its row index
    assert "dropped 1 of 2" in caplog.text and "too_long: 1" in caplog.text


def test_every_sample_masked_raises_naming_max_length(tok, tmp_path):
    f = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "word " * 40, "output": "a"}] * 3)
    with pytest.raises(DataError, match=r"data\.max_length") as e:
        build_dataset([f], "instruction", tok, max_length=8)
    assert "raise data.max_length" in str(e.value) and "i.jsonl" in str(e.value)


def test_no_assistant_turn_anywhere_raises_naming_format(tok, tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"text": "just some text"}])
    with pytest.raises(DataError, match=r"data\.format"):
        build_dataset([f], "guanaco", tok, max_length=64)


def test_empty_text_document_is_dropped(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}, {"text": "x"}])
    ds = build_dataset([f], "text", tok, max_length=2)
    assert ds["sample_id"] == [1]  # the empty document is dropped


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------

def test_missing_text_field_names_field_record_file_and_alternatives(tok, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"text": "b"}, {"content": "c", "n": 1}])
    with pytest.raises(DataError) as e:
        build_dataset([f], "text", tok, max_length=16)
    msg = str(e.value)
    assert msg.startswith("data.text_field: 'text'") and "record 3 of train.jsonl" in msg and "['content']" in msg


@pytest.mark.parametrize("fmt,row,key", [
    ("instruction", {"instruction": "q"}, "'output'"),
    ("chat", {"text": "hello"}, "'messages'"),
    ("guanaco", {"prompt": "x"}, "'text'"),
])
def test_missing_format_field_names_key_and_file(tok, tmp_path, fmt, row, key):
    f = write_jsonl(tmp_path / "data_x.jsonl", [row])
    with pytest.raises(DataError) as e:
        build_dataset([f], fmt, tok, max_length=16)
    assert key in str(e.value) and "data_x.jsonl" in str(e.value)


def test_empty_file_raises(tok, tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        build_dataset([str(p)], "text", tok, max_length=16)


def test_missing_file_and_bad_extension(tok, tmp_path):
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        build_dataset([str(tmp_path / "nope.jsonl")], "text", tok, max_length=16)
    p = tmp_path / "d.csv"
    p.write_text("text\na\n")
    with pytest.raises(DataError, match="unsupported extension"):
        build_dataset([str(p)], "text", tok, max_length=16)


def test_invalid_json_line_names_line_and_file(tok, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 of bad.jsonl"):
        build_dataset([str(p)], "text", tok, max_length=16)


def test_chat_template_that_rewrites_content_is_a_data_error(tok, tmp_path):
    import copy
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = tok.chat_template.replace("message['content']", "message['content'] | upper")
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "abc"}]}])
    with pytest.raises(DataError, match="record 1 of c.jsonl"):
        build_dataset([f], "chat", tok2, max_length=64)


def test_chat_template_with_think_block_masks_it_and_finds_content_after_prompt(tok, tmp_path):
    import copy
    tok2 = copy.deepcopy(tok)
    # Qwen3-like: the last assistant turn gets an empty think block the generation prompt does not have
    tok2.chat_template = tok.chat_template.replace(
        "'\n' + message['content']",
        "'\n' + ('<think>\n\n</think>\n\n' if (loop.last and message['role'] == 'assistant') else '') "
        "+ message['content']")
    msgs = [{"role": "user", "content": "Is it yes?"}, {"role": "assistant", "content": "yes"}]
    rendered = tok2.apply_chat_template(msgs, tokenize=False)
    assert "<think>" in rendered
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    r = build_dataset([f], "chat", tok2, max_length=128)[0]
    assert r["input_ids"] == enc(tok, rendered)
    assert tok.decode([t for t in r["labels"] if t != M]) == "yes<|im_end|>"
    # the trained tokens are the last ones before the final newline (not the 'yes' of the question)
    n_tr = sum(t != M for t in r["labels"])
    assert all(t == M for t in r["labels"][:-(n_tr + 1)])


def test_unknown_format(tok, tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="data.format"):
        build_dataset([f], "alpaca", tok, max_length=16)


# ---------------------------------------------------------------------------------------------------------------
# file types, multiple files, no files written
# ---------------------------------------------------------------------------------------------------------------

def test_txt_parquet_json_match_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    lines = ["first line", "second line", "third"]
    jl = write_jsonl(tmp_path / "a.jsonl", [{"text": s} for s in lines])
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": lines}), tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"text": s} for s in lines]))
    ref = build_dataset([jl], "text", tok, max_length=32).to_dict()
    for ext in ("txt", "parquet", "json"):
        assert build_dataset([str(tmp_path / f"a.{ext}")], "text", tok, max_length=32).to_dict() == ref, ext


def test_json_wrapped_records_and_single_conversation(tok, tmp_path):
    (tmp_path / "w.json").write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert len(build_dataset([str(tmp_path / "w.json")], "text", tok, max_length=8)) == 2
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    (tmp_path / "one.json").write_text(json.dumps({"messages": msgs}))
    assert len(build_dataset([str(tmp_path / "one.json")], "chat", tok, max_length=64)) == 1


def test_txt_blank_lines_dropped_ids_are_line_indices(tok, tmp_path):
    (tmp_path / "a.txt").write_text("one\n\nthree\n")
    ds = build_dataset([str(tmp_path / "a.txt")], "text", tok, max_length=32)
    assert ds["sample_id"] == [0, 2]
    assert ds[1]["input_ids"] == enc(tok, "three") + [tok.eos_token_id]


def test_chat_from_parquet(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({"messages": [msgs]}), tmp_path / "c.parquet")
    r = build_dataset([str(tmp_path / "c.parquet")], "chat", tok, max_length=64)[0]
    assert tok.decode([t for t in r["labels"] if t != M]) == "a<|im_end|>"


def test_sample_ids_are_global_over_files_and_nothing_written(tok, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    a = write_jsonl(d / "a.jsonl", [{"text": "a"}, {"text": "b"}])
    b = write_jsonl(d / "b.jsonl", [{"text": "c"}])
    before = sorted(os.listdir(d))
    ds = build_dataset([a, b], "text", tok, max_length=8)
    assert ds["sample_id"] == [0, 1, 2]
    assert ds[2]["input_ids"] == enc(tok, "c") + [tok.eos_token_id]
    assert sorted(os.listdir(d)) == before
    assert ds.cache_files == []


def test_tiny_assets_all_formats_train_the_answers_only(tok, tiny_assets):
    """The data `python -m ds_distill.tiny` ships (what the demo-size runs and the tests train on)."""
    root = tiny_assets["data"]
    for fmt in ("guanaco", "instruction", "chat"):
        ds = build_dataset([os.path.join(root, f"{fmt}_eval.jsonl")], fmt, tok, max_length=64)
        assert len(ds) > 0
        r = ds[0]
        trained = tok.decode([t for t in r["labels"] if t != M])
        assert trained.endswith("<|im_end|>") and "What does" not in trained, fmt


# ---------------------------------------------------------------------------------------------------------------
# streams
# ---------------------------------------------------------------------------------------------------------------

def toy(n: int) -> datasets.Dataset:
    """Row i: i+1 tokens valued 1000+i; labels mask the first token."""
    ids = [[1000 + i] * (1 + i % 4) for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": [[M] + x[1:] for x in ids],
                                       "sample_id": list(range(n))})


def take(stream, k):
    return [next(stream) for _ in range(k)]


def stream(ds, rank=0, ws=1, b=2, seed=7, k=0):
    return MicroBatchStream(ds, rank=rank, world_size=ws, micro_batch_size=b, seed=seed, pad_token_id=0,
                            samples_consumed=k)


def test_resume_equals_uninterrupted():
    ds = toy(11)
    for rank in (0, 1):
        full = take(stream(ds, rank, 2, b=3), 12)
        for j in (0, 1, 2, 5, 7):
            s = stream(ds, rank, 2, b=3)
            take(s, j)
            state = s.state_dict()
            assert state["samples_consumed"] == 3 * j
            resumed = stream(ds, rank, 2, b=3, k=state["samples_consumed"])
            again = stream(ds, rank, 2, b=3)
            again.load_state_dict(state)
            for x, y, z in zip(full[j:], take(resumed, 12 - j), take(again, 12 - j)):
                for key in x:
                    assert torch.equal(x[key], y[key]) and torch.equal(x[key], z[key])


def test_two_ranks_disjoint_and_cover_each_epoch():
    n = 10
    ds = toy(n)
    for epoch in range(3):
        seen = []
        for rank in (0, 1):
            s = stream(ds, rank, 2, b=1, k=5 * epoch)
            ids = [int(x["sample_ids"][0]) for x in take(s, 5)]
            assert s.state_dict()["epoch"] == epoch + 1
            seen.append(ids)
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))


def test_different_shard_lengths_yield_forever_and_each_shard_is_a_permutation():
    ds = toy(5)  # rank 0: 3 rows per epoch, rank 1: 2
    s0, s1 = stream(ds, 0, 2, b=2), stream(ds, 1, 2, b=2)
    b0, b1 = take(s0, 30), take(s1, 30)  # 60 rows each: 20 epochs vs 30 epochs, same number of batches
    assert len(b0) == len(b1) == 30 and all(x["input_ids"].shape[0] == 2 for x in b0 + b1)
    r0 = [int(i) for x in b0 for i in x["sample_ids"]]
    r1 = [int(i) for x in b1 for i in x["sample_ids"]]
    for e in range(20):
        assert len(set(r0[3 * e:3 * e + 3])) == 3
    for e in range(30):
        assert len(set(r1[2 * e:2 * e + 2])) == 2
    assert s0.state_dict()["epoch"] == 20 and s1.state_dict()["epoch"] == 30


def test_epochs_differ_and_seed_matters():
    ds = toy(32)
    s = stream(ds, 0, 1, b=32)
    e0, e1 = next(s)["sample_ids"].tolist(), next(s)["sample_ids"].tolist()
    assert sorted(e0) == sorted(e1) == list(range(32)) and e0 != e1
    assert next(stream(ds, 0, 1, b=32, seed=8))["sample_ids"].tolist() != e0
    assert next(stream(ds, 0, 1, b=32, seed=7))["sample_ids"].tolist() == e0


def test_padding_and_attention_mask():
    ds = toy(8)
    batch = next(MicroBatchStream(ds, rank=0, world_size=1, micro_batch_size=8, seed=0, pad_token_id=5))
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (8, 4)
    for row in range(8):
        i = int(batch["sample_ids"][row])
        n = 1 + i % 4
        assert batch["input_ids"][row].tolist() == [1000 + i] * n + [5] * (4 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (4 - n)
        assert batch["labels"][row].tolist() == [M] + [1000 + i] * (n - 1) + [M] * (4 - n)


def test_load_state_dict_refuses_other_data():
    s = stream(toy(6))
    state = s.state_dict()
    other = stream(toy(7))
    with pytest.raises(DataError, match="num_rows"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert other.samples_consumed == state["samples_consumed"]


def test_more_ranks_than_rows_is_a_data_error():
    with pytest.raises(DataError, match="ranks"):
        stream(toy(1), rank=1, ws=2)


def test_eval_batches_equal_count_with_all_masked_filler():
    ds = toy(5)
    per_rank = [list(eval_batches(ds, rank=r, world_size=2, micro_batch_size=2, pad_token_id=0)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    ids = [[int(i) for b in bs for i in b["sample_ids"] if i >= 0] for bs in per_rank]
    assert ids == [[0, 2, 4], [1, 3]]  # unshuffled, r::world_size
    filler = per_rank[1][1]
    assert filler["sample_ids"].tolist() == [-1] and (filler["labels"] == M).all()
    assert filler["attention_mask"].sum() > 0
    for n, ws, b in itertools.product((0, 1, 4, 7), (1, 2, 3), (1, 3)):
        counts = {len(list(eval_batches(toy(n), rank=r, world_size=ws, micro_batch_size=b, pad_token_id=0)))
                  for r in range(ws)}
        assert len(counts) == 1
