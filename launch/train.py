"""Distil a teacher LLM into a student on DeepSpeed.

    deepspeed --num_gpus N launch/train.py --config ds_configs/X.yaml [--section.key value ...]
    torchrun --nproc_per_node N launch/train.py --config ...        (also works)
    srun python launch/train.py --config ...                         (SLURM_* mapped to RANK/WORLD_SIZE)

`--help` lists every key with its documentation; `--print_config` prints the resolved config and exits.
Exit codes: 0 done, 2 a problem in the config / data / model directories (message names the key), 1 otherwise.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def _fail(e: Exception) -> int:
    print(f"[ds_distill] error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
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
