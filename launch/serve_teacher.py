"""Serve a HF teacher's top-k log-probs over HTTP for training with teacher.server_url (README: 'Served teacher').

    python launch/serve_teacher.py --config X.yaml --port P [--host 127.0.0.1] [--top_k K]
        [--max_batch_tokens N] [--dtype fp32|bf16|fp16] [--json_only] [--section.key value ...]

The config's teacher.path (and tokenizer_path), loss.temperature, loss.top_k (or --top_k) and data.max_length
define what is served; the trainer checks them against its own config before the first step. Speaks vLLM's
OpenAI-compatible /v1/completions with prompt_logprobs (ds_distill/teacher_server.py). No authentication: it
listens on 127.0.0.1 unless --host says otherwise. Exit codes: 2 a problem in the config / model directory / port.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False, usage="serve_teacher.py --config X.yaml --port P [options]")
    argv = sys.argv[1:] if argv is None else argv
    asks_help = "-h" in argv or "--help" in argv
    ap.add_argument("--port", type=int, required=not asks_help, help="TCP port to listen on (0: any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    ap.add_argument("--top_k", type=int, default=None, help="largest k served (default: loss.top_k)")
    ap.add_argument("--max_batch_tokens", type=int, default=16384, help="padded tokens per teacher forward")
    ap.add_argument("--json_only", action="store_true",
                    help="answer in vLLM's JSON only (no binary answers for ds_distill's client)")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="teacher weights (default: bf16 on a GPU, fp32 on CPU)")
    if asks_help:
        print(ap.format_help())
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = parse_config(rest)
        from ds_distill import teacher_server

        teacher_server.serve(cfg, host=args.host, port=args.port, top_k=args.top_k,
                             max_batch_tokens=args.max_batch_tokens, dtype=args.dtype, binary=not args.json_only)
    except DistillError as e:
        print(f"[serve_teacher] error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
