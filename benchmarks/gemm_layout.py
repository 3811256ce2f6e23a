"""The chunked loss's four GEMMs, one by one, in both chunk layouts, at several chunk sizes (CPU).

    python benchmarks/gemm_layout.py [--chunks 1024 256 128] [--n 4096]

token_major: logits [c, V] = h @ W^T (what `losses.chunk_layout` calls token_major);
vocab_major: logits^T [V, c] = W @ h^T (CPU's default). For each: student logits, teacher logits, grad hidden
(g @ W_s) and the lm_head gradient update (W_s.grad += g^T h), seconds scaled to --n tokens. V = 151,936, student
hidden 1024, teacher hidden 2560, fp32, 2 threads. Used to choose the layout (docs/BENCHMARKS.md, "KD loss").
"""
import argparse
import time

import torch

V, HS, HT = 151936, 1024, 2560


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 256, 128])
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ws, wt = torch.randn(V, HS) * 0.02, torch.randn(V, HT) * 0.02
    gw = torch.zeros(V, HS)
    print(f"{'chunk':>6} {'layout':>12} {'student':>8} {'teacher':>8} {'grad_h':>8} {'grad_w':>8} {'sum':>8}   "
          f"(s per {args.n} tokens)")
    for c in args.chunks:
        h, ht, gh = torch.randn(c, HS), torch.randn(c, HT), torch.empty(c, HS)
        tm_s, tm_t = torch.empty(c, V), torch.empty(c, V)
        vm_s, vm_t = torch.empty(V, c), torch.empty(V, c)
        layouts = {
            "token_major": [lambda: torch.mm(h, ws.T, out=tm_s), lambda: torch.mm(ht, wt.T, out=tm_t),
                            lambda: torch.mm(tm_s, ws, out=gh), lambda: gw.addmm_(tm_s.T, h)],
            "vocab_major": [lambda: torch.mm(ws, h.T, out=vm_s), lambda: torch.mm(wt, ht.T, out=vm_t),
                            lambda: torch.mm(vm_s.T, ws, out=gh), lambda: gw.addmm_(vm_s, h)],
        }
        for name, fns in layouts.items():
            secs = []
            for fn in fns:
                fn()  # warm-up
                reps = max(1, 512 // c)
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                secs.append((time.perf_counter() - t0) / reps * args.n / c)
            print(f"{c:>6} {name:>12} " + " ".join(f"{x:8.2f}" for x in secs) + f" {sum(secs):8.2f}", flush=True)


if __name__ == "__main__":
    main()
