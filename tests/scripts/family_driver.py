"""Model families end to end, in ONE multi-rank launch (tests/test_families.py).

`build_model` / `build_pair` make tiny random teacher/student pairs of each family from its HF config class (no
hub), with the final norm's weight scaled up so that the family's logit transform changes the numbers. Run under
`deepspeed --num_gpus 2` with a JSON plan (argv[1]), the driver then, in one process group:

1. trains every family's pair in turn with `trainer.main` (the real recipe: ZeRO-3 student and teacher, probe,
   step-0 eval, one step, export), each into its own output_dir;
2. an MoE run whose two ranks read different records (routing differs between ranks under ZeRO-3);
3. writes the offline top-k cache of the Gemma-2 teacher (`cache_writer.write_cache`);
4. runs `launch/train.py`'s main on a Qwen3 pair whose forward is patched (logits x 1.5): it must exit 2 at the
   probe (its finally-clause ends the process group, so this comes last).
Rank 0 writes {"patched_rc": ...} to plan["result"]; the checks against the HF models' own forwards are in the test.
"""
from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

NORM_GAIN = 40.0  # final-norm weight x 40: random tiny logits have a spread of ~0.1, the transforms need ~3-10

# family -> (config class, family-specific kwargs of (teacher, student)); the transforms differ between teacher and
# student so that a head applied to the wrong model would be seen
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}, {}),
    "mistral": ("MistralConfig", {}, {}),
    "qwen2": ("Qwen2Config", {}, {}),
    "qwen3": ("Qwen3Config", {}, {}),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         decoder_sparse_step=1, router_aux_loss_coef=0.05),
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                       router_aux_loss_coef=0.1)),
    "gemma2": ("Gemma2Config", dict(final_logit_softcapping=3.0, query_pre_attn_scalar=12, sliding_window=16),
               dict(final_logit_softcapping=5.0, query_pre_attn_scalar=8, sliding_window=16)),
    "gemma3_text": ("Gemma3TextConfig", dict(final_logit_softcapping=3.0, query_pre_attn_scalar=12, sliding_window=16),
                    dict(final_logit_softcapping=5.0, query_pre_attn_scalar=8, sliding_window=16)),
    "cohere": ("CohereConfig", dict(logit_scale=4.0), dict(logit_scale=0.5)),
    "granite": ("GraniteConfig", dict(logits_scaling=3.0), dict(logits_scaling=0.5)),
    "phi3": ("Phi3Config", {}, {}),
}
SHAPES = {"teacher": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=12, tie_word_embeddings=False),
          "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)}


def build_model(family: str, role: str, vocab_rows: int = 128, eos: int = 1, pad: int = 0, seed: int = 0):
    """A random tiny `family` model (role teacher/student) with its final norm scaled by NORM_GAIN."""
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, t_kw, s_kw = FAMILY_CONFIGS[family]
    kw = dict(SHAPES[role], vocab_size=vocab_rows, max_position_embeddings=128, eos_token_id=eos, pad_token_id=pad,
              bos_token_id=None, **(t_kw if role == "teacher" else s_kw))
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed + (0 if role == "teacher" else 1))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    norm = model.get_decoder().norm
    with torch.no_grad():
        if family.startswith("gemma"):  # Gemma's RMSNorm multiplies by (1 + weight), weight initialised at 0
            norm.weight.fill_(NORM_GAIN - 1.0)
        else:
            norm.weight.mul_(NORM_GAIN)
    return model


def build_pair(family: str, out_dir: str, tokenizer) -> tuple[str, str]:
    """Save teacher/ and student/ of `family` (vocab rows = the tokenizer's size) under out_dir."""
    paths = []
    for role in ("teacher", "student"):
        m = build_model(family, role, vocab_rows=len(tokenizer), eos=tokenizer.eos_token_id,
                        pad=tokenizer.pad_token_id)
        d = os.path.join(out_dir, role)
        m.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        paths.append(d)
    return paths[0], paths[1]


def _cfg(path: str, **over):
    from ds_distill.config import parse_config

    args = ["--config", path] + [x for k, v in over.items() for x in (f"--{k}", str(v))]
    return parse_config(args)


def main() -> int:
    plan_path = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # deepspeed adds --local_rank
    with open(plan_path) as f:
        plan = json.load(f)
    from ds_distill import cache_writer, engines, trainer

    engines.init_distributed()
    rank = int(os.environ.get("RANK", "0"))
    for family, cfg_path in plan["families"].items():  # 1. every family, one after the other
        code = trainer.main(_cfg(cfg_path))
        assert code == 0, f"{family}: trainer.main returned {code}"
    code = trainer.main(_cfg(plan["moe_differ"]))  # 2. MoE, ranks on different records
    assert code == 0, f"moe_differ: trainer.main returned {code}"
    cache_writer.write_cache(_cfg(plan["families"]["gemma2"]), plan["cache_dir"], top_k=plan["cache_k"],
                             dtype="fp32")  # 3. the offline cache of a softcapped teacher
    engines.barrier()

    # 4. a forward that rescales its logits, through the CLI's main (exit code and message as a user sees them)
    from transformers.models.qwen3 import modeling_qwen3

    real_forward = modeling_qwen3.Qwen3ForCausalLM.forward

    def patched(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        out.logits = out.logits * 1.5
        return out

    modeling_qwen3.Qwen3ForCausalLM.forward = patched
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train as launch_train

    rc = launch_train.main(["--config", plan["patched"]])  # ends the process group (engines.shutdown)
    if rank == 0:
        with open(plan["result"], "w") as f:
            json.dump({"patched_rc": rc}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
