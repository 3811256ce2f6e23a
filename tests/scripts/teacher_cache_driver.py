"""One process, one rank, no launcher: every 1-rank check of the offline teacher, sharing one start-up.

    python tests/scripts/teacher_cache_driver.py SPEC.json    (MASTER_PORT set by the caller)

SPEC: {"runs": {name: config_dict}, "caches": {name: {"config": dict, "cache_dir": D, "top_k": k, "dtype": s}},
       "refusals": {name: config_dict}, "writer_refusals": {name: {...same as caches...}}, "out": path}
In order: writes `caches` (launch/cache_teacher.py's write_cache at world size 1), trains each of `runs` with
trainer.main (what launch/train.py calls; each writes output_dir/metrics.jsonl), then for each of `refusals` builds
the run and records the DistillError message (None if it built), likewise for `writer_refusals`. Results -> out.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import tempfile  # noqa: E402

import yaml  # noqa: E402

from ds_distill import cache_writer, engines, trainer  # noqa: E402
from ds_distill.config import DistillConfig, parse_config  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def to_cfg(d: dict) -> DistillConfig:
    """Through parse_config, as launch/train.py does (types checked)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(d, f)
    try:
        return parse_config(["--config", f.name])
    finally:
        os.remove(f.name)


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out = {"caches": {}, "runs": {}, "refusals": {}, "writer_refusals": {}}
    try:
        for name, c in spec.get("caches", {}).items():
            t0 = time.time()
            cache_writer.write_cache(to_cfg(c["config"]), c["cache_dir"], top_k=c["top_k"], dtype=c["dtype"])
            out["caches"][name] = time.time() - t0
        for name, c in spec.get("runs", {}).items():
            t0 = time.time()
            out["runs"][name] = {"code": trainer.main(to_cfg(c)), "seconds": time.time() - t0}
        for name, c in spec.get("refusals", {}).items():
            try:
                trainer.build(to_cfg(c))
                out["refusals"][name] = None
            except DistillError as e:
                out["refusals"][name] = str(e)
        for name, c in spec.get("writer_refusals", {}).items():
            try:
                cache_writer.write_cache(to_cfg(c["config"]), c["cache_dir"], top_k=c["top_k"], dtype=c["dtype"])
                out["writer_refusals"][name] = None
            except DistillError as e:
                out["writer_refusals"][name] = str(e)
    finally:
        with open(spec["out"], "w") as f:
            json.dump(out, f, indent=1)
        engines.shutdown()


if __name__ == "__main__":
    main()
