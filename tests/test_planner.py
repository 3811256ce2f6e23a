"""Memory planner (ds_distill/planner.py, launch/plan.py).

1. The activation model is exact: bytes autograd saves for backward (counted with saved_tensors_hooks, distinct
   storages, parameters excluded) on Qwen3 (q/k norms, GQA) and Llama layers, with and without activation
   checkpointing, equal the planner's per-layer formula.
2. read_arch counts a model's parameters from config.json alone (meta device) exactly.
3. launch/plan.py on the real Qwen3-4B -> Qwen3-0.6B dimensions prints the components, and its suggestion grows
   with the device memory and fits its own budget.
4. Estimate vs measurement (2 CPU ranks, one launch): three configurations of a 32k-vocabulary student (11M
   parameters, tied) and teacher (31M, untied): full fine-tuning, activation checkpointing with a larger batch and
   chunk, LoRA. WHAT IS COMPARED: per configuration, rank 0's peak resident memory (VmHWM, reset through
   /proc/self/clear_refs) during the training steps, minus its resident memory (VmRSS) just before `trainer.build`
   of that configuration; the same quantity for a "nil" configuration (1-layer, 8-wide models, the same tokenizer,
   data and code path) measured after a warm-up nil build is subtracted, and so is the planner's estimate for that
   nil configuration from the planner's estimate. What remains on both sides is the memory the models, optimizer,
   activations and loss buffers add. glibc is told to return large blocks to the OS at once
   (MALLOC_MMAP_THRESHOLD_), so resident memory follows live memory. Required: within 25% for each configuration.
"""
import json
import os
import sys

import pytest
import torch

from conftest import ROOT, assert_ok, run_deepspeed, write_yaml

RUNS = [  # (name, dotted overrides); nil0 warms the process up (first-use costs), nil is the baseline
    ("nil0", {"student.path": "@nil_student", "teacher.path": "@nil_teacher", "train.micro_batch_size": 1,
              "loss.chunk_size": 16}),
    ("nil", {"student.path": "@nil_student", "teacher.path": "@nil_teacher", "train.micro_batch_size": 1,
             "loss.chunk_size": 16}),
    ("full", {}),
    ("ckpt", {"student.activation_checkpointing": True, "train.micro_batch_size": 4, "loss.chunk_size": 512}),
    ("lora", {"student.lora.rank": 16, "student.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "train.micro_batch_size": 4}),
]
MEASURED_STEPS = 2  # DeepSpeed's ZeRO-3 trace completes in step 1; step 2 shows its steady-state prefetch/reuse


def _argv(cfg_path: str, over: dict, assets: str) -> list:
    argv = ["--config", cfg_path]
    for k, v in over.items():
        if isinstance(v, str) and v.startswith("@"):
            v = os.path.join(assets, v[1:])
        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return argv


def _drive(cfg_path: str, assets: str, out: str) -> None:
    """Script mode (under deepspeed): build and train each configuration in turn, recording rank 0's memory."""
    import ctypes
    import dataclasses
    import gc
    import re

    sys.path.insert(0, str(ROOT))
    from ds_distill import engines, trainer
    from ds_distill.config import parse_config

    libc = ctypes.CDLL("libc.so.6")

    def rss() -> dict:
        with open("/proc/self/status") as f:
            s = f.read()
        return {k: int(re.search(k + r":\s+(\d+)", s).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}

    def settle() -> None:
        gc.collect()
        libc.malloc_trim(0)

    res = {}
    for name, over in RUNS:
        cfg = parse_config(_argv(cfg_path, over, assets))
        cfg = dataclasses.replace(cfg, output_dir=os.path.join(out, name))
        settle()
        engines.barrier()
        before = rss()["VmRSS"]
        run = trainer.build(cfg)
        settle()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak := current: the loading phase (host memory on GPUs) is not compared
        for _ in range(MEASURED_STEPS):
            trainer.train_step(run, [next(run.stream) for _ in range(cfg.train.grad_accum_steps)])
        res[name] = {"train_peak": rss()["VmHWM"] - before, "before": before}
        del run
        settle()
        engines.barrier()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out, "mem.json"), "w") as f:
            json.dump(res, f)
    engines.shutdown()


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if not x.startswith("--local_rank")]
    _drive(*a[:3])
    sys.exit(0)


