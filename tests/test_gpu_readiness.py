"""What would stop or slow the first GPU run, checked on CPU (issue 18).

- Optimizer: the DeepSpeed config built for a CUDA device asks for torch's fused AdamW, and DeepSpeed's own
  optimizer selection (its `get_optimizer_configuration`) turns it into torch.optim.AdamW, with and without optimizer
  offload, so nothing is JIT-compiled. A real single-rank run built with that choice (train.optimizer: torch) loads
  no DeepSpeed op at all (every op builder's `load` is made to fail), logs the optimizer, and its losses over three
  steps equal those of the same run with DeepSpeed's AdamW (1e-6 relative: two implementations of one update).
- Device: a job that was given GPUs that torch cannot use, or `train.device: cuda` without CUDA, is refused with exit
  code 2 naming the cause (tests/test_bad_input.py runs those cases: CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS,
  train.device: cuda); here the evidence rules and the device index under SLURM's one-GPU-per-task binding.
- data.packing (with teacher.sharding replicate, in one process) through the trainer: per-step losses equal to the
  unpacked ZeRO-3-teacher run's (1e-5), data/fill higher; the held-out evaluation before training (student and the
  replicated teacher: perplexities, KL, agreement) equals the partitioned teacher's (1e-6).
- Host synchronisations: during one optimizer step of 4 micro-batches (guard, teacher, fused loss, backward, step,
  the logged metrics), calls that make the host wait for the device (item, tolist, nonzero, bool, int, float, numpy,
  cpu) made by the project's own code are counted with a TorchFunctionMode (benchmarks/gpu_check.py's counter):
  at most 4 (2 by design, + reading DeepSpeed's grad norm for the log). On
  CPU every tensor lives on the "device", so what `trainer.host_prepare` reads (the batch on the host, before the
  copy) is excluded by name; DeepSpeed's own syncs are reported, not limited.
Runtime: about 40 s (one python process, two tiny runs).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Driver (runs as a script: a process group of its own, outside pytest)
# ----------------------------------------------------------------------------------------------------------------

def _drive(config_path: str, result_path: str) -> None:
    import dataclasses

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from deepspeed.ops.op_builder.builder import OpBuilder
    from gpu_check import count_host_syncs  # the counter benchmarks/gpu_check.py reports on a GPU

    from ds_distill import engines, guards, trainer
    from ds_distill.config import parse_config

    loaded = []
    real_load = OpBuilder.load

    def refuse(self, *a, **k):
        loaded.append(self.name)
        raise RuntimeError(f"op {self.name} was loaded while train.optimizer: torch")

    result = {}
    for name, argv in (("torch", ["--train.optimizer", "torch"]), ("deepspeed", ["--train.optimizer", "deepspeed"]),
                       ("packed", ["--train.optimizer", "torch", "--data.packing", "true",
                                   "--teacher.sharding", "replicate"])):
        cfg = parse_config(["--config", config_path, *argv])
        cfg = dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, name))
        OpBuilder.load = refuse if name != "deepspeed" else real_load
        loaded.clear()
        run = trainer.build(cfg)
        eng = run.student_engine
        rec = {"optimizer": engines.describe_optimizer(eng), "ops_loaded": list(loaded), "losses": [], "fill": [],
               "eval0": trainer.run_eval(run)}  # before any update: the held-out metrics of both models
        guard = guards.StepGuard(rank=run.rank, world_size=run.world_size, nonfinite="abort", max_skipped_steps=0,
                                 deepspeed_discards_nonfinite=True, device=engines.device(),
                                 all_reduce_sum=engines.all_reduce_sum)
        for step in range(1, 4):
            mbs = [next(run.stream) for _ in range(cfg.train.grad_accum_steps)]

            def one_step():
                guard.begin(step)
                sums = trainer.train_step(run, mbs, guard=guard)
                guard.after_step(eng.was_step_applied())
                return trainer.step_metrics(sums, lr=eng.get_lr()[0], grad_norm=eng.get_global_grad_norm(),
                                            seconds=1.0)

            if step == 2 and name == "torch":
                row, ours, others = count_host_syncs(one_step)
                rec.update(syncs_ours=ours, syncs_others=others, micro_batches=len(mbs))
            else:
                row = one_step()
            rec["losses"].append(row["loss/total"])
            rec["fill"].append(row["data/fill"])
        result[name] = rec
        run = eng = None  # frees the engines (the closures above are done with them)
        OpBuilder.load = real_load
    engines.shutdown()
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------

from conftest import free_port, tiny_config, write_yaml  # noqa: E402


def test_cuda_config_asks_for_torch_fused_adamw_and_deepspeed_builds_it():
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ds_distill import engines

    assert engines.resolve_optimizer("auto", "cuda") == "torch"
    assert engines.resolve_optimizer("auto", "cpu") == "deepspeed"  # its op is prebuilt by launch/install.sh
    assert engines.resolve_optimizer("deepspeed", "cuda") == "deepspeed"
    for offload in (False, True):
        cfg = engines.student_ds_config(micro_batch_size=1, grad_accum_steps=4, world_size=8, zero_stage=3,
                                        precision="bf16", lr=1e-4, betas=[0.9, 0.95], weight_decay=0.0, grad_clip=1.0,
                                        offload_optimizer=offload, optimizer=engines.resolve_optimizer("auto", "cuda"))
        params = dict(cfg["optimizer"]["params"])
        assert cfg["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True

        class Stub:  # the two engine facts DeepSpeed's selection reads
            def zero_use_cpu_optimizer(self):
                return offload

            zenflow = False

        cls, kwargs = DeepSpeedEngine.get_optimizer_configuration(Stub(), params, True)
        assert cls is torch.optim.AdamW, (offload, cls)
        opt = cls([torch.nn.Parameter(torch.zeros(3))], **params, **kwargs)  # what DeepSpeed then calls
        assert opt.defaults["fused"] is True and opt.defaults["lr"] == 1e-4
    # and the DeepSpeed choice really is the JIT-built op (so the test above distinguishes something)
    ds = engines.optimizer_block("deepspeed", lr=1e-4, betas=[0.9, 0.95], weight_decay=0.0)["params"]
    cls, _ = DeepSpeedEngine.get_optimizer_configuration(type("S", (), {"zero_use_cpu_optimizer": lambda s: False,
                                                                        "zenflow": False})(), dict(ds), True)
    assert cls.__name__ == "FusedAdam"


def test_gpu_evidence_rules(tmp_path):
    from ds_distill import engines

    dev = tmp_path / "dev"
    dev.mkdir()
    assert engines.gpu_evidence({}, str(dev)) == []
    assert engines.gpu_evidence({"CUDA_VISIBLE_DEVICES": "0,1"}, str(dev)) == ["CUDA_VISIBLE_DEVICES=0,1"]
    assert engines.gpu_evidence({"CUDA_VISIBLE_DEVICES": "-1"}, str(dev)) == []
    assert engines.gpu_evidence({"CUDA_VISIBLE_DEVICES": ""}, str(dev)) == []
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES to the rank list even on CPU machines
    assert engines.gpu_evidence({"CUDA_VISIBLE_DEVICES": "0,1", "CROSS_RANK": "0", "LOCAL_SIZE": "2"}, str(dev)) == []
    assert engines.gpu_evidence({"SLURM_JOB_GPUS": "0,1,2,3"}, str(dev)) == ["SLURM_JOB_GPUS=0,1,2,3"]
    assert engines.gpu_evidence({"SLURM_GPUS_ON_NODE": "0"}, str(dev)) == []
    (dev / "nvidiactl").write_text("")
    assert engines.gpu_evidence({}, str(dev)) == []  # the control file alone is no GPU
    for i in range(3):
        (dev / f"nvidia{i}").write_text("")
    ev = engines.gpu_evidence({"CUDA_VISIBLE_DEVICES": "0", "CROSS_RANK": "0", "LOCAL_SIZE": "1"}, str(dev))
    assert len(ev) == 1 and ev[0].startswith("3 NVIDIA device file(s)")


def test_check_device_on_this_cpu_machine(monkeypatch):
    from ds_distill import engines
    from ds_distill.errors import DistillError

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert engines.check_device("auto", env={}) == "cpu"
    assert engines.check_device("cpu", env={"SLURM_JOB_GPUS": "0"}) == "cpu"  # on purpose: allowed
    with pytest.raises(DistillError, match=r"SLURM_STEP_GPUS=3.*CPU-only build.*train.device: cpu"):
        engines.check_device("auto", env={"SLURM_STEP_GPUS": "3"})
    with pytest.raises(DistillError, match=r"train.device: cuda.*CPU-only build"):
        engines.check_device("cuda", env={})


def test_local_device_index_under_slurm_binding():
    from ds_distill import engines
    from ds_distill.errors import DistillError

    assert engines.local_device_index(5, 8) == 5  # one process sees the node's 8 GPUs
    assert engines.local_device_index(5, 1) == 0  # srun --gpus-per-task=1: each task sees one GPU, index 0
    assert engines.local_device_index(0, 1) == 0
    with pytest.raises(DistillError, match="local rank 3 but this process sees 2"):
        engines.local_device_index(3, 2)


def test_torch_optimizer_builds_no_op_same_losses_and_few_host_syncs(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path / "out", fmt="guanaco",
                      train={"micro_batch_size": 2, "grad_accum_steps": 4, "max_steps": 3, "zero_stage": 3,
                             "warmup_steps": 0, "lr": 3e-3})
    cfg["eval"] = {"max_batches": 2, "generations": 0}
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env.update({"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([sys.executable, __file__, write_yaml(cfg, tmp_path / "c.yaml"), str(result)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(result.read_text())
    t, d = r["torch"], r["deepspeed"]
    # the choice is logged and real: torch's fused AdamW, and no DeepSpeed op was even asked for
    assert t["optimizer"] == "torch.optim.adamw.AdamW (fused)", t["optimizer"]
    assert t["ops_loaded"] == []
    assert "[ds_distill] optimizer: torch.optim.adamw.AdamW (fused) (train.optimizer: torch)" in proc.stdout
    assert "FusedAdam" in d["optimizer"]
    assert "accelerator cpu, backend gloo, precision fp32" in proc.stdout
    # the same AdamW: losses of steps 1-3 (2 and 3 after updates) agree
    assert t["losses"][0] == d["losses"][0]
    for a, b in zip(t["losses"], d["losses"]):
        assert abs(a - b) <= 1e-6 * abs(b), (t["losses"], d["losses"])
    assert t["losses"][2] < t["losses"][0]  # the updates did something
    # data.packing: the same samples in fewer rows, the same per-step losses (so the same gradients' effect)
    pk = r["packed"]
    assert pk["ops_loaded"] == []
    for a, b in zip(pk["losses"], t["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (pk["losses"], t["losses"])
    assert min(pk["fill"]) > max(t["fill"]) and all(0 < f <= 1 for f in pk["fill"] + t["fill"]), (pk["fill"], t["fill"])
    assert set(pk["eval0"]) == set(t["eval0"]) and "teacher_ppl" in t["eval0"], t["eval0"]
    for k, v in t["eval0"].items():
        assert abs(pk["eval0"][k] - v) <= 1e-6 * max(abs(v), 1.0), (k, pk["eval0"][k], v)
    # host synchronisations of one optimizer step of 4 micro-batches in the project's own code
    assert t["micro_batches"] == 4
    assert len(t["syncs_ours"]) <= 4, t["syncs_ours"]
    print("ours:", t["syncs_ours"], "\nDeepSpeed/transformers:", t["syncs_others"])
    print({k: (v["losses"], v["fill"]) for k, v in r.items()})
