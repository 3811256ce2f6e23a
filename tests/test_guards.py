"""Guards: the per-step flag exchange and non-finite policy, the watchdog, SIGTERM, a fully masked micro-batch.

Fast unit tests (no DeepSpeed launch), then one 2-rank ZeRO-3 run (about 1 min) where the loss of rank 0 turns NaN at
step 2 with train.nonfinite: skip (the weights after the skipped step equal those before it, training goes on), and
rank 1 then stalls at step 4: both ranks' watchdogs report their stacks within train.watchdog_timeout_s and the
launcher exits with the watchdog's code.
"""
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, read_jsonl, run_deepspeed, tiny_config, write_yaml
from ds_distill import faults, guards
from ds_distill.errors import ConfigError, NonFiniteError


# ----------------------------------------------------------------------------------------------------------------
# StepGuard with a simulated peer rank
# ----------------------------------------------------------------------------------------------------------------

def _guard(nonfinite="abort", max_skipped=2, discards=True, peer_flags=(0.0, 0.0, 0.0)):
    """A rank-0 guard of a 2-rank world whose all-reduce adds `peer_flags` (rank 1's [bad0, bad1, sigterm])."""
    def all_reduce_sum(t):
        t += torch.tensor((list(peer_flags) + [0.0] * len(t))[:len(t)], dtype=t.dtype)
        return t

    g = guards.StepGuard(rank=0, world_size=2, nonfinite=nonfinite, max_skipped_steps=max_skipped,
                         deepspeed_discards_nonfinite=discards, device=torch.device("cpu"),
                         all_reduce_sum=all_reduce_sum)
    g.begin(7)
    return g


FINITE = torch.tensor([3.0, 2.0, 1.0, 10.0])


def test_finite_step_passes_the_loss_through():
    g = _guard()
    loss = torch.tensor(0.5)
    assert g.check(FINITE, loss) is loss
    assert g.bad_ranks == [] and not g.stop_requested
    assert g.after_step(step_applied=True) is False


def test_nonfinite_loss_on_a_peer_poisons_every_rank_and_aborts_naming_step_and_rank():
    g = _guard(peer_flags=(0.0, 1.0, 0.0))
    out = g.check(FINITE, torch.tensor(0.5))
    assert math.isnan(out.item())  # this rank's gradients become NaN too: DeepSpeed discards the update everywhere
    assert g.bad_ranks == [1]
    with pytest.raises(NonFiniteError, match=r"step 7: non-finite loss on rank\(s\) \[1\]"):
        g.after_step(step_applied=False)


def test_local_nan_names_this_rank():
    g = _guard()
    g.check(torch.tensor([float("nan"), 1.0, 1.0, 4.0]), torch.tensor(1.0))
    assert g.bad_ranks == [0]


def test_skip_counts_up_to_the_limit_then_aborts():
    g = _guard(nonfinite="skip", max_skipped=2, peer_flags=(0.0, 1.0, 0.0))
    for expected in (1, 2):
        g.begin(expected)
        g.check(FINITE, torch.tensor(1.0))
        assert g.after_step(step_applied=False) is True and g.skipped_steps == expected
    g.begin(3)
    g.check(FINITE, torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match="3 steps skipped, more than train.max_skipped_steps=2"):
        g.after_step(step_applied=False)


