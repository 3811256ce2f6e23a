"""Exact resume after kills, an abort on NaN and a preemption, against one uninterrupted run (2 CPU ranks, ZeRO-3).

The reference run and the interrupted chain use the same config (41 training rows: the two ranks' shards differ in
length, 21 and 20, and the run crosses epoch boundaries at different micro-batches on each rank), except for the
checkpoint cadence (the reference saves every step, so its step-3 checkpoint can be compared) and W&B (offline in
the chain, so the run id's continuity and the absence of the API key can be checked). The chain, in one output_dir:

  C1  SIGKILL of rank 0 while it writes the checkpoint of step 4 (DeepSpeed's files written, COMPLETE not yet):
      the launcher exits non-zero, `latest` still names step 2, step_4 has no COMPLETE.
  C2  resumes from step 2 (not the partial step 4); the loss of rank 1 turns NaN at step 4: exit 2, the message names
      step 4 and rank 1, and the weights saved as step 3 equal the reference's step-3 weights.
  C3  resumes from that step-3 checkpoint; rank 1 gets SIGTERM at step 5: both ranks save step 5 and exit 143.
  C4  resumes from step 5 and finishes.
Then: the exported safetensors equal the reference's (within 1e-6: see WEIGHT_ATOL for the one documented source of
last-bit differences), and every metrics.jsonl row (steps 1..6, each once) equals the reference's except wall-clock
fields. Runtime: 5 two-rank launches, about 4 min on 2 idle cores.

The same reference also checks teacher.placement: separate (issue 16, last test): a 4-rank run whose teacher rank is
killed, then a 3-rank resume, against the colocated 2-rank numbers and weights.
"""
import json
import math
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT, assert_ok, launch_direct, read_jsonl, run_deepspeed, tiny_config, write_yaml

pytestmark = pytest.mark.multirank

TIME_FIELDS = {"tokens_per_sec", "mem/peak_gb"}
MAX_STEPS = 6


def _config(assets, out, data_file, every_steps, keep_last, wandb_mode):
    cfg = tiny_config(assets, out, fmt="guanaco",
                      train={"micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2,
                             "max_steps": MAX_STEPS, "zero_stage": 3},
                      loss={"alpha": 0.5, "temperature": 2.0, "impl": "chunked", "chunk_size": 64},
                      checkpoint={"every_steps": every_steps, "keep_last": keep_last, "resume": "auto"},
                      wandb={"mode": wandb_mode, "project": "ds_distill_resume_test"})
    cfg["data"]["train_files"] = [str(data_file)]
    cfg["data"]["eval_files"] = []
    return cfg


@pytest.fixture(scope="module")
def odd_data(tiny_assets, tmp_path_factory):
    """41 guanaco rows (all usable): with 2 ranks the shards hold 21 and 20 rows."""
    src = Path(tiny_assets["data"]) / "guanaco_train.jsonl"
    path = tmp_path_factory.mktemp("odd") / "train41.jsonl"
    path.write_text("".join(src.read_text().splitlines(keepends=True)[:41]))
    return path


@pytest.fixture(scope="module")
def reference(tiny_assets, odd_data, tmp_path_factory):
    """The uninterrupted run: checkpoints every step (all kept) so intermediate weights can be compared."""
    d = tmp_path_factory.mktemp("reference")
    cfg = _config(tiny_assets, d / "out", odd_data, every_steps=1, keep_last=MAX_STEPS + 1, wandb_mode="disabled")
    proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", write_yaml(cfg, d / "ref.yaml")], timeout=900)
    assert_ok(proc)
    return d / "out"


def zero_weights(ckpt_root: Path, tag: str) -> dict:
    """fp32 weights of a ZeRO checkpoint, consolidated from its shards offline (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


# Why not bitwise: DeepSpeed's CPU Adam (ops/csrc/includes/cpu_adam.h, IncrementStep) computes beta^t by multiplying
# by beta once per step in an uninterrupted run, but with std::pow(beta, t) on the first step after a resume; both in
# fp32, so the bias correction of that step can differ in the last bit (seen: resuming at step 5 moves ~9% of the
# weights by 1 ulp at step 6, max 7.5e-9; resuming at steps 2, 3 and 4 stayed bitwise equal). Everything else is
# restored exactly. A tolerance of 1e-6 is far below one optimizer step here (>1e-5, checked below).
WEIGHT_ATOL = 1e-6
METRIC_RTOL = 1e-6


def assert_same_weights(a: dict, b: dict, what: str, atol: float = WEIGHT_ATOL) -> None:
    assert a.keys() == b.keys(), what
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    assert max(diff.values()) <= atol, f"{what}: tensors differ by more than {atol}: {diff}"


def assert_same_rows(got: list, want: list) -> None:
    """metrics.jsonl rows: same steps and keys; values equal up to METRIC_RTOL, wall-clock fields aside."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), g["step"]
        for k in g:
            if k not in TIME_FIELDS:
                assert math.isclose(g[k], w[k], rel_tol=METRIC_RTOL, abs_tol=1e-12), (g["step"], k, g[k], w[k])


