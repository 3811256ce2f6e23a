"""Two plain gloo ranks (no DeepSpeed engine): ServedTeacher.host_side's per-step collective decision.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/scripts/served_collective.py LIVE_PORT DEAD_URL OUT

Rank 0 serves well-formed completions answers on LIVE_PORT (every position: ids 0..k-1, log-probs log(1/(2k))).
Step 1: both ranks ask the live server -> both get payloads. Step 2: rank 1 asks DEAD_URL (nothing listens) ->
both ranks must raise TeacherUnavailable at the same step (rank 0 although its own request succeeded).
Writes {"step1": ..., "step2": ...} per rank to OUT.rank<r>.json.
"""
import json
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from ds_distill.served_teacher import ServedTeacher, TeacherClient, TeacherUnavailable  # noqa: E402

K = 4


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        lp = math.log(1 / (2 * K))
        choices = [{"index": i, "prompt_logprobs": [None] + [{str(t): {"logprob": lp, "rank": t + 1}
                                                               for t in range(K)}] * (len(p) - 1)}
                   for i, p in enumerate(body["prompt"])]
        out = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def main():
    live_port, dead_url, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    if rank == 0:
        srv = ThreadingHTTPServer(("127.0.0.1", live_port), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    dist.init_process_group("gloo")  # after rank 0 listens: rank 1 passes this only once it does
    live = f"http://127.0.0.1:{live_port}"
    mb = {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0],
          [1, 1, 0, 0]]), "sample_ids": torch.tensor([3 + rank, -1])}
    res = {}
    for step, url in (("step1", live), ("step2", dead_url if rank == 1 else live)):
        src = ServedTeacher(TeacherClient(url, timeout_s=5, retries=1, backoff_s=0.05, rank=rank), model=None, top_k=K)
        try:
            (ids, lps), = src.host_side([mb], 100)
            res[step] = {"ids": ids[0].tolist(), "lps": lps[0].tolist(), "filler": lps[1].tolist()}
        except TeacherUnavailable as e:
            res[step] = {"error": str(e)}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