def test_nonfinite_gradient_norm_with_finite_loss_aborts():
    g = _guard()
    g.check(FINITE, torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        g.after_step(step_applied=False)
    g = _guard()
    g.check(FINITE, torch.tensor(1.0))
    assert g.after_step(step_applied=False, fp16=True) is True  # fp16 loss-scale overflow is routine, not an error


def test_an_update_applied_despite_a_nonfinite_loss_is_an_internal_error():
    g = _guard(peer_flags=(0.0, 1.0, 0.0))
    g.check(FINITE, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="DeepSpeed applied the update"):
        g.after_step(step_applied=True)


def test_without_deepspeed_overflow_check_the_guard_stops_before_the_backward():
    g = _guard(discards=False, peer_flags=(0.0, 1.0, 0.0))
    with pytest.raises(NonFiniteError, match="rank\\(s\\) \\[1\\]"):
        g.check(FINITE, torch.tensor(1.0))
    with pytest.raises(ConfigError, match="train.nonfinite"):
        guards.validate_mode("skip", False, 0, "fp32")
    guards.validate_mode("abort", False, 0, "fp32")


def test_grad_check_for_optimizers_without_overflow_check():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([0.0, 1.0, 2.0])
    _guard(discards=False).check_grads([p])  # finite: passes
    with pytest.raises(NonFiniteError, match="non-finite gradient"):
        _guard(discards=False, peer_flags=(1.0,)).check_grads([p])  # a peer saw one
    p.grad[1] = float("inf")
    with pytest.raises(NonFiniteError, match="step 7: non-finite gradient"):
        _guard(discards=False).check_grads([p])


def test_sigterm_on_a_peer_stops_every_rank():
    g = _guard(peer_flags=(0.0, 0.0, 1.0))
    g.check(FINITE, torch.tensor(1.0))
    assert g.stop_requested


def test_sigterm_handler_sets_the_flag_and_restores():
    restore = guards.install_sigterm_handler()
    try:
        assert not guards.sigterm_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert guards.sigterm_requested()
        g = _guard()
        g.check(FINITE, torch.tensor(1.0))
        assert g.stop_requested
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv(faults.FAULTS_ENV, "kill@3:0, nan@4 ,stall@5:1")
    assert faults.parse() == {"kill": (3, 0), "nan": (4, None), "stall": (5, 1)}
    monkeypatch.delenv(faults.FAULTS_ENV)
    assert faults.parse() == {}


def test_process_group_timeout_exceeds_the_watchdog():
    for w in (0.0, 10.0, 1800.0, 7200.0):
        assert guards.process_group_timeout(w) >= 1800.0
        assert guards.process_group_timeout(w) > w


# ----------------------------------------------------------------------------------------------------------------
# Watchdog in a child process
# ----------------------------------------------------------------------------------------------------------------

WATCHDOG_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from ds_distill.guards import Watchdog
w = Watchdog({timeout}, rank=5, poll_s=0.05).start()
def beating(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        w.beat("working")
        time.sleep(0.05)
def stuck_in_a_collective():
    time.sleep(30)
beating({beat_s})
print("beats done", flush=True)
stuck_in_a_collective() if {stall} else None
w.stop()
"""


def _child(timeout, beat_s, stall):
    code = WATCHDOG_CHILD.format(root=str(ROOT), timeout=timeout, beat_s=beat_s, stall=stall)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - t0


def test_watchdog_reports_the_stack_within_its_timeout():
    proc, _ = _child(timeout=1.0, beat_s=1.5, stall=True)  # beats for longer than the timeout: no false alarm
    assert "beats done" in proc.stdout
    assert proc.returncode == guards.EXIT_WATCHDOG, proc.stderr
    m = re.search(r"watchdog: rank 5 made no progress for ([\d.]+) s", proc.stderr)
    assert m and 1.0 <= float(m.group(1)) < 1.5, proc.stderr
    assert "since 'working'" in proc.stderr
    assert re.search(r"\[rank 5 stack\].*stuck_in_a_collective", proc.stderr), proc.stderr


def test_watchdog_stays_quiet_while_beating():
    proc, _ = _child(timeout=0.5, beat_s=1.5, stall=False)
    assert proc.returncode == 0, proc.stderr
    assert "watchdog" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# A fully masked micro-batch still runs the whole forward/backward (same ZeRO-3 collectives on every rank)
# ----------------------------------------------------------------------------------------------------------------

def test_fully_masked_micro_batch_forwards_and_backwards_through_every_parameter(tiny_assets):
    from transformers import AutoModelForCausalLM

    from ds_distill.models import StudentWithLoss

    student = AutoModelForCausalLM.from_pretrained(tiny_assets["student"], dtype=torch.float32)
    from ds_distill.losses import LossSpec

    wrapper = StudentWithLoss(student, loss_spec=LossSpec(vocab_size=1000, alpha=0.0, chunk_size=16, top_k=8))
    ids = torch.randint(3, 900, (2, 9))
    labels = torch.full_like(ids, -100)
    total, ce, kd, tokens, _, aux = wrapper(ids, torch.ones_like(ids), labels)
    assert tokens.item() == 0 and total.item() == 0.0 and math.isfinite(ce.item())
    assert aux.item() == 0.0  # a dense student has no router aux loss
    total.backward()
    missing = [n for n, p in wrapper.named_parameters() if p.grad is None]
    assert not missing, f"parameters outside the graph of a fully masked micro-batch: {missing}"
    assert all(torch.count_nonzero(p.grad) == 0 for p in wrapper.parameters())


# ----------------------------------------------------------------------------------------------------------------
# 2 ranks: skip a NaN step, then a stalled rank meets the watchdog
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_two_ranks_skip_nan_step_then_watchdog_ends_a_stall(tiny_assets, tmp_path):
    out = tmp_path / "out"
    timeout = 15.0
    cfg = tiny_config(tiny_assets, out, fmt="guanaco",
                      train={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 6, "zero_stage": 3,
                             "nonfinite": "skip", "max_skipped_steps": 1, "watchdog_timeout_s": timeout},
                      checkpoint={"every_steps": 1, "keep_last": 10, "resume": "auto"})
    cfg["data"]["eval_files"] = []
    proc = run_deepspeed(ROOT / "launch" / "train.py", ["--config", write_yaml(cfg, tmp_path / "c.yaml")],
                         env={faults.FAULTS_ENV: "nan@2:0,stall@4:1"}, timeout=600)  # a hang fails here
    log = proc.stdout + proc.stderr

    # step 2 skipped: named, weights unchanged by it, training went on at step 3
    assert "step 2: non-finite loss on rank(s) [0]: step skipped, weights unchanged (1/1 skips used)" in log, \
        log[-4000:]
    from test_resume import assert_same_weights, zero_weights

    ck = out / "checkpoints"
    w1, w2, w3 = (zero_weights(ck, f"step_0000000{s}") for s in (1, 2, 3))
    assert_same_weights(w1, w2, "weights before and after the skipped step 2")
    assert any(not torch.equal(w2[k], w3[k]) for k in w2), "step 3 did not train"
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 3]

    # step 4: rank 1 stalls; both ranks' watchdogs report within the timeout, the launcher exits with their code
    assert proc.returncode == guards.EXIT_WATCHDOG, log[-4000:]
    assert "test fault stall@4 on rank 1" in log
    idle = {int(r): float(s) for r, s in re.findall(r"watchdog: rank (\d) made no progress for ([\d.]+) s", log)}
    assert set(idle) == {0, 1}, log[-4000:]
    assert all(timeout < s < timeout + 5.0 for s in idle.values()), idle
    stacks = {r: "\n".join(line for line in log.splitlines() if line.startswith(f"[rank {r} stack]"))
              for r in (0, 1)}
    assert "in at_step_start" in stacks[1]  # the stalled rank: where it stalls
    assert "all_reduce" in stacks[0]  # the waiting rank: inside the collective


def test_nonfinite_kd_term_alone_names_the_teacher():
    """Finite CE (so finite student logits) with a non-finite KD term: the teacher's side, not the learning rate."""
    g = _guard(peer_flags=(0.0, 2.0, 0.0))  # rank 1: KD alone
    g.check(torch.tensor([float("nan"), 1.0, float("nan"), 4.0]), torch.tensor(1.0))  # rank 0: KD alone too
    assert g.bad_ranks == [0, 1]
    with pytest.raises(NonFiniteError, match="the teacher's outputs are not finite") as e:
        g.after_step(step_applied=False)
    assert "lower train.lr does not help" in str(e.value)
    g = _guard(peer_flags=(0.0, 2.0, 0.0))
    g.check(torch.tensor([float("nan"), float("nan"), 1.0, 4.0]), torch.tensor(1.0))  # rank 0: the CE
    with pytest.raises(NonFiniteError, match="lower train.lr, check the data"):
        g.after_step(step_applied=False)
