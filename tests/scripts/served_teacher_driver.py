"""One process, one rank, no launcher: the 1-rank checks of the served teacher (issue 16), sharing one start-up.

    python tests/scripts/served_teacher_driver.py SPEC.json    (MASTER_PORT set by the caller)

SPEC: {"caches": {name: {"config": dict, "cache_dir": D, "top_k": k, "dtype": s}},
       "runs": [{"name": n, "config": dict, "wait_for": url or null}], "refusals": {name: config_dict}, "out": path}
In order: writes `caches` (write_cache at world size 1); runs each of `runs` as launch/train.py does
(trainer.main, a DistillError printed and mapped to its exit code by the launcher's own `_fail`; stderr
captured), after waiting for `wait_for`/health to answer; builds each of `refusals` and records the DistillError
message (None if it built). Results -> out.
"""
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from ds_distill import cache_writer, engines, trainer  # noqa: E402
from ds_distill.config import parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def _yaml(d: dict) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(d, f)
    return f.name


def _wait(url: str, limit_s: float = 120.0) -> None:
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            if time.time() - t0 > limit_s:
                raise
            time.sleep(0.2)


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    load = importlib.util.spec_from_file_location("train_launch", os.path.join(ROOT, "launch", "train.py"))
    train_launch = importlib.util.module_from_spec(load)
    load.loader.exec_module(train_launch)
    out = {"caches": {}, "runs": {}, "refusals": {}}
    try:
        for name, c in spec.get("caches", {}).items():
            path = _yaml(c["config"])
            cache_writer.write_cache(parse_config(["--config", path]), c["cache_dir"], top_k=c["top_k"],
                                     dtype=c["dtype"])
            out["caches"][name] = True
        for r in spec.get("runs", []):
            if r.get("wait_for"):
                _wait(r["wait_for"])
            t0 = time.time()
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:  # launch/train.py's main minus its closing shutdown (the group must serve the next run)
                    code = trainer.main(parse_config(["--config", _yaml(r["config"])]))
                except DistillError as e:
                    code = train_launch._fail(e)  # the launcher's message and exit code
            out["runs"][r["name"]] = {"code": code, "stderr": err.getvalue()[-20000:], "seconds": time.time() - t0}
            sys.stderr.write(err.getvalue())
        for name, c in spec.get("refusals", {}).items():
            try:
                trainer.build(parse_config(["--config", _yaml(c)]))
                out["refusals"][name] = None
            except DistillError as e:
                out["refusals"][name] = str(e)
    finally:
        with open(spec["out"], "w") as f:
            json.dump(out, f, indent=1)
        engines.shutdown()


if __name__ == "__main__":
    main()
