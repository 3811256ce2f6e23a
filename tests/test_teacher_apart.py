"""teacher.placement: separate (issue 16), the parts that need no launch: config validation naming each key, the
role split's refusals and the rank mapping. The multi-rank checks (same losses and weights as colocated, a teacher
rank's death, resume, work-ahead) are in tests/test_resume.py, against its colocated reference run."""
import pytest

from conftest import ROOT
from ds_distill.config import parse_config, validate
from ds_distill.errors import ConfigError, DistillError


@pytest.fixture()
def cfg(tmp_path):
    import yaml

    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "hello"}\n')
    model = tmp_path / "model"
    model.mkdir()
    c = {"teacher": {"path": str(model), "ds_config": str(ROOT / "ds_configs" / "teacher_zero3.json"),
                     "placement": "separate", "ranks": 1},
         "student": {"path": str(model)}, "data": {"train_files": [str(train)]}, "output_dir": str(tmp_path / "o")}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(c))
    return parse_config(["--config", str(p)])


def test_a_valid_separate_placement_passes(cfg):
    validate(cfg, world_size=2)


@pytest.mark.parametrize("change, key", [
    ({"teacher.ranks": 0}, "teacher.ranks"),
    ({"teacher.cache": "/some/cache"}, "teacher.placement: separate cannot be used with teacher.cache"),
    ({"loss.alpha": 0.0}, "teacher.placement: separate with loss.alpha: 0"),
])
def test_separate_placement_errors_name_the_key(cfg, change, key):
    for dotted, v in change.items():
        section, k = dotted.split(".")
        setattr(getattr(cfg, section), k, v)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=2)
    assert key in str(e.value) and "->" in str(e.value), str(e.value)


def test_parse_rejects_an_unknown_placement(cfg, tmp_path):
    with pytest.raises(DistillError) as e:
        parse_config(["--config", str(tmp_path / "c.yaml"), "--teacher.placement", "elsewhere"])
    assert "teacher.placement" in str(e.value)


def test_role_split_refuses_teacher_ranks_that_leave_no_student(monkeypatch):
    from ds_distill import engines

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistillError) as e:
        engines.split_roles(2, 10.0)  # refused before any socket is opened
    assert "teacher.ranks: 2 of 2 launched ranks leaves 0 student ranks" in str(e.value)


def test_rank_mapping_serves_every_student_once():
    from ds_distill.engines import Placement

    pl = Placement("student", 0, 6, 2, bridge=None)  # 4 students (global 0-3), teachers global 4 and 5
    assert pl.students == 4
    assert [pl.teacher_of(s) for s in range(4)] == [4, 5, 4, 5]
    assert pl.students_of(0) == [0, 2] and pl.students_of(1) == [1, 3]


def test_teacher_rank_probe_refuses_a_head_its_forward_does_not_apply(tiny_assets):
    """The teacher ranks' start-up probe (teacher_apart.probe_head) on the tiny teacher: passes as it is, and refuses
    (ModelError naming teacher.path) once the config claims a Cohere logit scale that its Qwen3 forward never applies
    (the fused head would then differ from the model's own logits)."""
    import torch

    from ds_distill import engines, models, teacher_apart
    from ds_distill.errors import ModelError

    model = models.load_causal_lm(tiny_assets["teacher"], dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(50.0)  # large logits: the transform must change them visibly
    engine = engines.ReplicatedTeacher(models.TeacherHidden(model), torch.device("cpu"))
    ids = torch.arange(3, 23).reshape(1, 20)
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert teacher_apart.probe_head(engine, mb, 16, 1e-3, tiny_assets["teacher"]) <= 1e-5
    model.config.model_type, model.config.logit_scale = "cohere", 0.5
    with pytest.raises(ModelError) as e:
        teacher_apart.probe_head(engine, mb, 16, 1e-3, tiny_assets["teacher"])
    assert f"teacher.path '{tiny_assets['teacher']}'" in str(e.value) and "x 0.5" in str(e.value), str(e.value)


def test_a_student_refuses_hidden_states_of_another_micro_batch(tmp_path):
    """Over the real role split and gloo bridge (2 processes, no DeepSpeed engine): the head arrives whole, and a
    header naming other sample ids than the student's micro-batch is refused before any hidden state is used."""
    import json
    import os
    import subprocess
    import sys

    from conftest import free_port

    port, procs = str(free_port()), []
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "scripts" / "apart_mismatch.py"),
                                       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    res = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("RESULT ")][0][len("RESULT "):])
    assert res["weight_ok"], res
    assert res["error"] and "teacher rank 1 sent micro-batch [0, 2, 5, 2, 11, 73]" in res["error"] \
        and "student rank 0 has [0, 2, 5, 2, 10, 58]" in res["error"], res
