"""A small DeepSpeed job for proving a cluster and the sbatch script's signal/requeue path.

Every rank all-reduces (rank + 1) and prints where it ran:
    DSAR host=<hostname> node=<SLURM_NODEID> rank=<r>/<world> ... ok
With `--steps N --state FILE [--step_seconds S]` it then behaves like the trainer towards signals: it runs N steps
(one all-reduce each), resumes from the step saved in FILE, and on SIGTERM saves at the next step boundary
(all ranks agree through an all-reduce of the flag) and exits 0; it prints
    DSAR_RUN start=<step> ... / DSAR_SIGTERM saved step=<k> / DSAR_DONE steps=<N>
Other arguments (--config X, overrides) are ignored. Works under the deepspeed launcher and under plain srun
(RANK etc. mapped from SLURM_* here, as launch/train.py does).
"""
import argparse
import os
import signal
import socket
import sys
import time

if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=0)
ap.add_argument("--state", default=None)
ap.add_argument("--step_seconds", type=float, default=0.5)
args, _unknown = ap.parse_known_args()

stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
import torch  # noqa: E402

from ds_distill.engines import skip_cpu_shm_op  # noqa: E402

skip_cpu_shm_op()  # as the trainer does: no JIT build of DeepSpeed's CPU shm op (see engines.skip_cpu_shm_op)
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
ok = t.item() == world * (world + 1) / 2
print(f"DSAR host={socket.gethostname()} node={os.environ.get('SLURM_NODEID')} rank={rank}/{world} "
      f"local_rank={os.environ.get('LOCAL_RANK')} "
      f"master={os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
      f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')} argv={sys.argv[1:]} allreduce={t.item()} "
      f"{'ok' if ok else 'WRONG'}", flush=True)

if args.steps:
    step = int(open(args.state).read()) if args.state and os.path.exists(args.state) else 0
    if rank == 0:
        print(f"DSAR_RUN start={step} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
    while step < args.steps:
        time.sleep(args.step_seconds)
        flag = torch.tensor([1.0 if stop else 0.0])
        dist.all_reduce(flag)  # every rank takes the same decision at the same step boundary
        step += 1
        if flag.item() > 0:
            if rank == 0:
                with open(args.state, "w") as f:
                    f.write(str(step))
                print(f"DSAR_SIGTERM saved step={step}", flush=True)
            break
    else:
        if rank == 0:
            with open(args.state, "w") as f:
                f.write(str(step))
            print(f"DSAR_DONE steps={step}", flush=True)

dist.barrier()
torch.distributed.destroy_process_group()
sys.exit(0 if ok else 1)
