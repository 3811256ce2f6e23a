"""The demo's plumbing at reduced size (`launch/demo.py --quick`: 3 two-rank trainings + one evaluation).

The full demo (~10 minutes) is too slow for CI; its numbers are recorded in docs/DEMO.md. The quick run is too small
to promise that distillation wins, so this test checks what the full run relies on:
- the corpus is split by file (no held-out file is trained on) and both students start from the same weights;
- the trainer's eval hook (ZeRO-3 engines, teacher hidden states cached after step 0) gives the same held-out
  numbers as launch/eval.py on the exported models (plain Hugging Face, one process);
- results.json / the printed table report exactly launch/eval.py's numbers;
- each run's report plots one point per logged step and per eval, and generations.md holds the four models.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.multirank


def _rows(path: Path, key: str) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if key in line]


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sys.path.insert(0, str(ROOT / "launch"))
    import demo

    # split by file, deterministic, disjoint; the eval records come only from held-out files
    from ds_distill.tiny import stdlib_files

    train_files, held_files = demo.split_files(stdlib_files())
    assert not set(train_files) & set(held_files) and len(held_files) >= 40
    corpus = json.loads((out / "corpus.json").read_text())
    assert corpus["held_out_files"] == len(held_files) and corpus["eval_records"] == demo.QUICK["eval_records"]

    res = json.loads((out / "results.json").read_text())
    ev = json.loads((out / "eval" / "eval.json").read_text())["results"]
    assert res["ce_student_ppl"] == ev["CE student"]["student_ppl"]
    assert res["kd_student_ppl"] == ev["KD student"]["student_ppl"]
    assert res["teacher_ppl"] == ev["KD student"]["teacher_ppl"] == ev["CE student"]["teacher_ppl"]
    assert f"{res['kd_student_ppl']:.2f}" in proc.stdout and f"{res['teacher_ppl']:.2f}" in proc.stdout
    # training worked at all: every trained model beats the untrained student by far, the teacher most
    assert res["teacher_ppl"] < min(res["ce_student_ppl"], res["kd_student_ppl"]) < 0.7 * res["student_before_ppl"]

    steps = demo.QUICK["student_steps"]
    for run, col in (("kd_student", "KD student"), ("ce_student", "CE student")):
        evals = {r["step"]: r for r in _rows(out / run / "metrics.jsonl", '"eval/')}
        assert sorted(evals) == [0, steps // 2, steps]
        # in-training eval (2 ranks, ZeRO-3, cached teacher) == launch/eval.py on the export (1 process, plain HF)
        for k in ("student_ppl", "tokens") + (("teacher_ppl", "kl", "agree") if run == "kd_student" else ()):
            assert evals[steps][f"eval/{k}"] == pytest.approx(ev[col][k], rel=1e-4, abs=1e-6), (run, k)
        # ... and at step 0 both runs measured the same initial student
        assert evals[0]["eval/student_ppl"] == pytest.approx(ev["student before"]["student_ppl"], rel=1e-4)
        plotted = json.loads((out / run / "report_data.json").read_text())
        assert len(plotted["losses.png"]["loss/ce"]["x"]) == steps
        assert plotted["eval_ppl.png"]["student"]["x"] == [0, steps // 2, steps]
        assert ("gap.png" in plotted) == (run == "kd_student")  # the CE run has no teacher to compare with
        assert "| student perplexity |" in (out / run / "report.md").read_text()
    gens = (out / "eval" / "generations.md").read_text()
    for name in ("teacher", "student before", "CE student", "KD student"):
        assert gens.count(f"**{name}**") == 2 * 3  # 2 prompts x 3 temperatures
