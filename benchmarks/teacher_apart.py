"""Bytes per token the teacher sends to the students, by what it sends (issue 16).

    python benchmarks/teacher_apart.py [--hidden 4096] [--vocab 151936] [--k 64] [--tokens 1024]

Part written for the served teacher (`served_bytes_per_token`): what one token costs on the wire when the teacher
is behind a server (top-k ids + log-probs), next to the final hidden states a teacher on its own ranks sends
(H x 2 bytes in bf16) and the full logits (V x 2 bytes): the binary sizes, and the bytes of the JSON answer of the
protocol actually spoken (vLLM's completions with prompt_logprobs: ds_distill/served_teacher.py), measured by
serialising an answer for --tokens tokens with realistic ids (up to V) and fp32 log-probs. The colocated vs
separate timing part (teacher.placement: separate) is not in this function.
Prints a table of bytes per token and ratios to the hidden states; --json writes them.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def served_bytes_per_token(hidden: int, vocab: int, k: int, tokens: int = 1024, seed: int = 0) -> dict:
    """Bytes per token: hidden states (bf16), full logits (bf16), top-k binary (int32 ids + fp16 / fp32 log-probs,
    the offline cache's layout), and the served protocol's JSON answer and request (measured)."""
    import torch

    from ds_distill.teacher_server import completion_response

    g = torch.Generator().manual_seed(seed)
    n_prompts = max(1, tokens // 256)
    per = tokens // n_prompts
    prompts = [torch.randint(0, vocab, (per,), generator=g).tolist() for _ in range(n_prompts)]
    rows = []
    for _ in prompts:  # [per-1, k]: distinct ids below V, log-probs of total mass < 1 (fp32 values, full length)
        ids = torch.randint(0, vocab - 64 * 37, (per - 1, 1), generator=g) + torch.arange(k) * 37
        lps = torch.log_softmax(torch.randn(per - 1, k, generator=g) * 3, -1) - 0.5
        rows.append((ids, lps))
    t0 = time.perf_counter()  # the server's cost: build and serialise the answer
    answer = json.dumps(completion_response("teacher", prompts, rows)).encode()
    serve_s = time.perf_counter() - t0
    request = json.dumps({"prompt": prompts, "max_tokens": 1, "prompt_logprobs": k}).encode()
    n_rows = sum(per - 1 for _ in prompts)
    from ds_distill.served_protocol import binary_answer, parse_prompt_logprobs, read_binary_answer

    t0 = time.perf_counter()  # the client's cost: decode the JSON and read every prompt's rows
    choices = json.loads(answer)["choices"]
    for p, c in zip(prompts, choices):
        parse_prompt_logprobs(c["prompt_logprobs"], len(p), k, "bench")
    parse_us = (time.perf_counter() - t0) / n_rows * 1e6
    t0 = time.perf_counter()  # the same rows as ds_distill's binary answer (serve_teacher's default for our client)
    binary = binary_answer(rows, k)
    read_binary_answer(binary, prompts, k)
    binary_us = (time.perf_counter() - t0) / n_rows * 1e6
    return {
        "hidden_bf16": hidden * 2, "logits_bf16": vocab * 2,
        "topk_fp16": k * (4 + 2), "topk_fp32": k * (4 + 4),
        "served_json_answer": len(answer) / n_rows, "served_json_request": len(request) / (n_prompts * per),
        "served_binary_answer": len(binary) / n_rows,
        "client_parse_us_per_token": parse_us, "server_json_us_per_token": serve_s / n_rows * 1e6,
        "binary_both_sides_us_per_token": binary_us,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096, help="teacher hidden size H (Qwen3-8B: 4096)")
    ap.add_argument("--vocab", type=int, default=151936, help="lm_head rows V (Qwen3: 151936)")
    ap.add_argument("--k", type=int, default=64, help="top-k of the served / cached teacher")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens in the measured JSON answer")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    b = served_bytes_per_token(args.hidden, args.vocab, args.k, args.tokens)
    print(f"bytes per token, H={args.hidden}, V={args.vocab}, k={args.k} (ratio: / hidden states bf16)")
    for name, v in b.items():
        if name.endswith("_us_per_token"):
            print(f"  {name:22s} {v:12.1f}   (microseconds of host time per token, not bytes)")
            continue
        print(f"  {name:22s} {v:12.1f}   x {v / b['hidden_bf16']:.3g}")
    print(f"  full logits / hidden states: {b['logits_bf16'] / b['hidden_bf16']:.1f}x; JSON answer / binary top-k "
          f"fp16: {b['served_json_answer'] / b['topk_fp16']:.1f}x; JSON / binary answer: "
          f"{b['served_json_answer'] / b['served_binary_answer']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bytes_per_token": b}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