def test_shards_differ_in_length(tiny_assets, odd_data):
    from ds_distill.data import MicroBatchStream, build_dataset
    from ds_distill.models import load_tokenizer

    ds = build_dataset([str(odd_data)], "guanaco", load_tokenizer(tiny_assets["tokenizer"]), 64)
    shards = [MicroBatchStream(ds, rank=r, world_size=2, micro_batch_size=2, seed=0, pad_token_id=0).shard_len
              for r in range(2)]
    assert shards == [21, 20]


def test_killed_aborted_preempted_chain_equals_uninterrupted_run(tiny_assets, odd_data, reference, tmp_path):
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    secret = f"secret-xyz-{uuid.uuid4().hex[:8]}"
    cfg = _config(tiny_assets, out, odd_data, every_steps=2, keep_last=2, wandb_mode="offline")
    yaml_path = write_yaml(cfg, tmp_path / "chain.yaml")
    logs = []

    def launch(faults: str):
        proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", yaml_path],
                             env={"DS_DISTILL_TEST_FAULTS": faults, "WANDB_API_KEY": secret, "WANDB_DIR": str(out),
                                  "WANDB_MODE": "offline"}, timeout=900)
        logs.append(proc.stdout + proc.stderr)
        return proc, proc.stdout + proc.stderr

    def latest() -> str:
        return (ckpts / "latest").read_text().strip()

    # C1: rank 0 SIGKILLed inside the checkpoint of step 4, after DeepSpeed's files, before COMPLETE
    proc, log = launch("ckpt_kill@4:0")
    assert proc.returncode != 0, log[-3000:]
    assert "test fault ckpt_kill@4 on rank 0" in log
    assert latest() == "step_00000002"
    assert (ckpts / "step_00000004").is_dir() and not (ckpts / "step_00000004" / "COMPLETE").exists()
    assert list((ckpts / "step_00000004").glob("*optim_states.pt")), "the kill came before DeepSpeed's files"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]

    # C2: resumes from step 2 (the partial step 4 is ignored); NaN loss on rank 1 at step 4 -> abort, step 3 saved
    proc, log = launch("nan@4:1")
    assert proc.returncode == 2, log[-3000:]
    assert "resumed from" in log and "step_00000002 at step 2" in log
    errors = [line for line in log.splitlines() if line.startswith("[ds_distill] error:")]
    assert len(errors) == 1, errors  # once, from rank 0, not once per rank
    assert "step 4: non-finite loss on rank(s) [1]" in errors[0] and "step_00000003" in errors[0]
    assert "Traceback" not in log
    assert latest() == "step_00000003"
    ref3, ref4 = (zero_weights(reference / "checkpoints", f"step_0000000{s}") for s in (3, 4))
    assert_same_weights(zero_weights(ckpts, "step_00000003"), ref3,
                        "weights saved by the NaN abort vs reference step 3")
    one_step = max((ref3[k].double() - ref4[k].double()).abs().max().item() for k in ref3)
    assert one_step > 10 * WEIGHT_ATOL, one_step  # the tolerance would notice an applied (or half-applied) step
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]

    # C3: resumes from the abort's step-3 checkpoint; SIGTERM to rank 1 only at step 5 -> every rank saves, exits 143
    proc, log = launch("sigterm@5:1")
    assert proc.returncode == 143, log[-3000:]
    assert "step_00000003 at step 3" in log
    assert "SIGTERM received: saved the checkpoint of step 5" in log
    assert latest() == "step_00000005" and (ckpts / "step_00000005" / "COMPLETE").is_file()
    assert (ckpts / "step_00000004" / "COMPLETE").is_file()  # the partial step 4 of C1 was replaced by a whole one
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    # C4: resumes from step 5 and finishes
    proc, log = launch("")
    assert_ok(proc)
    assert "step_00000005 at step 5" in log

    # the final weights and every logged step equal the uninterrupted run's
    assert_same_weights(load_file(str(out / "final" / "model.safetensors")),
                        load_file(str(reference / "final" / "model.safetensors")), "final export vs reference")
    got, want = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1))
    assert_same_rows(got, want)

    # one W&B run across the four launches (resumed by id), and no API key anywhere in the outputs or logs
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 4, run_dirs
    assert len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1, run_dirs
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"W&B key found in {leaked}"
    assert not any(secret in log for log in logs)
    saved_cfg = json.loads((out / "final" / "ds_distill_config.json").read_text())
    assert secret not in json.dumps(saved_cfg)


