"""LoRA student (student.lora, through peft).

Unit (one process, no DeepSpeed): apply_lora leaves only adapter weights trainable, rejects unknown target modules,
and save_merged (the export path: meta-device twin + merge_and_unload) reproduces the adapted model's logits.

Multi-rank (2 CPU ranks, ZeRO-3, one launch): adapters injected into the already-partitioned student train;
DeepSpeed's optimizer holds exactly the adapter elements (fp32 partitions in the checkpoint); the merged export
equals the initial student outside the targeted modules bit for bit and differs inside them; the saved adapter,
loaded with peft onto the initial student in one process, gives the merged export's logits (atol 1e-5).
"""
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, assert_ok, read_jsonl, run_deepspeed, tiny_config, write_yaml

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _expected_trainable(cfg, rank: int, targets) -> int:
    hd = cfg.head_dim
    shapes = {"q_proj": (cfg.hidden_size, cfg.num_attention_heads * hd),
              "k_proj": (cfg.hidden_size, cfg.num_key_value_heads * hd),
              "v_proj": (cfg.hidden_size, cfg.num_key_value_heads * hd),
              "o_proj": (cfg.num_attention_heads * hd, cfg.hidden_size),
              "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
              "up_proj": (cfg.hidden_size, cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(rank * (i + o) for i, o in (shapes[t] for t in targets))


def test_apply_lora_trains_only_adapters_and_rejects_unknown_targets(tiny_assets):
    from transformers import AutoModelForCausalLM

    from ds_distill import lora
    from ds_distill.errors import ModelError

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32)
    pm = lora.apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(TARGETS)
    n_train, n_all = lora.trainable_counts(pm)
    assert n_train == _expected_trainable(model.config, 4, TARGETS)
    assert n_all == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    with pytest.raises(ModelError, match="qkv_proj"):
        lora.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_assets["student"]), rank=2, alpha=4.0,
                        dropout=0.0, target_modules=["qkv_proj"])


def test_save_merged_reproduces_adapted_logits(tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_distill import lora

    torch.manual_seed(0)
    pm = lora.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32),
                         rank=4, alpha=8.0, dropout=0.1, target_modules=TARGETS)
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init
        for n, p in pm.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    pm.eval()

    def save(model, sd, out):
        model.save_pretrained(out, state_dict=sd)

    sd = {k: v.clone() for k, v in pm.state_dict().items()}  # merged in place
    lora.save_merged(pm, sd, str(tmp_path / "merged"), str(tmp_path / "adapter"), save)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["student"]),
                                    tmp_path / "adapter").eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = pm(input_ids=ids).logits, merged(input_ids=ids).logits, ref(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_assets["student"])(input_ids=ids).logits
    assert (a - base).abs().max() > 1e-3  # the adapter matters, so the comparisons below can fail
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a, atol=1e-5, rtol=0)


@pytest.mark.multirank
def test_lora_zero3_two_ranks_trains_adapters_only_and_export_merges(tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = tiny_config(tiny_assets, out, train={"max_steps": 4, "lr": 1e-2, "warmup_steps": 1, "zero_stage": 3,
                                               "micro_batch_size": 2, "grad_accum_steps": 1},
                      student={"path": tiny_assets["student"],
                               "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": TARGETS,
                                        "save_adapter": True}})
    cfg["data"]["eval_files"] = []
    proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", write_yaml(cfg, tmp_path / "c.yaml")])
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    expected = _expected_trainable(AutoConfig.from_pretrained(tiny_assets["student"]), 4, TARGETS)
    m = re.search(r"LoRA r=4 on .*: (\d+) trainable of (\d+)", log)
    assert m and int(m.group(1)) == expected, log[-3000:]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r]
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows)

    # DeepSpeed's optimizer got only the adapters: its fp32 partitions sum to the adapter element count
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    n_opt = 0
    for f in ckpt.glob("zero_pp_rank_*_optim_states.pt"):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        n_opt += sum(t.numel() for t in osd["fp32_flat_groups"])
    n_tensors = 2 * len(TARGETS) * 2  # lora_A + lora_B per targeted module, 2 layers
    assert expected <= n_opt <= expected + 2 * n_tensors  # + at most one padding element per tensor and rank

    # merged export: equal to the initial student outside targeted modules, changed inside them
    init = load_file(f"{tiny_assets['student']}/model.safetensors")
    final = load_file(str(out / "final" / "model.safetensors"))
    assert set(final) == set(init)
    changed = {k for k in init if not torch.equal(init[k], final[k])}
    targeted = {k for k in init if any(f".{t}.weight" in k for t in TARGETS)}
    assert changed == targeted, (sorted(changed ^ targeted))

    # the adapter alone, on the initial student, reproduces the merged export's logits
    merged = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["student"],
                                                                             dtype=torch.float32),
                                        out / "final_adapter").eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm, la, li = merged(input_ids=ids).logits, adapted(input_ids=ids).logits, initial(input_ids=ids).logits
    assert (la - li).abs().max() > 1e-4  # training moved the adapted model
    torch.testing.assert_close(lm, la, atol=1e-5, rtol=0)
