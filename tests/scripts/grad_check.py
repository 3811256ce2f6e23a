"""Run ONE real train_step under DeepSpeed and dump the step's full gradients before the optimizer touches them.

    deepspeed --num_gpus 2 tests/scripts/grad_check.py --config cfg.yaml   (output: <output_dir>/grad_check/)

Writes (rank 0): grads.safetensors (full gradient of every student parameter, gathered from ZeRO shards),
batches.safetensors (every rank's micro-batches, in order), sums.json (the step's global sums as logged).
The test recomputes the same step in fp64 in one process, on the concatenated batch, and compares.
"""
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ds_distill import engines, trainer  # noqa: E402
from ds_distill.config import parse_config  # noqa: E402


def main():
    cfg = parse_config(sys.argv[1:])
    run = trainer.build(cfg)
    micro_batches = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]
    grads = {}

    def before_step(_sums):
        for name, p in run.student_engine.module.named_parameters():  # collective under ZeRO-3: same order
            g = engines.full_grad(p)
            if g is not None:
                grads[name[len("model."):]] = g.detach().float().clone().contiguous()

    sums = trainer.train_step(run, micro_batches, before_step=before_step)
    gathered = [None] * run.world_size
    dist.all_gather_object(gathered, micro_batches)
    if run.rank == 0:
        out = os.path.join(cfg.output_dir, "grad_check")
        os.makedirs(out, exist_ok=True)
        save_file(grads, os.path.join(out, "grads.safetensors"))
        flat = {}
        for r, mbs in enumerate(gathered):
            for i, mb in enumerate(mbs):
                for k, v in mb.items():
                    flat[f"r{r}.m{i}.{k}"] = v.contiguous()
        save_file(flat, os.path.join(out, "batches.safetensors"))
        with open(os.path.join(out, "sums.json"), "w") as f:
            json.dump({**dataclasses.asdict(sums), "vocab_size": run.loss.vocab_size}, f)
    engines.shutdown()


if __name__ == "__main__":
    main()
