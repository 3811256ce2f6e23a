"""Files -> tokens -> micro-batches: the data pipeline of the trainer.

    build_dataset(files, fmt, tokenizer, max_length, text_field) -> datasets.Dataset
        columns: input_ids, labels (-100 where not trained, NOT shifted: HF convention), sample_id (global row index)
    MicroBatchStream(dataset, rank=, world_size=, micro_batch_size=, seed=, pad_token_id=, samples_consumed=)
        infinite, per-rank sharded, reshuffled every epoch, position fully determined by samples_consumed
    eval_batches(dataset, rank=, world_size=, micro_batch_size=, pad_token_id=)
        finite, unshuffled, sharded; every rank yields the same number of batches

Formats (what is trained, i.e. where labels != -100):
    text         every token, plus an eos appended per document.
    guanaco      '### Human: ... ### Assistant: ...' text: each assistant turn from its first non-blank character
                 through its end of turn: the next '### Human:' marker (the stop string guanaco models are run
                 with) or, for the last turn, an appended eos.
    instruction  fields instruction/input/output rendered as
                 'Instruction: {instruction}\\n[Input: {input}\\n]Response: '
                 + output, or one text field holding 'Instruction: ... Response: ...': the response and an eos.
    chat         'messages' rendered with the tokenizer's chat template: each assistant message's content and the end
                 tokens the template puts right after it (ChatML: '<|im_end|>'; not the newline after it).

The prompt and the trained part of instruction/guanaco records are tokenized separately and concatenated, so the
prompt's tokens are exactly those a user's prompt gets at generation time (a prompt ending in 'Response: ' keeps its
trailing-space token instead of merging it into the response's first token). Chat records are tokenized as the
whole rendered string (identical to `apply_chat_template(tokenize=True)`), and tokens are marked trained from their
character offsets.

Truncation keeps the first `max_length` tokens. A sample is kept only if some label at a position >= 1 is trained
(position 0 is never a target once the loss shifts labels); dropped samples are counted and logged, and a dataset
with nothing left raises DataError naming data.max_length / data.format.

Everything is held in memory: records are read with the standard library / pyarrow and turned into an in-memory
`datasets.Dataset`; `.map` runs with keep_in_memory, so nothing is written next to the user's data.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections import Counter
from typing import Any, Iterator

import datasets
import torch

from ds_distill.errors import DataError
from ds_distill.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

FORMATS = ("text", "guanaco", "instruction", "chat")
EXTENSIONS = (".jsonl", ".json", ".parquet", ".txt")

_HUMAN = re.compile(r"###\s*Human:")
_ASSISTANT = re.compile(r"###\s*Assistant:")
_INSTRUCTION = re.compile(r"Instruction:")
_RESPONSE = re.compile(r"Response:")


# ----------------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------------

def _expand(files: list[str] | str) -> list[str]:
    """Paths as given; a directory expands to its supported files (sorted), a glob to its matches (sorted)."""
    if isinstance(files, str):
        files = [files]
    out = []
    for f in files:
        f = os.fspath(f)
        if os.path.isdir(f):
            found = sorted(os.path.join(f, n) for n in os.listdir(f) if n.endswith(EXTENSIONS))
            if not found:
                raise DataError(f"data files: directory {f} holds no {'/'.join(EXTENSIONS)} file")
            out += found
        elif any(c in f for c in "*?[") and not os.path.exists(f):
            found = sorted(glob.glob(f))
            if not found:
                raise DataError(f"data files: pattern {f} matches no file")
            out += found
        else:
            out.append(f)
    for f in out:
        if not os.path.isfile(f):
            raise DataError(f"data files: {f} does not exist -> fix the path in data.train_files / data.eval_files")
        if not f.endswith(EXTENSIONS):
            raise DataError(f"data files: {f} has an unsupported extension -> use one of {list(EXTENSIONS)} "
                            "(txt: one example per line)")
    return out


def _read_records(path: str, text_field: str) -> list[Any]:
    """All records of one file, in order: dicts for json/jsonl/parquet, {text_field: line} for txt."""
    name = os.path.basename(path)
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            return [{text_field: line.rstrip("\r\n")} for line in f]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"data files: cannot read parquet file {path}: {e}") from e
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".json") and content.lstrip()[:1] in ("[", "{"):
        try:
            obj = json.loads(content)
        except json.JSONDecodeError:
            obj = None  # maybe JSON lines in a .json file: parsed below
        if isinstance(obj, list):
            return obj
        if isinstance(obj, dict):
            (key, value), = obj.items() if len(obj) == 1 else ((None, None),)
            if key != "messages" and isinstance(value, list) and all(isinstance(r, dict) for r in value):
                return value  # {"data": [records]}
            return [obj]  # one record (a single conversation {"messages": [...]} included)
    records = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"data files: invalid JSON on line {lineno} of {name} ({e.msg}) -> fix the file "
                            f"({path})") from e
    return records


def _fields_hint(rec: Any) -> list[str]:
    return sorted(k for k, v in rec.items() if isinstance(v, str)) if isinstance(rec, dict) else []


def _extract(records: list[Any], path: str, fmt: str, text_field: str) -> list[dict]:
    """The fields a format needs, per record, as JSON-able strings; raises DataError naming record, file and key."""
    name = os.path.basename(path)
    out = []
    structured = None  # instruction: fields (True) or one text field (False), decided on the first record
    for i, rec in enumerate(records):
        where = f"record {i + 1} of {name}"
        if not isinstance(rec, dict):
            raise DataError(f"data files: {where} is a {type(rec).__name__}, not an object ({path})")
        if fmt in ("text", "guanaco"):
            v = rec.get(text_field)
            if not isinstance(v, str):
                what = "missing" if v is None else f"a {type(v).__name__}, not a string,"
                raise DataError(f"data.text_field: {text_field!r} {what} in {where} -> set data.text_field to one of "
                                f"{_fields_hint(rec)} ({path})")
            out.append({"text": v})
        elif fmt == "instruction":
            if structured is None:
                structured = "instruction" in rec or "output" in rec or text_field not in rec
            if structured:
                for key in ("instruction", "output"):
                    if not isinstance(rec.get(key), str):
                        raise DataError(
                            f"data.format: 'instruction' needs the field {key!r} (and optional 'input'), missing or "
                            f"not a string in {where} -> give instruction/input/output fields, or one "
                            f"data.text_field holding 'Instruction: ... Response: ...' (fields there: "
                            f"{_fields_hint(rec)}) ({path})")
                inp = rec.get("input")
                out.append({"instruction": rec["instruction"], "input": inp if isinstance(inp, str) else "",
                            "output": rec["output"]})
            else:
                v = rec.get(text_field)
                if not isinstance(v, str):
                    raise DataError(f"data.text_field: {text_field!r} missing in {where} -> set data.text_field to "
                                    f"one of {_fields_hint(rec)}, or give instruction/input/output fields ({path})")
                out.append({"text": v})
        elif fmt == "chat":
            msgs = rec.get("messages")
            if not isinstance(msgs, list):
                raise DataError(f"data.format: 'chat' needs a 'messages' list (of {{role, content}}) in {where}; "
                                f"fields there: {sorted(rec)} ({path})")
            clean = []
            for j, m in enumerate(msgs):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise DataError(f"data.format: message {j} of {where} needs string 'role' and 'content' "
                                    f"(got {m!r:.120}) ({path})")
                clean.append({k: v for k, v in m.items() if v is not None})  # parquet structs fill absent keys
            out.append({"messages": json.dumps(clean, ensure_ascii=False)})
        else:
            raise DataError(f"data.format: {fmt!r} is not one of {list(FORMATS)}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Formatting: record -> pieces of text, each trained or not
# ----------------------------------------------------------------------------------------------------------------

def _split_trailing_ws(s: str) -> tuple[str, str]:
    t = s.rstrip()
    return t, s[len(t):]


def _guanaco_pieces(text: str) -> list[tuple[str, bool]]:
    """[(text, trained)]: each assistant turn from its first non-blank char through the next '### Human:' marker."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    while True:
        m = _ASSISTANT.search(text, pos)
        if m is None:
            break
        start = m.end()
        while start < len(text) and text[start].isspace():
            start += 1
        h = _HUMAN.search(text, start)
        end = h.end() if h else len(text)
        pieces.append((text[pos:start], False))
        pieces.append((text[start:end], True))
        pos = end
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


