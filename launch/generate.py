"""Offline sequence-level KD: write the teacher's completions for the config's prompts as a training file.

    deepspeed --num_gpus N launch/generate.py --config X.yaml --out FILE.jsonl [--section.key value ...]

Uses teacher.path, data.train_files / data.format and on_policy.max_new_tokens / temperature / top_p /
prompt_length; then train on FILE.jsonl like any data. Sharded over ranks, deterministic per sample id, resumable
(run the same command again). Details: ds_distill/seqkd.py.
Exit codes: 0 done, 2 a problem in the config / data / model directories.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import rank_error, run_collective, run_main  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False, usage="generate.py --config X.yaml --out FILE.jsonl "
                                 "[--section.key value ...]")
    argv = sys.argv[1:] if argv is None else argv
    asks_help = "-h" in argv or "--help" in argv
    ap.add_argument("--out", required=not asks_help, help="jsonl file to write (resumed from FILE.parts/)")
    if asks_help:
        print(ap.format_help())
    args, rest = ap.parse_known_args(argv)
    from ds_distill import engines, seqkd  # deepspeed is imported only once the arguments parse

    def body() -> int:
        result = seqkd.generate_dataset(parse_config(rest), args.out)
        if os.environ.get("RANK", "0") == "0":
            print(f"[ds_distill] wrote {args.out}: {result['rows']} rows", flush=True)
        return 0

    return run_collective(body, rank_error, engines.shutdown)


if __name__ == "__main__":
    run_main(main)
