"""On-policy steps under real DeepSpeed, everything the test recomputes elsewhere dumped (one launch, several checks).

    deepspeed --num_gpus 2 tests/scripts/onpolicy_check.py ONPOLICY.yaml PLAIN.yaml DIVERGENCE...

1. PLAIN.yaml (no on_policy section) and ONPOLICY.yaml with on_policy.lmbda 0 (its other on_policy keys kept):
   two real train_steps each from the same initial weights; rank 0 writes both runs' step sums (lmbda0.json).
2. ONPOLICY.yaml as given (lmbda 1): one train_step per DIVERGENCE (the run's loss.divergence replaced), and for
   each step (rank 0, <output_dir>/onpolicy_check/step{i}/): the step-start student (weights.safetensors, gathered
   from the ZeRO-3 shards), the full gradients before the optimizer step (grads.safetensors), every rank's trained
   micro-batches (batches.safetensors) with the prompts, seeds and completions the generator recorded
   (samples.json), and the step's global sums (sums.json). The last step samples through the ZeRO-3 engine
   (on_policy.generator: engine), the others with the gathered copy. A DIVERGENCE written seqkd:NAME makes that
   step and the later ones teacher-sampled (on_policy.lmbda 0, seq_kd 1: the teacher's unsharded copy).
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ds_distill import engines, generation, trainer  # noqa: E402
from ds_distill.config import parse_config  # noqa: E402


def flat(sums: trainer.StepSums) -> dict:
    """A step's StepSums as one flat dict (its extra entries: the on-policy counts, at the top level)."""
    row = {k: v for k, v in dataclasses.asdict(sums).items() if k != "extra"}
    return {**row, **sums.extra}


def steps(run, n):
    out = []
    for _ in range(n):
        mbs = [next(run.stream) for _ in range(run.cfg.train.grad_accum_steps)]
        out.append(flat(trainer.train_step(run, mbs)))
        run.state.step += 1
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    onpolicy_yaml, plain_yaml, divergences = args[0], args[1], args[2:]
    cfg = parse_config(["--config", onpolicy_yaml])
    root = os.path.join(cfg.output_dir, "onpolicy_check")

    # 1. lmbda 0 == no section
    plain = trainer.build(parse_config(["--config", plain_yaml, "--output_dir", os.path.join(root, "plain")]))
    zero = trainer.build(parse_config(["--config", onpolicy_yaml, "--on_policy.lmbda", "0",
                                       "--output_dir", os.path.join(root, "zero")]))
    result = {"plain": steps(plain, 2), "lmbda0": steps(zero, 2), "lmbda0_has_builder": zero.on_policy is not None}
    del plain, zero

    # 2. on-policy steps, one per divergence
    run = trainer.build(cfg)
    eng = run.student_engine
    recorded = []
    run.on_policy.record = recorded.append
    prepare = run.on_policy.prepare
    trained = []

    def recording_prepare(micro_batches, step):
        out, stats = prepare(micro_batches, step)
        trained.append(out)
        return out, stats

    run.on_policy.prepare = recording_prepare
    for i, div in enumerate(divergences):
        if div.startswith("seqkd:"):  # this step the teacher samples (on_policy.seq_kd 1), scored with this divergence
            div = div[len("seqkd:"):]
            seq_cfg = dataclasses.replace(cfg, on_policy=dataclasses.replace(cfg.on_policy, lmbda=0.0, seq_kd=1.0))
            built = generation.build_on_policy(seq_cfg, run.rank, run.tokenizer, eng, run.loss.vocab_size,
                                            torch.float32, run.teacher_engine)
            run.on_policy.generators["teacher"] = built.generators["teacher"]
            run.on_policy.lmbda, run.on_policy.seq_kd = 0.0, 1.0
        elif i == len(divergences) - 1:  # the last step samples through the ZeRO-3 engine (generator: engine)
            engine_cfg = dataclasses.replace(cfg, on_policy=dataclasses.replace(cfg.on_policy, generator="engine"))
            run.on_policy.generators["student"] = generation.build_on_policy(
                engine_cfg, run.rank, run.tokenizer, eng, run.loss.vocab_size, torch.float32).generators["student"]
        run.loss = eng.module.loss_spec = dataclasses.replace(run.loss, divergence=div)
        start = engines.consolidated_state_dict(eng)  # collective: the step-start student
        grads = {}

        def before_step(_sums):
            for name, p in eng.module.named_parameters():  # collective under ZeRO-3: same order on every rank
                g = engines.full_grad(p)
                if g is not None:
                    grads[name[len("model."):]] = g.detach().float().clone().contiguous()

        recorded.clear()
        trained.clear()
        mbs = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]
        sums = flat(trainer.train_step(run, mbs, before_step=before_step))
        run.state.step += 1
        all_batches = engines.all_gather_object(trained[0])
        all_samples = engines.all_gather_object(list(recorded))
        if run.rank == 0:
            d = os.path.join(root, f"step{i}")
            os.makedirs(d, exist_ok=True)
            save_file({k[len("model."):] if k.startswith("model.") else k: v.contiguous() for k, v in start.items()},
                      os.path.join(d, "weights.safetensors"))
            save_file(grads, os.path.join(d, "grads.safetensors"))
            save_file({f"r{r}.m{m}.{k}": v.contiguous() for r, mb_list in enumerate(all_batches)
                       for m, mb in enumerate(mb_list) for k, v in mb.items() if k in
                       ("input_ids", "attention_mask", "labels")}, os.path.join(d, "batches.safetensors"))
            with open(os.path.join(d, "samples.json"), "w") as f:
                json.dump([row for rows in all_samples for row in rows], f)
            with open(os.path.join(d, "sums.json"), "w") as f:
                json.dump({**sums, "divergence": div, "generator": type(run.on_policy.generators["student"]).__name__,
                       "seq_kd": run.on_policy.seq_kd, "vocab_size": run.loss.vocab_size, "step": run.state.step},
                          f)
    if run.rank == 0:
        with open(os.path.join(root, "lmbda0.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    engines.shutdown()


if __name__ == "__main__":
    main()
