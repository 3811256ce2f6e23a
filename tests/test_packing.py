"""data.packing: fewer padded token slots, the same per-sample results.

- Each sample's final hidden states (teacher and student, sdpa and eager attention) and its distillation loss (CE +
  forward KL, the fused chunked loss) computed from a packed micro-batch equal those of the ordinary padded one
  (real HF models, no DeepSpeed), and the micro-batch's total loss sums are equal.
- The fill (real tokens per computed token slot) of packed micro-batches is >= 0.9 on the tiny guanaco data and on
  the demo's corpus (launch/demo.py, its own max_length and micro-batch size), while the padded stream yields the
  same samples in the same order.
The trainer's use of it (per-step losses equal with and without packing) is checked in tests/test_gpu_readiness.py.
Runtime: about 15 s.
"""
import sys

import pytest
import torch

from conftest import ROOT

SAMPLES = 6


def _batch_pair(assets, packing_length=128):
    from ds_distill import data, models

    tok = models.load_tokenizer(assets["tokenizer"])
    ds = data.build_dataset([f"{assets['data']}/guanaco_train.jsonl"], "guanaco", tok, 64)
    rows = data._rows(ds, list(range(SAMPLES)))
    return rows, data.collate(rows, tok.pad_token_id), data.collate_packed(rows, tok.pad_token_id, packing_length)


def _positions(packed, unpacked, n_samples):
    """For sample i: (row, column indices) in the padded batch and in the packed one."""
    out = []
    pos = packed["position_ids"]
    starts = [(r, c) for r in range(pos.shape[0]) for c in range(pos.shape[1])
              if pos[r, c] == 0 and packed["attention_mask"][r, c] == 1]
    for i in range(n_samples):
        n = int(unpacked["attention_mask"][i].sum())
        match = [(r, c) for r, c in starts
                 if torch.equal(packed["input_ids"][r, c:c + n], unpacked["input_ids"][i, :n])]
        assert len(match) >= 1, f"sample {i} not found in the packed rows"
        r, c = match[0]
        out.append(((i, torch.arange(n)), (r, torch.arange(c, c + n))))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_have_their_unpacked_hidden_states_and_losses(tiny_assets, attn):
    from ds_distill import losses, models

    rows, unpacked, packed = _batch_pair(tiny_assets)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # it packed something
    assert torch.equal(packed["sample_ids"], unpacked["sample_ids"])
    # the trained targets are the same multiset of (sample, token) pairs: no label crosses a sample boundary
    assert int((packed["labels"][:, 1:] != -100).sum()) == int((unpacked["labels"][:, 1:] != -100).sum())
    student = models.load_causal_lm(tiny_assets["student"], dtype=torch.float32)
    teacher = models.load_causal_lm(tiny_assets["teacher"], dtype=torch.float32)
    for m in (student, teacher):
        m.set_attn_implementation(attn)
        m.eval()
    where = _positions(packed, unpacked, SAMPLES)
    hidden = {}
    with torch.no_grad():
        for name, m in (("student", student), ("teacher", teacher)):
            dec = models._decoder(m)
            hu = dec(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"],
                     use_cache=False).last_hidden_state
            # (transformers detects packed rows only without a cache: use_cache=False, as models.py passes)
            hp = dec(input_ids=packed["input_ids"], attention_mask=None, position_ids=packed["position_ids"],
                     use_cache=False).last_hidden_state
            for (ui, uc), (pr, pc) in where:
                torch.testing.assert_close(hp[pr, pc], hu[ui, uc], rtol=0, atol=2e-5)
            hidden[name] = (hu, hp)
    V = len(models.load_tokenizer(tiny_assets["tokenizer"]))
    kw = dict(vocab_size=V, alpha=0.5, temperature=2.0, impl="chunked", chunk_size=16)
    sw, tw = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    totals = {"u": 0.0, "p": 0.0}
    for (ui, uc), (pr, pc) in where:
        per = {}
        for key, b, r, c in (("u", unpacked, ui, uc), ("p", packed, pr, pc)):
            hs, ht = hidden["student"][0 if key == "u" else 1], hidden["teacher"][0 if key == "u" else 1]
            lab = b["labels"][r, c[1:]]  # hidden at c[:-1] predicts the label at c[1:]
            out = losses.distill_loss(hs[r, c[:-1]], sw, lab, teacher_hidden=ht[r, c[:-1]], teacher_weight=tw, **kw)
            per[key] = (float(out.total.detach()), float(out.ce), float(out.kd), int(out.tokens))
            totals[key] += per[key][0]
        assert per["u"][3] == per["p"][3] and per["u"][3] > 0
        for a, b in zip(per["p"][:3], per["u"][:3]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1.0), (per["p"], per["u"])
    # the whole micro-batch through the student wrapper (what the trainer calls): the same sums
    wrapper = models.StudentWithLoss(student, loss_spec=losses.LossSpec(**kw))
    with torch.no_grad():
        th_u = models.TeacherHidden(teacher)(unpacked["input_ids"], unpacked["attention_mask"])
        th_p = models.TeacherHidden(teacher)(packed["input_ids"], None, packed["position_ids"])
        su = wrapper(unpacked["input_ids"], unpacked["attention_mask"], unpacked["labels"], teacher_hidden=th_u,
                     teacher_weight=tw)
        sp = wrapper(packed["input_ids"], None, packed["labels"], teacher_hidden=th_p, teacher_weight=tw,
                     position_ids=packed["position_ids"])
    assert float(su[3]) == float(sp[3])
    for a, b in zip(sp[:3], su[:3]):
        assert abs(float(a) - float(b)) <= 1e-5 * abs(float(b)), (sp[:3], su[:3])
    assert abs(float(su[0]) - totals["u"]) <= 1e-4 * totals["u"]


