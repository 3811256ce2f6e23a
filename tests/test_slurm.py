"""A real 2-node SLURM cluster on this machine runs the tiny distillation through launch/slurm/train.sbatch.

tests/slurm/cluster.sh brings up slurmctld + two slurmd "nodes" (dsdn1, dsdn2), each in its own network namespace
joined to a bridge by a veth pair, so rank-to-rank traffic crosses real links. One job, 2 nodes x 1 rank, is submitted
with the project's sbatch script; while it trains it gets the time-limit warning signal (SIGUSR1 to the batch
script, what `--signal=B:USR1@180` delivers), the ranks checkpoint on SIGTERM, the script requeues the job and the
second run resumes from the checkpoint. Checked, with the same job:
  - ranks 0 and 1 ran on dsdn1 and dsdn2 (in both runs), and the veth links carried the collectives' traffic;
  - the signal path: SIGTERM, checkpoint, `scontrol requeue`, a second run that resumed (Restarts=1);
  - every step's loss/total, loss/ce, loss/kl in output_dir/metrics.jsonl equals that of the same run started with
    `deepspeed --num_gpus 2` on one node, without interruption (within 1e-6).
Needs root (network namespaces, slurmd) and Debian's slurm-wlm + munge (.ci/slurm_setup.sh installs them); skips
with the reason otherwise. Three trainer launches (two runs of the job, the reference alongside): 216 s measured on
a 2-core machine shared with other test runs (load ~10), of which ~30 s build the session's tiny assets.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, deepspeed_bin, free_port, read_jsonl, tiny_config, write_yaml

pytestmark = pytest.mark.slurm

CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH_SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
SLURM_DIR = Path("/tmp/ds_distill_slurm")  # cluster.sh's default DSD_DIR; netns/bridge names are machine-wide
NODES = ("dsdn1", "dsdn2")
VETHS = ("dsdh1", "dsdh2")  # host ends of the nodes' links
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "scancel", "ip", "unshare", "nsenter")
MAX_STEPS = 10
JOB_TIMEOUT_S = 300
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the cluster's nodes are network namespaces and slurmd runs as root"
    if any(shutil.which(b) is None for b in BINARIES):
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm_setup.sh")], capture_output=True, text=True, timeout=600)
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"SLURM unavailable: {', '.join(missing)} not installed and .ci/slurm_setup.sh could not install "
                "slurm-wlm/munge/iproute2 with apt")
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create network namespaces here (unshare --net: {probe.stderr.strip()})"
    return None


def _run(cmd, env=None, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} -> exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def slurm_env():
    """A 2-node cluster for this module; torn down in the finalizer. Serialised machine-wide by a lock file."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lock = open(str(SLURM_DIR) + ".lock", "w")
    deadline = time.time() + 900
    while True:  # another session's SLURM test holds the names: wait for it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > deadline:
                pytest.fail(f"{SLURM_DIR}.lock held for 15 minutes by another SLURM test")
            time.sleep(2)
    env = dict(os.environ)
    env.update({"DSD_DIR": str(SLURM_DIR), "SLURM_CONF": str(SLURM_DIR / "slurm.conf"),
                "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"})
    try:
        _run(["bash", str(CLUSTER), "down"], env=env, check=False)  # leftovers of an interrupted earlier run
        _run(["bash", str(CLUSTER), "up", str(len(NODES))], env=env)
        yield env
    finally:
        down = _run(["bash", str(CLUSTER), "down"], env=env, check=False)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        assert down.returncode == 0, f"cluster.sh down failed: {down.stdout}\n{down.stderr}"


def _job(env, job_id) -> dict:
    out = _run(["scontrol", "show", "job", "-o", str(job_id)], env=env).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _nodes_idle(env) -> bool:
    out = _run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, check=False).stdout.split()
    return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in NODES}


def _veth_bytes() -> dict:
    return {v: sum(int(Path(f"/sys/class/net/{v}/statistics/{d}_bytes").read_text()) for d in ("rx", "tx"))
            for v in VETHS}


def _loss_rows(path) -> dict[int, list[dict]]:
    rows: dict[int, list[dict]] = {}
    for r in read_jsonl(path):
        if "loss/total" in r:
            rows.setdefault(int(r["step"]), []).append(r)
    return rows


_REFERENCE: dict = {}  # the uninterrupted 1-node colocated run of the test above (same config and steps)


