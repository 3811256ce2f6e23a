"""Distil a teacher LLM into a student on DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config ds_configs/X.yaml [--section.key value ...]
    torchrun --nproc_per_node N launch/train.py --config ...        (also works)
    srun python launch/train.py --config ...                         (SLURM_* mapped to RANK/WORLD_SIZE)

`--help` lists every key with its documentation; `--print_config` prints the resolved config and exits.
Exit codes: 0 done; 2 a problem the user must fix: config / data / model directories / output_dir / a full disk /
a non-finite loss or gradient (the message names the key or file; nothing was overwritten); 143 preempted (SIGTERM:
every rank saved a checkpoint at the next step boundary, run the same command to resume); 3 the watchdog
(train.watchdog_timeout_s: a collective was stuck, each rank printed its stack); 1 otherwise (a bug: traceback).
Under the deepspeed launcher its own exit code is what the shell sees (it passes on the first failing rank's code).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def _fail(e: Exception) -> int:
    # Every rank raises the same DistillError (the checks are deterministic and collective decisions are shared),
    # so only rank 0 prints it: one message, not one per rank. An error only one rank can see says so (rank_local).
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0" or getattr(e, "rank_local", False):
        print(f"[ds_distill] error: {e}", file=sys.stderr, flush=True)
    return 2


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)  # --help / --print_config exit here, before deepspeed is imported
    except DistillError as e:
        return _fail(e)
    from ds_distill import engines, trainer

    try:
        return trainer.main(cfg)
    except DistillError as e:
        return _fail(e)
    finally:
        engines.shutdown()


if __name__ == "__main__":
    sys.exit(main())
