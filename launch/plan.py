"""Will this run fit? Per-device memory estimate from the config and the models' config.json (no weights, no GPU).

    python launch/plan.py --config ds_configs/X.yaml --gpu_memory_gb 80 --num_gpus 8 [--nodes 2]
                          [--section.key value ...]      (any training-config override, e.g. --train.zero_stage 2)

Prints the estimate for the config as written, whether it fits in --gpu_memory_gb (keeping --headroom free), and
the largest train.micro_batch_size (with the largest loss.chunk_size) that fits. The model behind the numbers is
documented in ds_distill/planner.py. Exit codes: 0 fits, 1 does not fit as configured, 2 a config problem.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu_memory_gb", type=float, required=True, help="memory of one device, GiB (e.g. 80)")
    ap.add_argument("--num_gpus", type=int, required=True, help="devices per node")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (world size = nodes x num_gpus)")
    ap.add_argument("--headroom", type=float, default=0.1,
                    help="fraction of device memory kept free for the CUDA context, allocator fragmentation, NCCL "
                         "(default 0.1)")
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                    help="gpu (default) or cpu (CPU ranks: fp32 for precision auto, only touched buckets count)")
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = parse_config(rest)
        from ds_distill import planner

        if not cfg.student.path or not os.path.isfile(os.path.join(cfg.student.path, "config.json")):
            raise DistillError(f"student.path: '{cfg.student.path}' has no config.json -> the planner reads only "
                               "config.json; point student.path at the model directory (or a copy of its config)")
        if cfg.loss.alpha > 0 and cfg.teacher.path and not os.path.isfile(
                os.path.join(cfg.teacher.path, "config.json")):
            raise DistillError(f"teacher.path: '{cfg.teacher.path}' has no config.json -> see student.path")
        world = args.num_gpus * args.nodes
        mem = args.gpu_memory_gb * 2 ** 30
        plan = planner.estimate(cfg, world_size=world, device=args.device)
        print(planner.render(plan, mem, args.headroom))
        # the config's sequences per rank per step (micro_batch_size x grad_accum_steps) bound the suggestion:
        # a larger micro-batch would change the global batch, not just its split
        per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        kw = dict(world_size=world, memory_bytes=mem, device=args.device, headroom=args.headroom)
        best = planner.suggest(cfg, max_micro_batch=per_rank, **kw)
        if best is None:
            print("\nsuggestion: nothing fits, even micro_batch_size 1 -> more GPUs (ZeRO-3 shards over all of "
                  "them), student.activation_checkpointing, teacher.offload_params, train.offload_optimizer, or LoRA")
        else:
            mbs, chunk, p = best
            print(f"\nsuggestion: train.micro_batch_size {mbs}, loss.chunk_size {chunk} "
                  f"(peak {p.peak / 2 ** 30:.2f} GiB); train.grad_accum_steps {max(1, per_rank // mbs)} keeps "
                  f"{per_rank} sequences per rank per step ({per_rank * world} in all)")
            most = planner.suggest(cfg, max_micro_batch=1024, **kw)
            if most is not None and most[0] > mbs:
                print(f"  (up to train.micro_batch_size {most[0]} fits, with a larger global batch)")
        budget = mem * (1 - args.headroom)
        return 0 if plan.peak <= budget else 1
    except DistillError as e:
        print(f"[ds_distill] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