def test_two_node_job_requeues_resumes_and_matches_one_node(slurm_env, tiny_assets, tmp_path):
    t_start = time.time()
    sections = dict(train={"max_steps": MAX_STEPS}, checkpoint={"every_steps": 0, "keep_last": 2, "resume": "auto"})
    slurm_cfg = write_yaml(tiny_config(tiny_assets, tmp_path / "out_slurm", **sections), tmp_path / "slurm.yaml")
    ref_cfg = write_yaml(tiny_config(tiny_assets, tmp_path / "out_ref", **sections), tmp_path / "ref.yaml")
    env = dict(slurm_env)
    env.update({"CONFIG": slurm_cfg, "TRAIN_SCRIPT": str(ROOT / "launch" / "train.py"), "NPROC_PER_NODE": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    veth0 = _veth_bytes()

    # Submitted from tmp_path so the header's --output=%x-%j.out lands there; the batch script runs on dsdn1.
    sub = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--time", "10", str(SBATCH_SCRIPT)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log_path = tmp_path / f"ds_distill-{job_id}.out"
    metrics = tmp_path / "out_slurm" / "metrics.jsonl"
    # Meanwhile the reference: the same config on one node with the deepspeed launcher, uninterrupted.
    ref_env = {k: v for k, v in env.items() if k not in ("CONFIG", "TRAIN_SCRIPT", "NPROC_PER_NODE")}
    with open(tmp_path / "ref.log", "w") as ref_log:
        ref = subprocess.Popen([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()),
                                str(ROOT / "launch" / "train.py"), "--config", ref_cfg], cwd=ROOT, env=ref_env,
                               stdout=ref_log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_text() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else "(no log yet)"

    def fail(msg):
        _run(["scancel", job_id], env=env, check=False)
        pytest.fail(f"{msg}\n--- job log {log_path} ---\n{log_text()[-8000:]}\n--- scontrol ---\n{_job(env, job_id)}")

    def wait_for(cond, what, timeout=JOB_TIMEOUT_S):
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = _job(env, job_id)
            if cond(info):
                return info
            if info.get("JobState") in DONE_STATES:
                fail(f"job {job_id} ended ({info.get('JobState')}, exit {info.get('ExitCode')}) "
                     f"while waiting for {what}")
            time.sleep(0.25)
        fail(f"timed out after {timeout} s waiting for {what}")

    try:
        # 1. The first run trains; once it logged a step, send what --signal=B:USR1@T sends before the time limit.
        wait_for(lambda i: metrics.exists() and _loss_rows(metrics), "the first logged step")
        _run(["scancel", "--batch", "--signal=USR1", job_id], env=env)
        # 2. The ranks checkpoint and exit, the script requeues. SLURM holds a requeued job ~2 min (BeginTime): a
        #    real cluster waits that out; the test releases it at once.
        info = wait_for(lambda i: i.get("Restarts") == "1" and i.get("JobState") in ("PENDING", "RUNNING"),
                        "the job to be requeued after SIGUSR1 (did it finish every step before the signal?)")
        first_run_steps = sorted(_loss_rows(metrics))
        if info.get("JobState") == "PENDING":
            # Release it only once the nodes finished cleaning up the first run, and in a later second than its
            # kill: slurmd refuses a batch launch whose credential is not newer than the job's revocation.
            deadline = time.time() + 60
            while time.time() < deadline and not _nodes_idle(env):
                time.sleep(0.25)
            time.sleep(2)
            _run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env=env, check=False)
        # 3. The second run resumes from the checkpoint and finishes.
        info = wait_for(lambda i: i.get("JobState") == "COMPLETED", "the requeued run to complete")
        assert info.get("ExitCode") == "0:0", info
        try:
            ref_rc = ref.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            ref_rc = "timeout"
        assert ref_rc == 0, f"1-node reference run: exit {ref_rc}\n{(tmp_path / 'ref.log').read_text()[-6000:]}"
    finally:
        if ref.poll() is None:  # the launcher and its ranks: the process group this test started
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()
    log = log_text()
    veth1 = _veth_bytes()

    # Both runs of the job: rank 0 on dsdn1, rank 1 on dsdn2, both ranks inside DeepSpeed.
    placements = re.findall(r"\[train\.sbatch\] rank (\d+)/(\d+) on (\S+) \(node (\d+)", log)
    assert sorted(set(placements)) == [("0", "2", NODES[0], "0"), ("1", "2", NODES[1], "1")], placements
    assert len(placements) == 4, f"expected 2 ranks x 2 runs, got {placements}"
    for r in ("0", "1"):
        assert len(re.findall(rf"\[ds_distill\] rank {r}/2: student ZeRO-3 holds", log)) == 2, log[-4000:]
    # The collectives crossed both nodes' links (~2 MB per step per link here; SLURM's own chatter is KBs).
    for v in VETHS:
        assert veth1[v] - veth0[v] > 1_000_000, (v, veth0, veth1)

    # The signal path, as the log tells it.
    assert "time limit near (SIGUSR1)" in log and f"requeueing job {job_id}" in log, log[-4000:]
    assert re.search(r"run 2 of it", log), log[-4000:]
    assert 1 <= len(first_run_steps) < MAX_STEPS, first_run_steps

    # Per-step losses: the 2-node SLURM job (interrupted and resumed) == the uninterrupted 1-node run.
    got, want = _loss_rows(metrics), _loss_rows(tmp_path / "out_ref" / "metrics.jsonl")
    assert sorted(want) == list(range(1, MAX_STEPS + 1)), sorted(want)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)), f"steps logged by the SLURM job: {sorted(got)}"
    for step in sorted(want):
        w = want[step][-1]
        for g in got[step]:  # a step logged by both runs must agree as well
            for key in ("loss/total", "loss/ce", "loss/kl"):
                where = "before the signal" if step in first_run_steps else "after the resume"
                assert math.isclose(g[key], w[key], rel_tol=0, abs_tol=1e-6), (
                    f"step {step} ({where}) {key}: SLURM 2-node {g[key]!r} != 1-node deepspeed {w[key]!r}")
    assert (tmp_path / "out_slurm" / "final").is_dir()
    _REFERENCE["metrics"] = tmp_path / "out_ref" / "metrics.jsonl"  # reused by the separate-placement test below
    print(f"test_slurm: first run logged steps {first_run_steps}; job {job_id} done; "
          f"veth bytes {[veth1[v] - veth0[v] for v in VETHS]}; {time.time() - t_start:.0f} s")


