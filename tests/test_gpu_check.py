"""`bash benchmarks/gpu_check.sh --tiny` on CPU: the first-GPU script keeps working, and its numbers make sense.

Checked from its gpu_check.json: the environment section names the CPU accelerator and the optimizer auto picks
there; the fused loss at both vocabulary widths (1000 real, 1024 padded rows) is within 1e-5 of the fp64 reference
(loss) and 1e-4 (hidden-state gradient, relative to its largest element) and took positive time, as did its GEMMs,
and with its slab math compiled (loss.compile) it equals the eager loss (1e-6) and is as close to fp64;
the 3 training steps have finite losses, trained every slot of their packed micro-batches (data/fill 1.0: the tiny
text fills max_length) with the compiled loss (loss.compile), made at most 4 host synchronisations in the
project's code, checkpointed, and exported weights equal to the engine's (checksum); both teacher placements ran.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, free_port


@pytest.mark.multirank  # a DeepSpeed process group (one rank) in its own process
def test_gpu_check_tiny_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env.update({"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["mode"] == "tiny" and r["sections_skipped"] == []
    assert r["env"]["accelerator"] == "cpu" and r["env"]["optimizer_auto"] == "deepspeed"
    assert r["vocab"] == 1000
    for width, v in (("real", 1000), ("padded", 1024)):
        row = r["loss"][width]
        assert row["vocab"] == v
        assert row["rel_err_loss_vs_fp64"] < 1e-5 and row["rel_err_grad_vs_fp64"] < 1e-4, row
        assert row["seconds"] > 0 and row["gemm_seconds"] > 0 and row["ratio_to_gemms"] > 0
        # the same loss with its slab math compiled (loss.compile): equal to the eager one, as close to fp64
        assert "compiled_error" not in row, row.get("compiled_error")
        assert row["compiled_rel_diff_loss_vs_eager"] < 1e-6 and row["compiled_rel_diff_grad_vs_eager"] < 1e-6, row
        assert row["compiled_rel_err_loss_vs_fp64"] < 1e-5 and row["compiled_rel_err_grad_vs_fp64"] < 1e-4, row
        assert row["compiled_seconds"] > 0 and row["ratio_compiled_to_eager"] > 0
    t = r["train"]
    assert t["steps"] == 3 and len(t["losses"]) == 3
    assert t["loss_compiled"]  # its config asks for loss.compile: the trainer's compiled path ran the steps
    assert all(0 < x < 20 for x in t["losses"]), t["losses"]  # finite; ln(1000) = 6.9 at random init
    assert t["data_fill"] == [1.0, 1.0, 1.0]
    assert t["host_syncs_ours_per_step"] <= 4, t["host_syncs"]
    assert t["tokens_per_sec"] > 0 and t["student_params"] > 0 and t["teacher_params"] > t["student_params"]
    assert (Path(t["checkpoint"]) / "COMPLETE").is_file()
    assert t["export_tensors"] > 0 and t["export_checksum_rel_diff"] < 1e-7
    assert t["planner_peak_gib"] > 0 and t["peak_memory_gib"] > 0
    assert r["placement"]["replicate"] > 0 and r["placement"]["zero3"] > 0
