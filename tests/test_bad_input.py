"""Bad input gets one clear message, exit code 2, and nothing overwritten.

Each case is a real `launch/train.py` process on one rank (WORLD_SIZE unset). To keep the suite fast, the cases run
in one driver process that imports torch / DeepSpeed / transformers once and forks a child per case (this file run
as a script: `python tests/test_bad_input.py CASES.json RESULTS.json`); each child runs launch/train.py's main() with
its own argv, environment, output files and master port, and exits with main()'s return value. The checks: exit code
2, exactly one "[ds_distill] error:" line, no traceback, the message names the key or file, and the case's directory
(config, data, model directories, output_dir) is byte for byte what it was before.

The checkpoint cases plant a complete-looking checkpoint whose DeepSpeed pickles would create the file `code_ran`
in the case's directory when unpickled: the unchanged digest shows that no code ran (on main it did). The
overwrite case checks that overwrite_output_dir deletes nothing when the data fails; the port case holds a port
open in this test process while the child is told to use it.

Covered elsewhere: NaN loss, SIGTERM and SIGKILL of one rank (tests/test_resume.py, with exact resume afterwards),
a stalled rank (tests/test_guards.py), a rank failing alone, the launcher stopped, rollback and a full disk during
the export (tests/test_failures.py). Here too: the disk filling up during a checkpoint, on a tmpfs the test mounts
(root only), and one case through a plain `python launch/train.py` process (the exit code as the shell sees it).
Runtime: about 40 s for the forked cases, about 1 min for the disk-full run.
"""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Driver (runs as a script, outside pytest)
# ----------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drive(cases_path: str, results_path: str) -> None:
    import importlib.util

    sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    launch_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_train)
    import ds_distill.trainer  # noqa: F401  (DeepSpeed, transformers, datasets: imported once, before forking)

    cases = json.loads(Path(cases_path).read_text())
    results = {}
    for name, case in cases.items():
        # outputs next to the case's directory, not in it (its digest must not change)
        out, err = (Path(case["dir"]).parent / f"{name}.{k}.txt" for k in ("stdout", "stderr"))
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # child: a fresh single-rank run of launch/train.py
            code = 1
            try:
                for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    os.environ.pop(k, None)
                os.environ["MASTER_PORT"] = str(_free_port())
                os.environ.update(case.get("env", {}))
                fo, fe = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), \
                    os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fo, 1)
                os.dup2(fe, 2)
                code = launch_train.main(case["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        results[name] = {"rc": os.waitstatus_to_exitcode(status), "stdout": out.read_text(), "stderr": err.read_text(),
                         "seconds": time.monotonic() - t0}
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ----------------------------------------------------------------------------------------------------------------
# The cases
# ----------------------------------------------------------------------------------------------------------------

from conftest import tiny_config, write_yaml  # noqa: E402


def tree_digest(path: Path) -> dict:
    """{relative path: sha256} of every file under `path` (directories as 'dir')."""
    out = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _copy_model(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _pickle_only_student(assets, d: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    m = _copy_model(assets["student"], d / "pickle_student")
    sd = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    torch.save(sd, m / "pytorch_model.bin")
    return m


def _teacher_other_tokenizer(assets, d: Path) -> Path:
    from transformers import AutoTokenizer

    m = _copy_model(assets["teacher"], d / "teacher_other_tok")
    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    tok.add_tokens(["<only_in_teacher>"])
    tok.save_pretrained(m)
    return m


def _teacher_small_vocab(assets, d: Path) -> Path:
    """A teacher whose lm_head has 512 rows for a 1000-token tokenizer: ids >= 512 would have no logit."""
    m = _copy_model(assets["teacher"], d / "teacher_512")
    cfg = json.loads((m / "config.json").read_text())
    cfg["vocab_size"] = 512
    (m / "config.json").write_text(json.dumps(cfg))
    return m


class _RunsCode:
    """A pickle that, when loaded without weights_only, creates the file `marker` (a stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted_checkpoint(ckpt: Path, marker: Path) -> None:
    """A checkpoint directory that looks complete and whose DeepSpeed files would run code when unpickled."""
    import torch

    ckpt.mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": _RunsCode(marker), "step": 2}, ckpt / name)
    (ckpt / "resume.json").write_text(json.dumps({"step": 2}))
    (ckpt / "COMPLETE").write_text(ckpt.name + "\n")


def _other_run_checkpoint(out: Path) -> Path:
    """A complete checkpoint of a run with another seed (its resume.json only: never loaded)."""
    ck = out / "checkpoints" / "step_00000002"
    ck.mkdir(parents=True)
    (ck / "resume.json").write_text(json.dumps({"step": 2, "extra": {"run": {"train.seed": 12345}}}))
    (ck / "COMPLETE").write_text("step_00000002\n")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    return ck


def _pickle_in_own_checkpoints(assets, d: Path):
    _planted_checkpoint(d / "out" / "checkpoints" / "step_00000002", d / "code_ran")
    return {}, []


def _latest_names_a_path_elsewhere(assets, d: Path):
    _planted_checkpoint(d / "elsewhere" / "step_00000009", d / "code_ran")
    (d / "out" / "checkpoints").mkdir(parents=True)
    (d / "out" / "checkpoints" / "latest").write_text(str(d / "elsewhere" / "step_00000009") + "\n")
    return {}, []


def _output_dir_under_a_file(assets, d: Path):
    (d / "a_file").write_text("x")
    return {"output_dir": str(d / "a_file" / "out")}, []


def _same_size_other_tokenizer(assets, d: Path):
    """A 1000-token tokenizer trained on other files: as many ids as the models', different ones."""
    from ds_distill.tiny import build_tokenizer, stdlib_files

    build_tokenizer(d / "other_tok", vocab_size=1000, files=stdlib_files(limit=40)[20:])
    return {"tokenizer_path": str(d / "other_tok")}, []


def _write(d: Path, name: str, lines: list) -> str:
    p = d / name
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(p)


CASES = {
    # name: (builder(assets, case_dir) -> (cfg overrides as dict, extra argv), substrings the message must contain)
    "unknown_key": (lambda a, d: ({}, ["--train.bogus_key", "3"]), ["bogus_key"]),
    "wrong_type": (lambda a, d: ({}, ["--train.max_steps", "ten"]), ["max_steps", "ten"]),
    "missing_model_dir": (lambda a, d: ({"student": {"path": str(d / "no_such_model")}}, []),
                          ["student.path", "no_such_model"]),
    "pickle_only_weights": (lambda a, d: ({"student": {"path": str(_pickle_only_student(a, d))}}, []),
                            ["student.path", "pickle", "student.allow_pickle_weights"]),
    "tokenizers_differ": (lambda a, d: ({"teacher": {"path": str(_teacher_other_tokenizer(a, d))},
                                         "tokenizer_path": a["tokenizer"]}, []),
                          ["teacher.path", "teacher_other_tok", "tokenizers differ", "<only_in_teacher>"]),
    "vocab_beyond_padding": (lambda a, d: ({"teacher": {"path": str(_teacher_small_vocab(a, d))}}, []),
                             ["teacher.path", "teacher_512", "teacher lm_head has only 512 rows",
                              "tokenizer has 1000 tokens"]),
    "empty_dataset": (lambda a, d: ({"data": {"train_files": [_write(d, "empty.jsonl", [])]}}, []),
                      ["empty.jsonl", "empty dataset"]),
    "record_missing_field": (lambda a, d: ({"data": {"train_files": [_write(d, "nofield.jsonl", [
        {"text": "### Human: hi ### Assistant: hello"}, {"body": "### Human: a ### Assistant: b"}])]}}, []),
        ["data.text_field", "record 2 of nofield.jsonl"]),
    "every_sample_too_long": (lambda a, d: ({"data": {"max_length": 3}}, []), ["data.max_length", "beyond"]),
    "every_sample_fully_masked": (lambda a, d: ({"data": {"train_files": [_write(d, "noassistant.jsonl", [
        {"text": "### Human: only a question"}, {"text": "no turns at all"}])]}}, []),
        ["noassistant.jsonl", "nothing to train"]),
    "output_dir_other_run": (lambda a, d: ({}, []), ["output_dir", "another run", "overwrite_output_dir"]),
    "output_dir_different_run": (lambda a, d: ({}, []), ["output_dir", "different run", "train.seed: 12345 there"]),
    "batch_sizes_do_not_multiply": (lambda a, d: ({"train": {"global_batch_size": 7}}, []),
                                    ["train.global_batch_size", "7"]),
    "alpha_outside_0_1": (lambda a, d: ({"loss": {"alpha": 1.5}}, []), ["loss.alpha", "1.5"]),
    "temperature_not_positive": (lambda a, d: ({"loss": {"temperature": 0.0}}, []), ["loss.temperature"]),
    "top_k_beyond_vocabulary": (lambda a, d: ({"loss": {"impl": "topk", "top_k": 5000}}, []),
                                ["loss.top_k", "5000", "1000 tokens"]),
    "chunk_size_not_positive": (lambda a, d: ({"loss": {"chunk_size": 0}}, []), ["loss.chunk_size"]),
    "alpha_without_teacher": (lambda a, d: ({"teacher": {"path": None}}, []), ["loss.alpha", "teacher.path"]),
    # issue 13: found before anything is deleted, and never by running a checkpoint's code
    "overwrite_then_bad_data": (lambda a, d: ({"overwrite_output_dir": True, "data": {"train_files": [
        _write(d, "empty.jsonl", [])]}}, []), ["empty.jsonl", "empty dataset"]),
    "checkpoint_pickle_runs_code": (_pickle_in_own_checkpoints, [
        "checkpoint.resume", "zero_pp_rank_0_mp_rank_00_model_states.pt", "refused", "it was not run"]),
    "latest_outside_the_run": (_latest_names_a_path_elsewhere, ["output_dir", "no complete checkpoint"]),
    "resume_path_not_a_checkpoint": (lambda a, d: ({"checkpoint": {"resume": str(d)}}, []),
                                     ["checkpoint.resume", "is not a checkpoint directory"]),
    "resume_explicitly_into_another_run": (lambda a, d: ({"checkpoint": {"resume": str(
        _other_run_checkpoint(d / "out"))}}, []), ["output_dir", "different run", "train.seed: 12345 there"]),
    "output_dir_under_a_file": (_output_dir_under_a_file, ["output_dir", "a_file", "is a file"]),
    "ds_config_overrides_class_path": (lambda a, d: ({"ds_config_overrides": {"optimizer": {"params": {
        "class_path": "tabnanny.NannyNag"}}}}, []), ["ds_config_overrides.optimizer.params.class_path"]),
    "tokenizer_path_other_ids": (_same_size_other_tokenizer,
                                 ["tokenizer_path", "other_tok", "different ids", "teacher.path"]),
    "rendezvous_port_in_use": (lambda a, d: ({}, []), ["MASTER_PORT", "already in use", "--master_port"]),
    # GPUs handed to the job that this (CPU-only) torch cannot use: refused, not a silent CPU run (ENV_CASES)
    "gpus_visible_torch_cannot_use": (lambda a, d: ({}, []), ["train.device: auto", "CUDA_VISIBLE_DEVICES=0",
                                                             "CPU-only build", "train.device: cpu"]),
    "slurm_step_gpus_torch_cannot_use": (lambda a, d: ({}, []), ["SLURM_STEP_GPUS=0,1", "CPU-only build"]),
    "device_cuda_unusable": (lambda a, d: ({"train": {"device": "cuda"}}, []), ["train.device: cuda",
                                                                               "CPU-only build"]),
}
ENV_CASES = {"gpus_visible_torch_cannot_use": {"CUDA_VISIBLE_DEVICES": "0"},
             "slurm_step_gpus_torch_cannot_use": {"SLURM_STEP_GPUS": "0,1"}}


def _prior_output(out: Path) -> None:
    """What a previous run left (no checkpoint): metrics and an export that must survive untouched."""
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.safetensors").write_bytes(b"previous weights")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss/total": 1.0}\n')


@pytest.fixture(scope="module")
def results(tiny_assets, tmp_path_factory):
    """Run every case (forked from one driver process); returns {name: (result, digest before, digest after)}."""
    base = tmp_path_factory.mktemp("bad_input")
    busy = socket.socket()
    cases, before = {}, {}
    for name, (builder, _) in CASES.items():
        d = base / name
        d.mkdir()
        overrides, argv = builder(tiny_assets, d)
        cfg = tiny_config(tiny_assets, d / "out", fmt="guanaco", train={"max_steps": 2})
        cfg["data"]["eval_files"] = []
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        if name in ("output_dir_other_run", "overwrite_then_bad_data", "resume_explicitly_into_another_run"):
            _prior_output(d / "out")
        if name == "output_dir_different_run":  # a complete checkpoint of a run with another seed
            _prior_output(d / "out")
            _other_run_checkpoint(d / "out")
        cases[name] = {"dir": str(d), "argv": ["--config", write_yaml(cfg, d / "config.yaml"), *argv],
                       "env": {"OMP_NUM_THREADS": "1", **ENV_CASES.get(name, {})}}
        if name == "rendezvous_port_in_use":  # a port this test process holds open while the cases run
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            cases[name]["env"]["MASTER_PORT"] = str(busy.getsockname()[1])
        before[name] = tree_digest(d)
    (base / "cases.json").write_text(json.dumps(cases))
    try:
        proc = subprocess.run([sys.executable, __file__, str(base / "cases.json"), str(base / "results.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    finally:
        busy.close()
    assert proc.returncode == 0, proc.stderr[-5000:]
    res = json.loads((base / "results.json").read_text())
    return {name: (res[name], before[name], tree_digest(base / name)) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_message_exit_2_nothing_changed(results, name):
    r, before, after = results[name]
    err = r["stderr"]
    errors = [line for line in err.splitlines() if line.startswith("[ds_distill] error:")]
    assert r["rc"] == 2, f"exit {r['rc']}\n{err[-3000:]}"
    assert len(errors) == 1, err[-3000:]
    message = err[err.index("[ds_distill] error:"):]
    for s in CASES[name][1]:
        assert s in message, f"{s!r} not in the message:\n{message}"
    assert "Traceback" not in err, err[-3000:]
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"


def test_exit_code_through_a_plain_process(tiny_assets, tmp_path):
    cfg = tiny_config(tiny_assets, tmp_path / "out", fmt="guanaco")
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                           write_yaml(cfg, tmp_path / "c.yaml"), "--loss.divergence", "kl_typo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("[ds_distill] error:") == 1 and "loss.divergence" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_our_code_never_unpickles():
    """torch.load only with weights_only=True in the project's own code (DeepSpeed's checkpoint loader aside)."""
    import re

    offenders = []
    for p in list((ROOT / "ds_distill").rglob("*.py")) + list((ROOT / "launch").rglob("*.py")):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
            if re.search(r"\bpickle\.loads?\(", line):
                offenders.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


class _ByName:
    """Pickles as `getattr(target, name)`: how Python 3.11.0-3.11.4 (Debian 12's 3.11.2) pickle an Enum member, and
    how a hostile file could reach any attribute of an allowed class."""

    def __init__(self, target, name: str):
        self.target, self.name = target, name

    def __reduce__(self):
        return (getattr, (self.target, self.name))


def test_checkpoint_loader_takes_enum_members_by_name_and_nothing_else(tmp_path):
    """DeepSpeed's optimizer states hold a ZeroStageEnum member; under Python 3.11.2 its pickle says getattr(
    ZeroStageEnum, 'weights'), which torch's weights-only loader refuses (every resume failed there). The loader
    rebuilds exactly the members of DeepSpeed's allowed enums; getattr of anything else is still refused."""
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ds_distill import engines

    good = tmp_path / "enum.pt"
    torch.save({"zero_stage": _ByName(ZeroStageEnum, "weights"), "w": torch.ones(2)}, good)
    loaded = engines.load_checkpoint_file(str(good))
    assert loaded["zero_stage"] is ZeroStageEnum.weights and torch.equal(loaded["w"], torch.ones(2))
    for target, name in ((ZeroStageEnum, "__class__"), (ZeroStageEnum, "_missing_"), (torch.Tensor, "add_"),
                         (subprocess.Popen, "__init__")):
        bad = tmp_path / "bad.pt"
        torch.save({"x": _ByName(target, name)}, bad)
        with pytest.raises(engines.CheckpointFileError) as e:
            engines.load_checkpoint_file(str(bad))
        assert e.value.refused, (target, name, e.value.reason)


# ----------------------------------------------------------------------------------------------------------------
# The disk fills up during a checkpoint
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.multirank
def test_disk_full_during_checkpoint_keeps_the_previous_one(tiny_assets, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    # one checkpoint of the tiny student on 1 rank is about 760 KB: the first fits, the second cannot
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        out = mnt / "out"
        cfg = tiny_config(tiny_assets, out, fmt="guanaco",
                          train={"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 1},
                          checkpoint={"every_steps": 1, "keep_last": 1, "resume": "auto"})
        cfg["data"]["eval_files"] = []
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update({"MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config",
                               write_yaml(cfg, tmp_path / "c.yaml")], capture_output=True, text=True, timeout=400,
                              env=env, cwd=ROOT)
        err = proc.stderr
        assert proc.returncode == 2, err[-4000:]
        errors = [line for line in err.splitlines() if line.startswith("[ds_distill] error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-4000:]
        msg = err[err.index("[ds_distill] error:"):]
        assert "cannot write the checkpoint" in msg and "step_00000002" in msg and "free on that disk" in msg, msg
        assert "the previous checkpoint" in msg and "step_00000001 is intact" in msg, msg
        ckpts = out / "checkpoints"
        assert (ckpts / "latest").read_text().strip() == "step_00000001"
        assert (ckpts / "step_00000001" / "COMPLETE").is_file()
        assert not (ckpts / "step_00000002").exists()  # the partial checkpoint was removed
        # and it is a usable checkpoint: DeepSpeed reads its weights back
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000001")
        assert len(sd) > 0
    finally:
        for _ in range(5):  # a process still closing its files keeps the mount busy for a moment
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(1.0)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)  # detach lazily, never leave it
