"""Student generation speed for on-policy distillation under ZeRO-3, side by side in one run.

    deepspeed --num_gpus 2 benchmarks/on_policy.py --out /tmp/onpolicy_bench [--hidden 256 --layers 4
        --batch 4 --new_tokens 32 --repeats 3]

Builds (rank 0, offline) the tiny tokenizer and teacher of ds_distill.tiny and a Qwen3 student of the given size,
then trains nothing: it builds the real Run (ZeRO-3 student engine over the ranks) and times, on every rank at once,
the same prompts (the first micro-batch's prompts, `--batch` rows) sampled to exactly `--new_tokens` tokens (EOS
disabled, so every path does the same work):

  gathered     generation.ReplicaGenerator: refresh the unsharded copy from the ZeRO-3 shards (timed, once) + sample
  engine       generation.EngineGenerator: the same KV-cache loop through the ZeRO-3 engine (all-gathers per token)
  naive        HF `generate` on the ZeRO-3 engine's model (synced_gpus=True, min_new_tokens = max_new_tokens)
  reference    plain HF `generate` of the student loaded unsharded from its directory, no ZeRO, no collectives
               (run on every rank at once, so each rank has the same share of the machine as in the other rows)

and one on-policy train_step (lmbda 1) split into generation, the teacher (its source's side: forward and head
gather, timed around the context's entry) and the rest (student forward + backward + optimizer step).
Prints a markdown table of tokens/s per rank (the slowest rank's time) and the ratios for docs/BENCHMARKS.md.
"""
import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ds_distill import engines, generation, models, trainer  # noqa: E402
from ds_distill.config import parse_config  # noqa: E402


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        engines.barrier()
        t0 = time.perf_counter()
        fn()
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        best = min(best, float(engines.all_reduce_max(dt)))  # the slowest rank's time
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--local_rank", type=int, default=-1)
    a = ap.parse_args()
    rank, world, _ = engines.init_distributed()
    out = os.path.abspath(a.out)
    if rank == 0:
        from ds_distill import tiny

        paths = tiny.build_all(os.path.join(out, "tiny"))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
        tiny.build_model(os.path.join(out, "student"), tok, hidden=a.hidden, layers=a.layers, heads=4, kv_heads=2,
                         intermediate=3 * a.hidden, vocab_rows=(len(tok) + 63) // 64 * 64, tie=True, seed=3)
        cfg = {"teacher": {"path": paths["teacher"], "ds_config": os.path.join(
                   os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "teacher_zero3.json")},
               "student": {"path": os.path.join(out, "student")}, "tokenizer_path": paths["tokenizer"],
               "data": {"train_files": [os.path.join(paths["data"], "instruction_train.jsonl")],
                        "format": "instruction", "max_length": 64},
               "loss": {"alpha": 1.0, "divergence": "reverse_kl", "impl": "chunked", "chunk_size": 64},
               "train": {"micro_batch_size": a.batch, "grad_accum_steps": 1, "zero_stage": 3, "max_steps": 10},
               "on_policy": {"lmbda": 1.0, "max_new_tokens": a.new_tokens},
               "eval": {"generations": 0}, "output_dir": os.path.join(out, "run"), "overwrite_output_dir": True}
        import yaml

        with open(os.path.join(out, "cfg.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
    engines.barrier()
    cfg = parse_config(["--config", os.path.join(out, "cfg.yaml")])
    run = trainer.build(cfg)
    dev = engines.device()
    mb = next(run.stream)
    lengths = generation.prompt_lengths(mb, "instruction", 0)
    prompts = [mb["input_ids"][i, :p].tolist() for i, p in enumerate(lengths)]
    N = a.new_tokens
    settings = generation.SamplingSettings(max_new_tokens=N, temperature=1.0, top_p=1.0, eos_token_id=-1,
                                           pad_token_id=run.tokenizer.pad_token_id, vocab_size=run.loss.vocab_size)
    hf = run.student_engine.module.model
    gathered = generation.ReplicaGenerator(
        lambda: models.unsharded_copy(hf, dev, torch.float32),
        lambda r: engines.copy_gathered(hf, r), settings, dev)
    engine = generation.EngineGenerator(hf, settings, dev,
                                        after=lambda: engines.forget_forward_trace(run.student_engine))
    ids, mask = generation.left_pad(prompts, settings.pad_token_id, dev)

    def naive():
        was = hf.training
        hf.eval()
        with torch.no_grad():
            hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=N,
                        min_new_tokens=N, pad_token_id=settings.pad_token_id, synced_gpus=True)
        hf.train(was)
        engines.forget_forward_trace(run.student_engine)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(cfg.student.path, dtype=torch.float32).to(dev).eval()

    def reference():
        with torch.no_grad():
            plain.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=N,
                           min_new_tokens=N, pad_token_id=settings.pad_token_id)

    sync_s = timed(gathered.sync, a.repeats)
    rows = {"gathered (sync + sample)": sync_s + timed(lambda: gathered.generate(prompts, 1), a.repeats),
            "engine loop (per-token gathers)": timed(lambda: engine.generate(prompts, 1), a.repeats),
            "naive HF generate through the engine": timed(naive, 1),
            "reference: plain HF generate, unsharded": timed(reference, a.repeats)}
    # one on-policy train_step: generation, teacher (its side's entry: forward + head gather), student + optimizer
    step_s, gen_s, teacher_s = [], [], []
    side = run.teacher.side

    @contextlib.contextmanager
    def timed_side(batch, payload, dev_):
        t0 = time.perf_counter()
        with side(batch, payload, dev_) as kwargs:
            if dev_.type == "cuda":
                torch.cuda.synchronize(dev_)
            teacher_s[-1] += time.perf_counter() - t0
            yield kwargs

    run.teacher.side = timed_side
    for _ in range(2):
        teacher_s.append(0.0)
        t0 = time.perf_counter()
        sums = trainer.train_step(run, [next(run.stream)])
        run.state.step += 1
        step_s.append(time.perf_counter() - t0)
        gen_s.append(sums.extra["onpolicy/gen_seconds"])
    if rank == 0:
        tokens = len(prompts) * N
        ref = tokens / rows["reference: plain HF generate, unsharded"]
        naive_tps = tokens / rows["naive HF generate through the engine"]
        print(f"\nstudent: Qwen3 hidden {a.hidden}, {a.layers} layers, "
              f"{sum(p.numel() for p in plain.parameters()) / 1e6:.2f} M parameters; {world} ranks, ZeRO-3, "
              f"{len(prompts)} prompts x {N} new tokens per rank; best of {a.repeats} (naive: 1 run)\n")
        print("| path | s (slowest rank) | tokens/s per rank | x naive | x reference |\n|---|---|---|---|---|")
        result = {}
        for name, s in rows.items():
            tps = tokens / s
            result[name] = {"seconds": s, "tokens_per_s": tps}
            print(f"| {name} | {s:.3f} | {tps:.1f} | {tps / naive_tps:.2f} | {tps / ref:.2f} |")
        print(f"\ngathered: the refresh from the shards took {sync_s:.3f} s of it")
        st, g, t = step_s[-1], gen_s[-1], teacher_s[-1]
        print(f"on-policy train_step (second of two, lmbda 1, rank 0): {st:.2f} s = generation {g:.2f} s "
              f"({g / st:.0%}) + teacher {t:.2f} s ({t / st:.0%}) + student forward/backward/step {st - g - t:.2f} s "
              f"({(st - g - t) / st:.0%})")
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"rows": result, "sync_s": sync_s, "step_s": step_s, "gen_s": gen_s, "teacher_s": teacher_s,
                       "args": vars(a)}, f)
    engines.barrier()
    engines.shutdown()


if __name__ == "__main__":
    main()
