"""Distil a teacher LLM into a student on DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config ds_configs/X.yaml [--section.key value ...]
    torchrun --nproc_per_node N launch/train.py --config ...        (also works)
    srun python launch/train.py --config ...                         (SLURM_* mapped to RANK/WORLD_SIZE)

`--help` lists every key with its documentation; `--print_config` prints the resolved config and exits.
Exit codes: 0 done; 2 a problem the user must fix: config / data / model directories / output_dir / a full disk /
a non-finite loss or gradient (the message names the key or file; nothing was overwritten); 143 preempted (SIGTERM,
or the launcher ended: every rank saved a checkpoint at the next step boundary, run the same command to resume);
3 the watchdog
(train.watchdog_timeout_s: a collective was stuck, each rank printed its stack); 1 otherwise (a bug: traceback).
Under the deepspeed launcher its own exit code is what the shell sees (it passes on the first failing rank's code).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError, run_collective, run_main  # noqa: E402


def _rank_tag() -> str:
    # DS_DISTILL_GLOBAL_*: the launched rank numbering when teacher.placement: separate split the ranks by role
    world = int(os.environ.get("DS_DISTILL_GLOBAL_WORLD_SIZE",
                               os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    rank = os.environ.get("DS_DISTILL_GLOBAL_RANK", os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    return f"rank {rank}/{world}: " if world > 1 else ""


def _fail(e: Exception) -> int:
    # Each rank prints its own error (one only it saw, a corrupt shard of its own, must never stay hidden); an error
    # every rank raised from the same collective decision (e.shared) is printed once, by rank 0.
    if not getattr(e, "shared", False) or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"[ds_distill] error: {'' if getattr(e, 'shared', False) else _rank_tag()}{e}", file=sys.stderr,
              flush=True)
    return 2


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)  # --help / --print_config exit here, before deepspeed is imported
    except DistillError as e:
        return _fail(e)
    from ds_distill import engines, trainer

    def peer_failed(e: Exception):
        if engines.is_peer_failure(e):  # a collective broke because another rank stopped: its error is above
            print(f"[ds_distill] {_rank_tag()}stopped: another rank failed ({str(e).strip().splitlines()[0]}) -> "
                  "see that rank's error above", file=sys.stderr, flush=True)
            return 1
        return None

    return run_collective(lambda: trainer.main(cfg), _fail, engines.shutdown, peer_failed)


if __name__ == "__main__":
    run_main(main)