# ------------------------------------------------------------------------------------------------------------------

def _saved_bytes(model, ids, mask) -> int:
    """Bytes of the distinct storages autograd saves for backward in model.model's forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_activation_model_equals_saved_tensors(family, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    from ds_distill.planner import read_arch

    kw = dict(vocab_size=300, hidden_size=48, intermediate_size=136, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)  # Hq = 64 != H = 48, GQA: every term is distinguishable
    cfg = Qwen3Config(**kw) if family == "qwen3" else LlamaConfig(**kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    arch = read_arch(str(tmp_path))
    assert arch.qk_norm == (family == "qwen3")
    B, S = 2, 24
    ids = torch.randint(0, 300, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -5:] = 0  # padding: the 4-D float mask exists, as in training batches
    tok = B * S
    model.train()
    got = _saved_bytes(model, ids, mask)
    # per layer: the formula + its own [B,1,S,S] fp32 mask; once: final norm (2H+1), ids (int64), cos/sin
    expect = 4 * tok * (arch.layers * arch.act_per_token() + 2 * arch.hidden + 1) + 8 * tok \
        + arch.layers * 4 * B * S * S + 2 * 4 * S * arch.head_dim
    assert got == expect, (got, expect)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got_ckpt = _saved_bytes(model, ids, mask)
    expect_ckpt = 4 * tok * (arch.layers * arch.hidden + 2 * arch.hidden + 1) + 8 * tok
    assert got_ckpt == expect_ckpt, (got_ckpt, expect_ckpt)


def test_read_arch_counts_parameters_from_config_only(tiny_assets):
    from transformers import AutoModelForCausalLM

    from ds_distill.planner import read_arch

    for key in ("student", "teacher"):
        arch = read_arch(tiny_assets[key])
        model = AutoModelForCausalLM.from_pretrained(tiny_assets[key])
        assert arch.params == sum(p.numel() for p in model.parameters())  # tied weights once
        assert arch.tied == (key == "student")
        assert arch.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())


def _qwen3_dirs(tmp_path):
    """config.json-only directories with the real Qwen3-4B and Qwen3-0.6B dimensions."""
    from transformers import Qwen3Config

    shapes = {"Qwen3-4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                               num_attention_heads=32, num_key_value_heads=8),
              "Qwen3-0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8)}
    dirs = {}
    for name, s in shapes.items():
        d = tmp_path / name
        Qwen3Config(vocab_size=151936, head_dim=128, tie_word_embeddings=True, **s).save_pretrained(d)
        dirs[name] = str(d)
    return dirs


def test_plan_cli_on_qwen3_4b_to_0_6b(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)  # in-process: one import of transformers for all the calls below
    dirs = _qwen3_dirs(tmp_path)
    base = ["--config", str(ROOT / "ds_configs" / "qwen3_4b_to_0.6b.yaml"), "--teacher.path", dirs["Qwen3-4B"],
            "--student.path", dirs["Qwen3-0.6B"], "--num_gpus", "8",
            "--train.grad_accum_steps", "64"]  # 4 x 64 sequences per rank: the suggestion is bounded by memory

    class Out:
        def __init__(self, rc, stdout):
            self.returncode, self.stdout = rc, stdout

    def plan(mem, *extra):
        rc = cli.main(base + ["--gpu_memory_gb", str(mem), *extra])
        assert rc in (0, 1), capsys.readouterr().err
        return Out(rc, capsys.readouterr().out)

    from ds_distill.planner import read_arch

    # the meta-device count equals the count by hand: embeddings (tied) + 28 x (q, k, v, o, q/k norms, MLP, 2 norms)
    layer = 1024 * 2048 * 2 + 1024 * 1024 * 2 + 2 * 128 + 3 * 1024 * 3072 + 2 * 1024
    assert read_arch(dirs["Qwen3-0.6B"]).params == 151936 * 1024 + 28 * layer + 1024 == 596_049_920

    p80 = plan(80)
    out = p80.stdout
    for part in ("student params (ZeRO-3 shard)", "AdamW m + v", "teacher params (replicated: whole)",
                 "student activations", "loss chunk buffers", "= PEAK on device", "suggestion:",
                 "auto would choose replicate", "all-gathers 7.04 GB per rank",
                 "recommendation: teacher.sharding: replicate"):
        assert part in out, (part, out)  # 7.49 GiB of teacher in 80 GiB: auto replicates it
    z3 = plan(80, "--teacher.sharding", "zero3").stdout
    assert "teacher params (ZeRO-3 shard)" in z3 and "teacher lm_head (gathered)" in z3
    peak = {o: float([x for x in o.splitlines() if "= PEAK on device" in x][0].split()[-1]) for o in (out, z3)}
    # the peak is at the student forward end: the whole teacher stays resident, its lm_head is no longer gathered
    assert abs(peak[out] - peak[z3] - (7.492 - 0.937 - 0.724)) < 0.01, peak
    assert p80.returncode == 0 and "fits in 80.0 GiB" in out

    def suggested(o):
        line = [x for x in o.splitlines() if x.startswith("suggestion:")][0]
        mbs = int(line.split("micro_batch_size ")[1].split(",")[0])
        peak = float(line.split("(peak ")[1].split(" GiB")[0])
        return mbs, peak

    mbs80, peak80 = suggested(out)
    mbs24, peak24 = suggested(plan(24).stdout)
    assert mbs24 < mbs80 and peak24 <= 24 * 0.9 and peak80 <= 80 * 0.9
    # ZeRO-3 shards shrink with more ranks: 2 nodes of 8 leave more room than 1
    mbs_2n, _ = suggested(plan(80, "--nodes", "2").stdout)
    assert mbs_2n >= mbs80
    # on-policy: the gathered student copy is resident (0.596 G params x 2 bytes), the sampler's KV cache a phase
    onp = plan(80, "--on_policy.lmbda", "0.5", "--on_policy.max_new_tokens", "256").stdout
    assert "on-policy student copy (unsharded, generator: gathered)" in onp and "KV cache" in onp, onp
    res = {o: float([x for x in o.splitlines() if "= resident on device" in x][0].split()[-1]) for o in (out, onp)}
    assert abs(res[onp] - res[out] - 596_049_920 * 2 / 2 ** 30) < 0.01, res
    engine = plan(80, "--on_policy.lmbda", "0.5", "--on_policy.generator", "engine").stdout
    assert "on-policy student copy" not in engine and "KV cache" in engine


@pytest.fixture(scope="module")
def planner_assets(tmp_path_factory):
    """32k-row tokenizer (the tiny BPE + added tokens, so every lm_head row is a real token), student 11M params
    (tied), teacher 31M (untied), nil models, and long text records (every sequence fills max_length)."""
    from ds_distill.tiny import build_model, build_tokenizer, stdlib_files

    out = tmp_path_factory.mktemp("planner")
    tok = build_tokenizer(out / "tokenizer", vocab_size=1000)
    tok.add_tokens([f"<extra_{i}>" for i in range(32000 - len(tok))])
    tok.save_pretrained(str(out / "tokenizer"))
    common = dict(vocab_rows=32000, kv_heads=2)
    build_model(out / "student", tok, tie=True, seed=2, hidden=256, layers=4, heads=4, intermediate=768, **common)
    build_model(out / "teacher", tok, tie=False, seed=1, hidden=384, layers=4, heads=6, intermediate=1024, **common)
    build_model(out / "nil_student", tok, tie=True, seed=2, hidden=8, layers=1, heads=2, intermediate=16,
                vocab_rows=32000, kv_heads=1)
    build_model(out / "nil_teacher", tok, tie=False, seed=1, hidden=8, layers=1, heads=2, intermediate=16,
                vocab_rows=32000, kv_heads=1)
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:40])
    with open(out / "long.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"text": text[i * 6000:(i + 1) * 6000]}) + "\n")
    return str(out)


@pytest.mark.multirank
def test_estimate_within_25_percent_of_measured_peak(planner_assets, tmp_path):
    from ds_distill import planner
    from ds_distill.config import parse_config

    a = planner_assets
    cfg = {"teacher": {"path": f"{a}/teacher", "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json")},
           "student": {"path": f"{a}/student"}, "tokenizer_path": f"{a}/tokenizer",
           "data": {"train_files": [f"{a}/long.jsonl"], "format": "text", "max_length": 256},
           "loss": {"alpha": 0.5, "temperature": 2.0, "impl": "chunked", "chunk_size": 256},
           "train": {"micro_batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3, "warmup_steps": 1, "max_steps": 3,
                     "zero_stage": 3, "precision": "fp32"},
           "checkpoint": {"resume": "never"}, "eval": {"generations": 0}, "output_dir": str(tmp_path / "out"),
           "overwrite_output_dir": True, "wandb": {"mode": "disabled"}}
    cfg_path = write_yaml(cfg, tmp_path / "c.yaml")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_deepspeed(__file__, [cfg_path, a, str(out)], timeout=1200,
                         env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert_ok(proc)
    mem = json.loads((out / "mem.json").read_text())
    est = {name: planner.estimate(parse_config(_argv(cfg_path, over, a)), world_size=2, device="cpu").peak
           for name, over in RUNS}
    report = []
    for name in ("full", "ckpt", "lora"):
        measured = mem[name]["train_peak"] - mem["nil"]["train_peak"]
        estimated = est[name] - est["nil"]
        report.append(f"{name}: measured {measured / 2**20:.1f} MiB, estimated {estimated / 2**20:.1f} MiB "
                      f"({(estimated - measured) / measured:+.1%})")
    print("\n".join(report))
    for name, line in zip(("full", "ckpt", "lora"), report):
        measured = mem[name]["train_peak"] - mem["nil"]["train_peak"]
        assert measured > 100 * 2**20, line  # far above the noise of a CPU process
        assert abs(est[name] - est["nil"] - measured) <= 0.25 * measured, "\n".join(report)


def test_separate_placement_puts_teacher_memory_on_teacher_ranks_only(tmp_path, capsys):
    """teacher.placement: separate (issue 16): the student ranks' estimate is the colocated one of world - K ranks
    without the teacher's weights (its lm_head whole instead); a teacher rank holds the teacher over K ranks (or
    whole), its forward and the queued hidden states, and nothing of the student."""
    import importlib.util

    from ds_distill import planner
    from ds_distill.config import parse_config

    dirs = _qwen3_dirs(tmp_path)
    argv = ["--config", str(ROOT / "ds_configs" / "qwen3_4b_to_0.6b.yaml"), "--teacher.path", dirs["Qwen3-4B"],
            "--student.path", dirs["Qwen3-0.6B"], "--teacher.placement", "separate", "--teacher.ranks", "2"]
    cfg = parse_config(argv)
    t, s = planner.read_arch(dirs["Qwen3-4B"]), planner.read_arch(dirs["Qwen3-0.6B"])
    student = planner.estimate(cfg, world_size=8, role="student", teacher_ranks=2, teacher_sharding="zero3")
    colocated6 = planner.estimate(cfg, world_size=6, teacher_sharding="zero3")
    items = {i.name: i.bytes for i in student.states}
    assert student.world_size == 6
    assert items["student params (ZeRO-3 shard)"] == -(-s.params // 6) * 2  # bf16 over the 6 student ranks
    assert not any(n.startswith("teacher params") for n in items) and "teacher forward" not in student.phases
    assert items["teacher lm_head (whole, sent by its teacher rank)"] == 151936 * 2560 * 2
    same = [i for i in colocated6.states if not i.name.startswith("teacher")]
    assert [(i.name, i.bytes) for i in same] == [(i.name, i.bytes) for i in student.states
                                                 if not i.name.startswith("teacher")]
    for sharding, want in (("zero3", -(-t.params // 2) * 2), ("replicate", t.params * 2)):
        teacher = planner.estimate(cfg, world_size=8, role="teacher", teacher_ranks=2, teacher_sharding=sharding)
        assert [i.bytes for i in teacher.states] == [want]
        queued = [i for i in teacher.phases["teacher forward"] if i.name.startswith("hidden states queued")][0]
        B, S = cfg.train.micro_batch_size, cfg.data.max_length
        assert queued.bytes == (planner.SEPARATE_QUEUE_DEPTH + 1) * 3 * B * S * 2560 * 2  # 3 students per teacher

    spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "launch" / "plan.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(argv + ["--num_gpus", "8", "--gpu_memory_gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "6 student rank(s), 2 teacher rank(s)" in out and "student ranks:" in out and "teacher ranks:" in out
    assert cli.main(argv + ["--num_gpus", "2", "--gpu_memory_gb", "80", "--teacher.ranks", "2"]) == 2
