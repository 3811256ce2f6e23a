"""Will this run fit? Per-device memory estimate from the config and the models' config.json (no weights, no GPU).

    python launch/plan.py --config ds_configs/X.yaml --gpu_memory_gb 80 --num_gpus 8 [--nodes 2]
                          [--section.key value ...]      (any training-config override, e.g. --train.zero_stage 2)

Prints, for a KD run, the teacher's two placements (teacher.sharding replicate / zero3: memory, and the ZeRO-3
all-gathers' volume and time at --intra_node_gbps / --inter_node_gbps against the teacher's compute at --gpu_tflops)
with a recommendation; then the estimate for the config as written (teacher.sharding auto resolved as the trainer
would on these GPUs), whether it fits in --gpu_memory_gb (keeping --headroom free), and the largest
train.micro_batch_size (with the largest loss.chunk_size) that fits. The model behind the numbers is
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
    ap.add_argument("--intra_node_gbps", type=float, default=150.0,
                    help="all-gather bandwidth per GPU inside a node, GB/s (default 150: NVLink, measured by "
                         "nccl-tests all_gather_perf busbw, not the link's peak)")
    ap.add_argument("--inter_node_gbps", type=float, default=25.0,
                    help="all-gather bandwidth per GPU between nodes, GB/s (default 25: 200-400 Gb/s InfiniBand "
                         "per GPU)")
    ap.add_argument("--gpu_tflops", type=float, default=400.0,
                    help="sustained bf16 TFLOP/s of one GPU for the teacher's forward (default 400: H100 at ~40%% "
                         "of peak)")
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
        if cfg.teacher.placement == "separate" and cfg.loss.alpha > 0 and cfg.teacher.path:
            return _separate(cfg, planner, args, world, mem)
        sharding = cfg.teacher.sharding
        if cfg.loss.alpha > 0 and cfg.teacher.path:
            sharding = _teacher_placement(cfg, planner, args, world, mem)
        plan = planner.estimate(cfg, world_size=world, device=args.device, teacher_sharding=sharding)
        print(planner.render(plan, mem, args.headroom))
        # the config's sequences per rank per step (micro_batch_size x grad_accum_steps) bound the suggestion:
        # a larger micro-batch would change the global batch, not just its split
        per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        kw = dict(world_size=world, memory_bytes=mem, device=args.device, headroom=args.headroom)
        kw["teacher_sharding"] = sharding
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


def _separate(cfg, planner, args, world: int, mem: float) -> int:
    """teacher.placement: separate: the student ranks' and a teacher rank's memory, each against the device."""
    K = cfg.teacher.ranks
    if not 1 <= K < world:
        raise DistillError(f"teacher.ranks: {K} of {world} ranks leaves no student rank -> more --num_gpus / --nodes "
                           "or fewer teacher.ranks")
    t = planner.read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code)
    prec = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if args.device == "gpu" else "fp32")
    e = 4 if prec == "fp32" else 2
    sharding = cfg.teacher.sharding if cfg.teacher.sharding != "auto" else planner.auto_teacher_sharding(
        t.params * e, mem if args.device == "gpu" else None, offload_params=cfg.teacher.offload_params)
    kw = dict(world_size=world, device=args.device, teacher_sharding=sharding, teacher_ranks=K)
    plans = {role: planner.estimate(cfg, role=role, **kw) for role in ("student", "teacher")}
    budget = mem * (1 - args.headroom)
    print(f"teacher.placement: separate: {world - K} student rank(s), {K} teacher rank(s) ({sharding}; "
          f"teacher.sharding: {cfg.teacher.sharding})\n")
    for role, plan in plans.items():
        print(f"{role} ranks:")
        print(planner.render(plan, mem, args.headroom) + "\n")
    per_rank = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    best = planner.suggest(cfg, max_micro_batch=per_rank, memory_bytes=mem, headroom=args.headroom, role="student",
                           **{k: v for k, v in kw.items() if k != "device"}, device=args.device)
    if best is not None:
        print(f"suggestion (student ranks): train.micro_batch_size {best[0]}, loss.chunk_size {best[1]} (peak "
              f"{best[2].peak / 2 ** 30:.2f} GiB); check the teacher ranks' estimate at that micro-batch size")
    return 0 if all(p.peak <= budget for p in plans.values()) else 1


def _teacher_placement(cfg, planner, args, world: int, mem: float) -> str:
    """Print replicate vs zero3 for the teacher (memory, and the gathers' time against the teacher's compute);
    returns the placement the rest of the estimate uses (the config's, or auto's choice)."""
    t = planner.read_arch(cfg.teacher.path, cfg.teacher.trust_remote_code)
    prec = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if args.device == "gpu" else "fp32")
    e = 4 if prec == "fp32" else 2
    budget = mem * (1 - args.headroom)
    peaks = {p: planner.estimate(cfg, world_size=world, device=args.device, teacher_sharding=p).peak
             for p in ("replicate", "zero3")}
    received, secs = planner.teacher_gather_seconds(t.params, e, world, args.num_gpus,
                                                    intra_gbps=args.intra_node_gbps, inter_gbps=args.inter_node_gbps)
    tokens = cfg.train.micro_batch_size * cfg.data.max_length
    compute = 2 * t.params * tokens / (args.gpu_tflops * 1e12)
    auto = planner.auto_teacher_sharding(t.params * e, mem if args.device == "gpu" else None,
                                         offload_params=cfg.teacher.offload_params)
    print(f"teacher placement (teacher.sharding: {cfg.teacher.sharding}; auto would choose {auto}):")
    print(f"  replicate: {t.params * e / 2 ** 30:.2f} GiB of teacher weights per rank, peak "
          f"{peaks['replicate'] / 2 ** 30:.2f} GiB ({'fits' if peaks['replicate'] <= budget else 'does NOT fit'}); "
          "no collective in the teacher's forward")
    print(f"  zero3:     peak {peaks['zero3'] / 2 ** 30:.2f} GiB; each micro-batch all-gathers {received / 1e9:.2f} GB "
          f"per rank, ~{secs * 1e3:.0f} ms at {args.intra_node_gbps:g} GB/s in a node and {args.inter_node_gbps:g} "
          f"GB/s across nodes, against ~{compute * 1e3:.0f} ms of teacher compute ({tokens} tokens at "
          f"{args.gpu_tflops:g} TFLOP/s)")
    if peaks["replicate"] <= budget and not cfg.teacher.offload_params:
        print("  recommendation: teacher.sharding: replicate (same results, no teacher all-gathers)" + (
            "" if auto == "replicate" else f"; auto keeps zero3 here (the teacher takes more than "
            f"{planner.REPLICATE_FRACTION:.0%} of a GPU): set teacher.sharding: replicate to use it"))
    elif secs > compute:
        print("  recommendation: teacher.sharding: zero3 (replicate does not fit); the gathers take longer than the "
              "teacher's compute: a larger train.micro_batch_size (with student.activation_checkpointing) hides "
              "them better, and more nodes do not help the teacher")
    else:
        print("  recommendation: teacher.sharding: zero3 (replicate does not fit); the gathers are shorter than "
              "the teacher's compute")
    print()
    return cfg.teacher.sharding if cfg.teacher.sharding != "auto" else auto


if __name__ == "__main__":
    sys.exit(main())