def _fill(ds, pad, mbs, pack, n=40):
    from ds_distill import data

    streams = [data.MicroBatchStream(ds, rank=0, world_size=1, micro_batch_size=mbs, seed=0, pad_token_id=pad,
                                     pack_capacity=cap) for cap in (0, pack)]
    real = [0, 0]
    slots = [0, 0]
    for _ in range(n):
        mbs_pair = [next(s) for s in streams]
        assert torch.equal(mbs_pair[0]["sample_ids"], mbs_pair[1]["sample_ids"])  # same samples, same order
        for k, mb in enumerate(mbs_pair):
            real[k] += int(mb["attention_mask"].sum())
            slots[k] += mb["input_ids"].numel()
    assert real[0] == real[1]
    return real[0] / slots[0], real[1] / slots[1]


def test_packing_fills_at_least_90_percent_on_guanaco_and_demo_data(tiny_assets, tmp_path):
    from ds_distill import data, models

    sys.path.insert(0, str(ROOT / "launch"))
    import demo

    tok = models.load_tokenizer(tiny_assets["tokenizer"])
    L = 64
    ds = data.build_dataset([f"{tiny_assets['data']}/guanaco_train.jsonl"], "guanaco", tok, L)
    padded, packed = _fill(ds, tok.pad_token_id, 8, 2 * L)
    print(f"guanaco (max_length {L}, 8 per micro-batch): fill padded {padded:.3f}, packed {packed:.3f}")
    assert packed >= 0.9 and packed > padded

    p = dict(demo.DEFAULTS)
    p.update(train_records=400, eval_records=20)
    demo.build_corpus(tmp_path / "demo", p)
    dtok = models.load_tokenizer(str(tmp_path / "demo" / "tokenizer"))
    dds = data.build_dataset([str(tmp_path / "demo" / "data" / "train.jsonl")], "text", dtok, p["max_length"])
    padded, packed = _fill(dds, dtok.pad_token_id, p["micro_batch_size"], 2 * p["max_length"])
    print(f"demo (max_length {p['max_length']}, {p['micro_batch_size']} per micro-batch): fill padded {padded:.3f}, "
          f"packed {packed:.3f}")
    assert packed >= 0.9 and packed > padded
