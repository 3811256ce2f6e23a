"""Rank-0 logging: a console progress bar, output_dir/metrics.jsonl, and W&B (online / offline / disabled).

The tracker is built once by the trainer and injected; nothing else calls wandb. Every row is one optimizer step
with the step's global token-weighted values (what the gradient was computed from). The W&B key is read by wandb
from the environment only: it never enters the config, the logs or metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

from .errors import DistillError


class Tracker:
    def __init__(self, *, output_dir: str, is_rank0: bool, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "ds_distill", wandb_run_name: Optional[str] = None,
                 wandb_entity: Optional[str] = None, wandb_run_id: Optional[str] = None,
                 config: Optional[dict] = None, show_progress: bool = True):
        self.is_rank0 = is_rank0
        self.output_dir = output_dir
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        self.run = None
        self.run_id = wandb_run_id
        self._bar = None
        self._t0 = time.time()
        if not is_rank0:
            return
        os.makedirs(output_dir, exist_ok=True)
        truncate_metrics(self.metrics_path, start_step)
        if wandb_mode != "disabled":
            import wandb

            self.run = wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(
                os.path.abspath(output_dir)), entity=wandb_entity, mode=wandb_mode, dir=output_dir,
                id=wandb_run_id, resume="allow" if wandb_run_id else None, config=config or {})
            self.run_id = self.run.id
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")
        if show_progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, row: dict) -> None:
        """One optimizer step's metrics to metrics.jsonl, W&B and the progress bar (rank 0 only)."""
        if not self.is_rank0:
            return
        row = {"step": step, **{k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in row.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.run is not None:
            self.run.log(row)
        if self._bar is not None:
            self._bar.n = step
            if "loss/total" in row:  # eval rows (eval/...) share the step but carry no loss
                self._bar.set_postfix(loss=f"{row['loss/total']:.4f}", refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        """A line for the user, printed by rank 0 above the progress bar."""
        if not self.is_rank0:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def summary(self, values: dict) -> None:
        if self.is_rank0 and self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        """Close the bar and finish the W&B run (called on every exit path the trainer controls)."""
        if not self.is_rank0:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def parse_metrics_lines(path: str, lines: list[str]) -> list[tuple[str, dict]]:
    """(line, row) for every row of metrics.jsonl. A last line that is not whole JSON (the process died or the disk
    filled during the append) is dropped: it is the row of a step that the next run writes again. A broken line
    before the last is not something an append leaves: DistillError naming the file and line."""
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line if line.endswith("\n") else line + "\n", json.loads(line)))
        except ValueError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise DistillError(f"output_dir: {path} line {i + 1} is not JSON ({line[:60]!r}) -> repair or delete "
                                   "that line (or the file: the checkpoints do not need it)") from None
    return out


def truncate_metrics(path: str, keep_through_step: int) -> None:
    """Drop rows with step > keep_through_step (a resumed run rewrites them) and a half-written last line,
    atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    rows = parse_metrics_lines(path, lines)
    kept = [line for line, row in rows if row.get("step", 0) <= keep_through_step]
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [row for _, row in parse_metrics_lines(path, f.readlines())]
