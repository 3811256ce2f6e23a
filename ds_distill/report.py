"""The run report: output_dir/report.md with PNG plots and the final eval table, from metrics.jsonl.

    losses.png    loss/ce and loss/total (top), loss/kl (bottom) per logged step
    eval_ppl.png  eval/student_ppl per eval step, the teacher's perplexity as a horizontal line
    gap.png       the gap closing, per eval step: eval/student_ppl - eval/teacher_ppl, eval/kl, eval/agree
report_data.json holds exactly the series that were plotted (x and y per line), so tools and tests can read them.
Rank 0 only; matplotlib with the Agg backend (no display needed).
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

from .evaluate import markdown_table


def read_rows(metrics_path: str) -> list[dict]:
    """metrics.jsonl rows (train rows and eval rows); [] when the file does not exist."""
    if not os.path.exists(metrics_path):
        return []
    from .tracking import read_metrics  # tolerates a half-written last line

    return read_metrics(metrics_path)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows holding `key` with a finite value; a later row for a step replaces an earlier."""
    by_step: dict[int, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def eval_at(rows: list[dict], step: int) -> dict:
    """The eval/ values logged at `step`, without the prefix ({} when there is no eval row at that step)."""
    out = {}
    for r in rows:
        if int(r.get("step", -1)) == step:
            out.update({k[len("eval/"):]: v for k, v in r.items() if k.startswith("eval/")})
    return out


def _plot(path: str, title: str, panels: list[tuple[str, list[tuple[str, list, list, dict]]]]) -> dict:
    """One figure with a panel per (ylabel, lines) stacked vertically (shared step axis); returns the plotted
    data read back from the matplotlib lines: {label: {x, y}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(yl, [ln for ln in lines if ln[1]]) for yl, lines in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 + 1.8 * len(panels)), dpi=100, sharex=True,
                             squeeze=False)
    plotted = {}
    for ax, (ylabel, lines) in zip(axes[:, 0], panels):
        for label, xs, ys, style in lines:
            (line,) = ax.plot(xs, ys, label=label, **style)
            x, y = line.get_data()
            plotted[label] = {"x": [float(v) for v in x], "y": [float(v) for v in y]}
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return plotted


def write_report(output_dir: str, rows: list[dict], *, title: str = "ds_distill run report",
                 columns: Optional[dict[str, dict]] = None, notes: Optional[list[str]] = None,
                 task_results: Optional[dict[str, dict]] = None, task_note: str = "") -> dict:
    """Write report.md, the PNGs and report_data.json into output_dir; returns {png name: {line: {x, y}}}.

    rows: metrics.jsonl rows (train rows and eval rows, each with its step). columns: the final table
    ({column: finalize()-style dict}); by default the first eval (step 0: before training) and the last eval.
    task_results: eval.tasks results ({model: tasks.evaluate_models column}), shown as a task accuracy table.
    """
    os.makedirs(output_dir, exist_ok=True)
    data: dict[str, dict] = {}
    if _series(rows, "loss/total")[0]:
        data["losses.png"] = _plot(os.path.join(output_dir, "losses.png"), "training loss (token means per step)", [
            ("CE / total", [("loss/ce", *_series(rows, "loss/ce"), {}),
                            ("loss/total", *_series(rows, "loss/total"), {"linestyle": "--"})]),
            ("KL (at loss.temperature)", [("loss/kl", *_series(rows, "loss/kl"), {"color": "C2"})])])
    s_steps, s_ppl = _series(rows, "eval/student_ppl")
    t_steps, t_ppl = _series(rows, "eval/teacher_ppl")
    if s_steps:
        lines = [("student", s_steps, s_ppl, {"marker": "o"})]
        if t_steps:  # the teacher is fixed: one horizontal line across the eval steps at its value
            lines.append(("teacher", [s_steps[0], s_steps[-1]], [t_ppl[-1], t_ppl[-1]], {"linestyle": "--"}))
        data["eval_ppl.png"] = _plot(os.path.join(output_dir, "eval_ppl.png"), "held-out perplexity",
                                     [("perplexity", lines)])
    if s_steps and t_steps:
        t_by = dict(zip(t_steps, t_ppl))
        gap_steps = [s for s in s_steps if s in t_by]
        gap = [s_ppl[s_steps.index(s)] - t_by[s] for s in gap_steps]
        data["gap.png"] = _plot(os.path.join(output_dir, "gap.png"), "the gap to the teacher (held-out)", [
            ("student ppl - teacher ppl", [("ppl gap", gap_steps, gap, {"marker": "o"})]),
            ("KL(teacher || student)", [("KL", *_series(rows, "eval/kl"), {"marker": "s", "color": "C1"})]),
            ("top-1 agreement", [("agree", *_series(rows, "eval/agree"), {"marker": "^", "color": "C2"})])])
    with open(os.path.join(output_dir, "report_data.json"), "w") as f:
        json.dump(data, f, indent=1)

    if columns is None and s_steps:
        first = f"step {s_steps[0]} (before)" if s_steps[0] == 0 else f"step {s_steps[0]}"
        columns = {first: eval_at(rows, s_steps[0])}
        if s_steps[-1] != s_steps[0]:
            columns[f"step {s_steps[-1]} (after)"] = eval_at(rows, s_steps[-1])
    train_steps, _ = _series(rows, "loss/total")
    md = [f"# {title}", ""]
    if train_steps:
        last = next(r for r in reversed(rows) if "loss/total" in r)
        md += [f"{len(train_steps)} logged steps (last: step {train_steps[-1]}); final training loss "
               f"{last['loss/total']:.4f} (CE {last.get('loss/ce', float('nan')):.4f}, KL "
               f"{last.get('loss/kl', float('nan')):.4f}).", ""]
    if columns:
        md += ["## Held-out evaluation", "",
               "Token-weighted over the trained tokens of data.eval_files (the teacher's values do not change).",
               "", markdown_table(columns), ""]
    if task_results:
        from .tasks import markdown_table as task_table

        md += ["## Task accuracy", "", task_note, "", task_table(task_results), "",
               "Per-sample records: tasks/ (lm_eval_samples_*.jsonl, humaneval_*.jsonl, tasks.json).", ""]
    md += ["## Plots", ""]
    for png, caption in (("losses.png", "Training loss"), ("eval_ppl.png", "Held-out perplexity"),
                         ("gap.png", "Gap to the teacher")):
        if png in data:
            md += [f"### {caption}", "", f"![{caption}]({png})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return data
