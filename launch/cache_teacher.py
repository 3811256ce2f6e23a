"""Write the offline teacher cache: the teacher's top-k per position for every training sample.

    deepspeed --num_gpus N launch/cache_teacher.py --config X.yaml --cache_dir D \\
        [--top_k K] [--dtype fp16|bf16|fp32] [--micro_batch_size B] [--shard_positions P] [--section.key value ...]

Then train with `teacher.cache: D` (and no teacher.path) and `loss.impl: topk` in the same YAML: the trainer loads no
teacher and reads each micro-batch's rows by sample id. The teacher runs as a ZeRO-3 inference engine
(teacher.ds_config); --top_k defaults to the config's loss.top_k, --micro_batch_size to train.micro_batch_size.
Storage: top_k x (4 + 2) bytes per token with fp16/bf16 (fp32: x 8). An interrupted run resumes when started again
with the same arguments (complete shards are kept, the rest is recomputed); a cache_dir holding another run's cache
is refused. Layout and checks: ds_distill/teacher_cache.py; the recipe: ds_distill/cache_writer.py.
Exit codes: 0 done (or already complete), 2 a problem in the config / data / model directories / cache_dir.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import rank_error, run_collective, run_main  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False, usage="cache_teacher.py --config X.yaml --cache_dir D [options] "
                                 "[--section.key value ...]")
    argv = sys.argv[1:] if argv is None else argv
    asks_help = "-h" in argv or "--help" in argv
    ap.add_argument("--cache_dir", required=not asks_help, help="directory of the cache (created; resumed if present)")
    ap.add_argument("--top_k", type=int, default=None, help="tokens kept per position (default: loss.top_k)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="log-prob storage type")
    ap.add_argument("--micro_batch_size", type=int, default=None, help="samples per teacher forward per rank")
    ap.add_argument("--shard_positions", type=int, default=262144, help="rows per shard file (resume granularity)")
    if asks_help:  # this script's own flags, then every config key (printed by parse_config)
        print(ap.format_help())
    args, rest = ap.parse_known_args(argv)
    from ds_distill import cache_writer, engines  # deepspeed is imported only once the arguments parse

    def body() -> int:
        cfg = parse_config(rest)
        cache_writer.write_cache(cfg, args.cache_dir, top_k=args.top_k or cfg.loss.top_k, dtype=args.dtype,
                                 micro_batch_size=args.micro_batch_size, shard_positions=args.shard_positions)
        return 0

    return run_collective(body, rank_error, engines.shutdown)


if __name__ == "__main__":
    run_main(main)