def test_teacher_on_its_own_node(slurm_env, tiny_assets, tmp_path):
    """TEACHER_NODES=1 on 2 nodes x 2 ranks (teacher.placement: separate, issue 16): the students (ranks 0-1) train on
    dsdn1, the ZeRO-3 teacher (ranks 2-3) runs on dsdn2, the hidden states cross the veth links, and every step's
    losses equal the uninterrupted colocated 2-rank run of the test above (run here when that test did not run)."""
    sections = dict(train={"max_steps": MAX_STEPS}, checkpoint={"every_steps": 0, "keep_last": 2, "resume": "auto"})
    cfg = write_yaml(tiny_config(tiny_assets, tmp_path / "out", **sections), tmp_path / "sep.yaml")
    env = dict(slurm_env)
    env.update({"CONFIG": cfg, "TRAIN_SCRIPT": str(ROOT / "launch" / "train.py"), "NPROC_PER_NODE": "2",
                "TEACHER_NODES": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"})
    ref = None
    if "metrics" not in _REFERENCE:
        ref_cfg = write_yaml(tiny_config(tiny_assets, tmp_path / "out_ref", **sections), tmp_path / "ref.yaml")
        ref_env = {k: v for k, v in env.items() if k not in ("CONFIG", "TRAIN_SCRIPT", "NPROC_PER_NODE",
                                                             "TEACHER_NODES")}
        ref = subprocess.Popen([deepspeed_bin(), "--num_gpus", "2", "--master_port", str(free_port()),
                                str(ROOT / "launch" / "train.py"), "--config", ref_cfg], cwd=ROOT, env=ref_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _REFERENCE["metrics"] = tmp_path / "out_ref" / "metrics.jsonl"
    veth0 = _veth_bytes()
    # the nodes' 2 CPUs are one core (CR_Core allocates cores): --overcommit lets 2 ranks share it
    sub = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--overcommit", "--time", "10", str(SBATCH_SCRIPT)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log_path = tmp_path / f"ds_distill-{job_id}.out"
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        while time.time() < deadline and _job(env, job_id).get("JobState") not in DONE_STATES:
            time.sleep(0.5)
        info = _job(env, job_id)
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (info, log[-6000:])
        if ref is not None:
            assert ref.wait(timeout=JOB_TIMEOUT_S) == 0
    finally:
        if _job(env, job_id).get("JobState") not in DONE_STATES:
            _run(["scancel", job_id], env=env, check=False)
        if ref is not None and ref.poll() is None:
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()
    veth1 = _veth_bytes()
    placements = set(re.findall(r"\[train\.sbatch\] rank (\d+)/(\d+) on (\S+) \(node", log))
    assert placements == {("0", "4", NODES[0]), ("1", "4", NODES[0]), ("2", "4", NODES[1]), ("3", "4", NODES[1])}, \
        placements
    assert "teacher on the last 1 node(s): ranks 2-3" in log, log[-4000:]
    assert "teacher rank 2 (teacher 0/2, serving student ranks [0]): done" in log, log[-4000:]
    assert "teacher rank 3 (teacher 1/2, serving student ranks [1]): done" in log, log[-4000:]
    assert "rank 0/2: student ZeRO-3 holds" in log and "rank 1/2: student ZeRO-3 holds" in log
    # hidden states dsdn2 -> dsdn1: MAX_STEPS x 2 micro-batches x 2 students x [2, <=64, H] fp32, at least
    hidden = json.load(open(Path(tiny_assets["teacher"]) / "config.json"))["hidden_size"]
    for v in VETHS:
        assert veth1[v] - veth0[v] > MAX_STEPS * 2 * 2 * 2 * 8 * hidden * 4, (v, veth0, veth1)
    got, want = _loss_rows(tmp_path / "out" / "metrics.jsonl"), _loss_rows(_REFERENCE["metrics"])
    assert sorted(got) == sorted(want) == list(range(1, MAX_STEPS + 1)), (sorted(got), sorted(want))
    for step in want:
        for key in ("loss/total", "loss/ce", "loss/kl", "grad_norm"):
            assert math.isclose(got[step][-1][key], want[step][-1][key], rel_tol=1e-6), (step, key)