def _instruction_prompt(instruction: str, inp: str) -> str:
    prompt = f"Instruction: {instruction}\n"
    if inp:
        prompt += f"Input: {inp}\n"
    return prompt + "Response: "


def _instruction_text_pieces(text: str) -> list[tuple[str, bool]]:
    """'... Instruction: ... Response: answer': the answer (from its first non-blank char) is trained."""
    i = _INSTRUCTION.search(text)
    r = _RESPONSE.search(text, i.end()) if i else None
    if r is None:
        return [(text, False)]
    start = r.end()
    while start < len(text) and text[start].isspace():
        start += 1
    return [(text[:start], False), (text[start:], True)]


def _chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans to train: assistant contents + end tokens.

    For assistant message i the content is located right after the rendering of messages[:i] with the generation prompt
    when that is a prefix of the whole (the usual case); otherwise (templates that insert a think block or rewrite
    earlier turns) it is searched for after the previous span and the part shared with that rendering. The end tokens
    are what the template writes after the content when the conversation stops there (messages[:i+1]), minus trailing
    whitespace, as far as the whole rendering agrees.
    """
    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        pos = -1
        try:
            prefix = render(messages[:i], gen=True) if i > 0 else None
        except Exception:  # a template may refuse a conversation that ends on the user; fall back to search
            prefix = None
        if prefix is not None and full.startswith(prefix) and full.startswith(content, len(prefix)):
            pos = len(prefix)
        else:
            # e.g. Qwen3 writes '<think>...</think>' between the generation prompt and the content: search, but
            # not before the part the conversation shares with its own prefix (the content may repeat a question)
            start = max(cursor, os.path.commonprefix([prefix, full]).__len__() if prefix is not None else 0)
            pos = full.find(content, start) if content else -1
        if pos < 0:
            raise ValueError(f"the chat template does not reproduce assistant message {i} verbatim")
        end = pos + len(content)
        upto = render(messages[: i + 1])
        k = upto.rfind(content) if content else len(prefix or "")
        tail, _ = _split_trailing_ws(upto[k + len(content):]) if k >= 0 else ("", "")
        n = 0
        while n < len(tail) and end + n < len(full) and full[end + n] == tail[n]:
            n += 1
        spans.append((pos, end + n))
        cursor = end + n
    return full, spans


# ----------------------------------------------------------------------------------------------------------------
# build_dataset
# ----------------------------------------------------------------------------------------------------------------

def _has_target(labels: list[int]) -> bool:
    return any(x != IGNORE_INDEX for x in labels[1:])


def build_dataset(files: list[str], fmt: str, tokenizer, max_length: int, text_field: str = "text") -> datasets.Dataset:
    """Tokenized, loss-masked, truncated dataset over local files; see the module docstring for the formats.

    Columns: input_ids (list[int]), labels (list[int], same length, -100 where not trained, not shifted),
    sample_id (int, global row index over the files in order, counted before any sample is dropped; stable for a
    given file list, so an offline teacher cache can key rows by it).
    """
    _check_format(fmt, tokenizer, max_length)
    paths = _expand(files)
    if not paths:
        raise DataError("data files: no file given -> list at least one local json/jsonl/parquet/txt file")
    rows, origin = _load_rows(paths, fmt, text_field)
    names = ", ".join(os.path.basename(p) for p in paths)
    if not rows:
        raise DataError(f"data files: no record in {names} (empty dataset) -> give files with data")
    raw = datasets.Dataset.from_dict({k: [r.get(k, "") for r in rows] for k in list(rows[0])})
    encoder = _Encoder(tokenizer, fmt, max_length, origin)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per rank per file set is noise in multi-rank logs
    try:
        tok = raw.map(encoder.tokenize, batched=True, batch_size=512, remove_columns=raw.column_names,
                      keep_in_memory=True, load_from_cache_file=False)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return _keep_trainable(tok, names, fmt, max_length, text_field)


def _check_format(fmt: str, tokenizer, max_length: int) -> None:
    if fmt not in FORMATS:
        raise DataError(f"data.format: {fmt!r} is not one of {list(FORMATS)}")
    if max_length < 2:
        raise DataError(f"data.max_length: {max_length} must be >= 2 (one input and one target token)")
    if fmt != "chat" and tokenizer.eos_token_id is None:
        raise DataError("tokenizer_path: the tokenizer has no eos token; the text/guanaco/instruction formats append "
                        "one to end each sample -> use a tokenizer with an eos token")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.format: 'chat' needs a tokenizer with a chat template, and this one has none -> set "
                        "tokenizer_path to one with a template, or use data.format: instruction")


def _load_rows(paths: list[str], fmt: str, text_field: str) -> tuple[list[dict], list[tuple[str, int]]]:
    """Every file's records, numbered (sample_id) over the files in order; and (path, first sample id) per file,
    to name the file in later errors."""
    rows: list[dict] = []
    origin: list[tuple[str, int]] = []
    for path in paths:
        if fmt == "chat" and path.endswith(".txt"):
            raise DataError(f"data.format: 'chat' needs 'messages' records; {path} is plain text -> use json/jsonl/"
                            "parquet, or data.format: text")
        recs = _extract(_read_records(path, text_field), path, fmt, text_field)
        origin.append((path, len(rows)))
        rows += recs
    for i, r in enumerate(rows):
        r["sample_id"] = i
    return rows, origin


class _Encoder:
    """Records -> (input_ids, labels) by format, truncated, each with its status (kept, empty, no_trainable,
    too_long); `tokenize` is the datasets.map function."""

    def __init__(self, tokenizer, fmt: str, max_length: int, origin: list[tuple[str, int]]):
        self.tokenizer, self.fmt, self.max_length, self.origin = tokenizer, fmt, max_length, origin
        self.bos, self.eos = _bos_id(tokenizer), tokenizer.eos_token_id

    def _start_of(self, sample_id: int) -> int:
        return max(start for _, start in self.origin if start <= sample_id)

    def _file_of(self, sample_id: int) -> str:
        name = self.origin[0][0]
        for p, start in self.origin:
            if start <= sample_id:
                name = p
        return os.path.basename(name)

    def encode_pieces(self, batch_pieces: list[list[tuple[str, bool]]]) -> list[tuple[list[int], list[int]]]:
        flat = [t for pieces in batch_pieces for t, _ in pieces]
        ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        out, k = [], 0
        for pieces in batch_pieces:
            inp, lab = ([self.bos], [IGNORE_INDEX]) if self.bos is not None else ([], [])
            for _, trained in pieces:
                inp += ids[k]
                lab += ids[k] if trained else [IGNORE_INDEX] * len(ids[k])
                k += 1
            inp.append(self.eos)
            lab.append(self.eos if any(t for _, t in pieces) else IGNORE_INDEX)
            out.append((inp, lab))
        return out

    def encode_chat(self, messages_json: str, sample_id: int) -> tuple[list[int], list[int]]:
        tokenizer = self.tokenizer
        messages = json.loads(messages_json)
        try:
            full, spans = _chat_spans(messages, tokenizer)
        except Exception as e:
            raise DataError(f"data.format: cannot render record {sample_id - self._start_of(sample_id) + 1} of "
                            f"{self._file_of(sample_id)} with the tokenizer's chat template: {e}") from e
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        inp = list(enc["input_ids"])
        if tokenizer.is_fast:
            offs = enc["offset_mapping"]
            lab = [t if any(s < e2 and e > s2 for s2, e2 in spans) else IGNORE_INDEX
                   for t, (s, e) in zip(inp, offs)]
            return inp, lab
        # slow tokenizer: no offsets; tokenize the pieces between span boundaries separately
        cuts = sorted({0, len(full), *[b for sp in spans for b in sp]})
        inp, lab = [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
            trained = any(a >= s and b <= e for s, e in spans)
            inp += piece
            lab += piece if trained else [IGNORE_INDEX] * len(piece)
        return inp, lab

    def tokenize(self, batch: dict) -> dict:
        fmt, max_length = self.fmt, self.max_length
        n = len(batch["sample_id"])
        if fmt == "chat":
            encoded = [self.encode_chat(batch["messages"][j], batch["sample_id"][j]) for j in range(n)]
        else:
            if fmt == "text":
                pieces = [[(t, True)] if t.strip() else [] for t in batch["text"]]
            elif fmt == "guanaco":
                pieces = [_guanaco_pieces(t) for t in batch["text"]]
            elif "instruction" in batch:
                pieces = [[(_instruction_prompt(ins, inp), False), (o, True)]
                          for ins, inp, o in zip(batch["instruction"], batch["input"], batch["output"])]
            else:
                pieces = [_instruction_text_pieces(t) for t in batch["text"]]
            encoded = self.encode_pieces(pieces)
        out: dict[str, list] = {"input_ids": [], "labels": [], "sample_id": [], "status": []}
        for j, (inp, lab) in enumerate(encoded):
            status = "kept"
            if not _has_target(lab):
                status = "empty" if (fmt == "text" and not batch["text"][j].strip()) else "no_trainable"
            elif not _has_target(lab[:max_length]):
                status = "too_long"
            out["input_ids"].append(inp[:max_length])
            out["labels"].append(lab[:max_length])
            out["sample_id"].append(batch["sample_id"][j])
            out["status"].append(status)
        return out


def _keep_trainable(tok: datasets.Dataset, names: str, fmt: str, max_length: int,
                    text_field: str) -> datasets.Dataset:
    """Drop the samples with nothing to train (logged by reason); a DataError when none is left."""
    status = tok["status"]
    counts = Counter(status)
    kept_idx = [i for i, s in enumerate(status) if s == "kept"]
    total = len(status)
    dropped = total - len(kept_idx)
    if dropped:
        logger.warning("data: dropped %d of %d samples of %s (%s)", dropped, total, names,
                       ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()) if k != "kept"))
    if not kept_idx:
        raise DataError(_nothing_left_message(counts, total, names, fmt, max_length, text_field))
    logger.info("data: %d %s samples from %s (max_length %d)", len(kept_idx), fmt, names, max_length)
    tok = tok.remove_columns(["status"])
    if dropped:
        tok = tok.select(kept_idx, keep_in_memory=True)
    return tok


def _nothing_left_message(counts: Counter, total: int, names: str, fmt: str, max_length: int, text_field: str) -> str:
    parts = []
    if counts["too_long"]:
        parts.append(f"{counts['too_long']} have their first trained token beyond data.max_length={max_length} "
                     "(fully masked after truncation)")
    if counts["no_trainable"]:
        why = {"guanaco": "no '### Assistant:' turn", "instruction": "no 'Instruction: ... Response:' or an empty "
               "response", "chat": "no assistant message", "text": "no token"}[fmt]
        parts.append(f"{counts['no_trainable']} have nothing to train ({why})")
    if counts["empty"]:
        parts.append(f"{counts['empty']} are empty")
    fix = []
    if counts["too_long"]:
        fix.append("raise data.max_length")
    if counts["no_trainable"] or counts["empty"]:
        fix.append(f"check data.format ({fmt!r}) and data.text_field ({text_field!r})")
    return (f"data.max_length: no sample of {names} has a trainable token within data.max_length={max_length}: of "
            f"{total} samples, " + "; ".join(parts) + " -> " + " or ".join(fix))


def _bos_id(tokenizer) -> int | None:
    """The bos id when the tokenizer itself adds one to plain text (Llama-style); None otherwise (Qwen, GPT-2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------

def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids/attention_mask/labels [B, S] long, sample_ids [B] long."""
    longest = max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, longest), dtype=torch.long)
    labels = torch.full((b, longest), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[i, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(s["labels"], dtype=torch.long)
        attention_mask[i, :n] = 1
    sample_ids = torch.tensor([s["sample_id"] for s in samples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sample_ids": sample_ids}


def _first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep the samples' order
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """The sample indices of each packed row: as few rows as first-fit decreasing needs at `capacity` tokens per
    row, then the smallest row width that still packs into that many rows (binary search), so that the rows come
    out about equally full (the micro-batch is padded to its fullest row). Deterministic."""
    rows = _first_fit_decreasing(lengths, capacity)
    k = len(rows)
    lo, hi = max(max(lengths), -(-sum(lengths) // k)), max(capacity, max(lengths))
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_first_fit_decreasing(lengths, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    balanced = _first_fit_decreasing(lengths, lo)
    return balanced if len(balanced) <= k else rows


def collate_packed(samples: list[dict], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """The micro-batch's samples packed into as few rows of at most `capacity` tokens as first-fit decreasing finds
    (`pack_rows`), then right-padded to the fullest row. Each sample keeps its own positions (position_ids restart
    at 0) and its first label is dropped (-100): in a packed row that position would be predicted from the previous
    sample's last token; unpacked it is never a target either. The padding tail gets positions of its own (0, 1, ...)
    so that it is a separate block. Models attend within each sample only when given position_ids and no
    attention_mask (transformers builds the block-diagonal causal mask from the position resets); attention_mask
    here marks the real tokens, for counting. sample_ids [B] keep the samples' order, not the rows'.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    r = len(rows)
    input_ids = torch.full((r, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((r, width), dtype=torch.long)
    labels = torch.full((r, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((r, width), dtype=torch.long)
    for k, row in enumerate(rows):
        o = 0
        for i in row:
            n = lengths[i]
            input_ids[k, o:o + n] = torch.tensor(samples[i]["input_ids"], dtype=torch.long)
            labels[k, o + 1:o + n] = torch.tensor(samples[i]["labels"][1:], dtype=torch.long)
            position_ids[k, o:o + n] = torch.arange(n)
            attention_mask[k, o:o + n] = 1
            o += n
        position_ids[k, o:] = torch.arange(width - o)
    sample_ids = torch.tensor([s["sample_id"] for s in samples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "position_ids": position_ids, "sample_ids": sample_ids}


def _rows(dataset, indices: list[int]) -> list[dict]:
    cols = dataset[indices]
    return [{"input_ids": cols["input_ids"][i], "labels": cols["labels"][i], "sample_id": cols["sample_id"][i]}
            for i in range(len(indices))]


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The order of all rows in an epoch: a permutation seeded by seed + epoch (same on every rank)."""
    g = torch.Generator().manual_seed(int(seed) + int(epoch))
    return torch.randperm(num_rows, generator=g).tolist()


class MicroBatchStream:
    """Infinite iterator of micro-batches for one rank; every rank yields the same number of micro-batches no matter
    its shard length (ZeRO-3 requires equal forwards on all ranks).

    Epoch e visits `epoch_permutation(n, seed, e)`; rank r takes perm[r::world_size] (shards differ by at most one
    row). The rank reads its shard as one endless sequence, epoch after epoch, micro_batch_size rows at a time (a
    micro-batch may straddle two epochs), so a rank whose shard is shorter simply starts its next epoch earlier.
    The position is `samples_consumed` (rows this rank has read, the same on every rank): epoch = k // shard_len,
    offset = k % shard_len; a stream built with samples_consumed=k yields exactly what an uninterrupted one yields
    after k rows.
    """

    def __init__(self, dataset, *, rank: int, world_size: int, micro_batch_size: int, seed: int, pad_token_id: int,
                 samples_consumed: int = 0, pack_capacity: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be >= 1")
        self.dataset = dataset
        self.num_rows = len(dataset)
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.shard_len = len(range(rank, self.num_rows, world_size))
        if self.shard_len == 0:
            raise DataError(f"data.train_files: {self.num_rows} usable training samples cannot feed {world_size} ranks "
                            f"(rank {rank} would get none) -> add data or use fewer ranks")
        self.samples_consumed = int(samples_consumed)
        self.pack_capacity = pack_capacity  # > 0: data.packing, rows of at most this many tokens
        self._cached_epoch: int | None = None
        self._cached_shard: list[int] = []

    @property
    def epoch(self) -> int:
        """The epoch of the next row this rank reads."""
        return self.samples_consumed // self.shard_len

    def _shard(self, epoch: int) -> list[int]:
        if self._cached_epoch != epoch:
            self._cached_shard = epoch_permutation(self.num_rows, self.seed, epoch)[self.rank::self.world_size]
            self._cached_epoch = epoch
        return self._cached_shard

    def __iter__(self) -> "MicroBatchStream":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        indices = []
        k = self.samples_consumed
        for _ in range(self.micro_batch_size):
            epoch, offset = divmod(k, self.shard_len)
            indices.append(self._shard(epoch)[offset])
            k += 1
        self.samples_consumed = k
        if self.pack_capacity > 0:  # the same samples, fewer rows: the data order and position do not change
            return collate_packed(_rows(self.dataset, indices), self.pad_token_id, self.pack_capacity)
        return collate(_rows(self.dataset, indices), self.pad_token_id)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "epoch": self.epoch, "seed": self.seed,
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore the position. With strict, a different seed, world size or number of rows is an error (the
        position would then mean other rows); without, it only logs a warning."""
        problems = [f"{k}: saved {state[k]} != now {getattr(self, k)}" for k in ("seed", "world_size", "num_rows")
                    if k in state and state[k] != getattr(self, k)]
        if problems:
            msg = ("data: the saved data position does not match this run (" + "; ".join(problems) + "); resuming "
                   "would not replay the same data order -> resume with the same data, train.seed and world size")
            if strict:
                raise DataError(msg)
            logger.warning(msg)
        self.samples_consumed = int(state["samples_consumed"])


def eval_batches(dataset, *, rank: int, world_size: int, micro_batch_size: int, pad_token_id: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Finite, unshuffled, sharded micro-batches: rank r gets rows r::world_size in order.

    Every rank yields ceil(ceil(n / world_size) / micro_batch_size) batches, so ZeRO-3 forwards stay equal. A rank
    whose shard runs out first pads with filler batches: one row holding a single pad token, attention_mask 1 (a
    fully masked row could make attention NaN), labels all -100 and sample_ids -1 (no teacher-cache row). They add
    nothing to token-weighted metrics; the last real batch of a shard may be smaller than micro_batch_size.
    """
    n = len(dataset)
    mine = list(range(rank, n, world_size))
    per_rank = -(-n // world_size) if n else 0
    num_batches = -(-per_rank // micro_batch_size)
    filler = {"input_ids": torch.full((1, 1), pad_token_id, dtype=torch.long),
              "attention_mask": torch.ones((1, 1), dtype=torch.long),
              "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
              "sample_ids": torch.full((1,), -1, dtype=torch.long)}
    for b in range(num_batches):
        idx = mine[b * micro_batch_size:(b + 1) * micro_batch_size]
        if idx:
            yield collate(_rows(dataset, idx), pad_token_id)
        else:
            yield {k: v.clone() for k, v in filler.items()}