# ----------------------------------------------------------------------------------------------------------------
# teacher.placement: separate (issue 16) against the same uninterrupted colocated reference
# ----------------------------------------------------------------------------------------------------------------

def test_separate_teacher_ranks_equal_colocated_survive_a_teacher_death_and_resume(tiny_assets, odd_data, reference,
                                                                                  tmp_path):
    """S1: 4 ranks started by hand (no launcher stopping the others for them): students 0-1, replicated teacher
    ranks 2 (serving student 0) and 3 (student 1). Teacher rank 2 is SIGKILLed when it starts step 4's micro-batches:
    student 0 must stop naming teacher rank 2, student 1 then loses student 0 in a collective, and teacher 3 must
    exit by itself on losing student 1 (a student dying stops its teacher); all within the watchdog timeout. The
    checkpoint of step 2 is complete; steps 1-2 equal the colocated reference.
    S2: `deepspeed --num_gpus 3 launch/train.py --teacher.placement separate --teacher.ranks 1` (one ZeRO-3 teacher
    rank; the students' world is still 2) resumes and finishes: every step's loss/total, loss/ce, loss/kl, grad_norm
    and the exported weights equal the reference's; the timelines show the teacher's forward of each micro-batch
    i+1 starting before its student finished the forward of micro-batch i (so before its step ended)."""
    out = tmp_path / "out"
    cfg = _config(tiny_assets, out, odd_data, every_steps=2, keep_last=3, wandb_mode="disabled")
    cfg["teacher"].update({"placement": "separate", "ranks": 2, "sharding": "replicate"})
    cfg["train"]["watchdog_timeout_s"] = 60
    killed = launch_direct(write_yaml(cfg, tmp_path / "s1.yaml"), 4, {"DS_DISTILL_TEST_FAULTS": "kill@3:2"},
                           timeout=300)
    codes, errs = [c for c, _, _ in killed], [e for _, e, _ in killed]
    assert codes[2] == -9 and all(c != 0 for c in codes), (codes, [e[-2000:] for e in errs])
    since_death = [t - killed[2][2] for _, _, t in killed]
    assert max(since_death) < cfg["train"]["watchdog_timeout_s"], since_death
    assert "teacher rank 2 (teacher.placement: separate) stopped while student rank 0 waited" in errs[0], \
        errs[0][-3000:]
    assert "student rank 1 stopped while this teacher rank waited" in errs[3], errs[3][-3000:]
    from ds_distill import checkpoint

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002"], ckpts  # every 2 steps; step 4 never reached
    assert checkpoint.find_latest(str(out / "checkpoints")).endswith(ckpts[0])  # complete

    want = [r for r in read_jsonl(reference / "metrics.jsonl") if "loss/total" in r]
    keys = ("loss/total", "loss/ce", "loss/kl", "grad_norm")

    def assert_steps_equal(steps):
        got = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "loss/total" in r}
        for w in want:
            if w["step"] in steps:
                for k in keys:
                    assert math.isclose(got[w["step"]][k], w[k], rel_tol=METRIC_RTOL), (w["step"], k)

    assert_steps_equal({1, 2})

    cfg["teacher"].update({"ranks": 1, "sharding": "zero3"})
    proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", write_yaml(cfg, tmp_path / "s2.yaml"),
                                                        "--teacher.placement", "separate", "--teacher.ranks", "1"],
                         nprocs=3)
    assert_ok(proc)
    assert "resumed from" in proc.stdout + proc.stderr
    assert_steps_equal(set(range(1, MAX_STEPS + 1)))
    assert_same_weights(load_file(str(out / "final" / "model.safetensors")),
                        load_file(str(reference / "final" / "model.safetensors")), "separate vs colocated export")

    # work-ahead in S2 (steps 3..6 = micro-batches 4..11 of each student)
    tl = out / "teacher_apart"
    teacher = {(r["student"], r["index"]): r for r in read_jsonl(tl / "teacher_rank2.jsonl")}
    for s in (0, 1):
        student = {r["index"]: r for r in read_jsonl(tl / f"student_rank{s}.jsonl")}
        assert sorted(student) == list(range(2 * MAX_STEPS)), sorted(student)
        for i in range(4, 2 * MAX_STEPS - 1):
            assert teacher[(s, i + 1)]["forward_start"] < student[i]["forward_end"], (s, i)
