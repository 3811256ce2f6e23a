"""Shared fixtures: tiny assets built once per session, and a runner for real multi-rank DeepSpeed jobs."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The venv's ninja first: DeepSpeed's JIT ops (~/.cache/torch_extensions) are rebuilt whenever a different ninja
# sees them, and every launch waits on that rebuild's lock (minutes).
os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
# The ops are built once by launch/install.sh into the venv. A zero-byte `lock` left there by a process killed while
# it held the build lock (a test timeout) would make every later launch wait forever: no build runs while a test
# session starts, so any lock found now is stale.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
for _lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/lock"):
    _lock.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_bin() -> str:
    cand = Path(sys.executable).parent / "deepspeed"
    return str(cand) if cand.exists() else (shutil.which("deepspeed") or "deepspeed")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """Tokenizer, tiny teacher (untied, vocab rows padded to 1024) and student (tied, 1024 rows), data files."""
    from ds_distill.tiny import build_all

    out = tmp_path_factory.mktemp("tiny")
    paths = build_all(out)
    paths["root"] = str(out)
    return paths


def tiny_config(assets: dict, output_dir, fmt: str = "guanaco", **sections) -> dict:
    """A config dict for the tiny assets; `sections` are merged into the top level (e.g. loss={'alpha': 0})."""
    d = assets["data"]
    cfg = {
        "teacher": {"path": assets["teacher"], "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json")},
        "student": {"path": assets["student"]},
        "tokenizer_path": assets["tokenizer"],
        "data": {"train_files": [f"{d}/{fmt}_train.jsonl"], "eval_files": [f"{d}/{fmt}_eval.jsonl"],
                 "format": fmt, "max_length": 64},
        "loss": {"alpha": 0.5, "temperature": 2.0, "impl": "chunked", "chunk_size": 64},
        "train": {"micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2, "max_steps": 6,
                  "zero_stage": 3},
        "checkpoint": {"every_steps": 0, "keep_last": 2, "resume": "auto"},
        # every run evaluates at step 0 and at the end: a few batches and no generations keep that cheap in tests
        "eval": {"max_batches": 4, "generations": 0},
        "output_dir": str(output_dir),
        "wandb": {"mode": "disabled"},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def write_yaml(cfg: dict, path) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def run_deepspeed(script: str, args: list[str], nprocs: int = 2, timeout: int = 600, env: dict | None = None,
                  cwd=ROOT) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args` on CPU ranks, on a free port; returns the completed process."""
    e = dict(os.environ)
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"})
    e.update(env or {})
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    cmd = [deepspeed_bin(), "--num_gpus", str(nprocs), "--master_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def run_single_rank(script, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python script args` as one rank without a launcher (no RANK / WORLD_SIZE / LOCAL_RANK, a free port);
    returns the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "WANDB_SILENT": "true",
           "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


def launch_direct(config: str, world: int, env: dict, timeout: float) -> list[tuple[int, str, float]]:
    """Start `world` ranks of launch/train.py with RANK/WORLD_SIZE set by hand (no launcher: nobody stops the others
    when one dies, so each rank must notice by itself); returns [(exit code, stderr, exit time)] per rank."""
    port = str(free_port())
    procs, logs = [], []
    for r in range(world):
        e = dict(os.environ)
        e.update({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env})
        logs.append(open(os.path.join(os.path.dirname(config), f"rank{r}.err"), "w+"))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "launch" / "train.py"), "--config", config],
                                      cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=logs[-1], text=True))
    deadline = time.time() + timeout
    ended: dict[int, float] = {}
    while len(ended) < world and time.time() < deadline:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    out = []
    for r, (p, f) in enumerate(zip(procs, logs)):
        f.seek(0)
        out.append((p.returncode, f.read(), ended.get(r, float("inf"))))
        f.close()
    return out
