"""Two processes over the real role split (engines.split_roles, gloo): rank 0 a student (teacher_apart.ApartTeacher),
rank 1 a teacher that sends its head, then a header and hidden states for ANOTHER micro-batch than the student's.
The student must refuse them (DistillError naming both). Prints RESULT <json> on the student. Used by
tests/test_teacher_apart.py."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from ds_distill import engines, teacher_apart  # noqa: E402
from ds_distill.errors import DistillError  # noqa: E402


def main() -> None:
    pl = engines.split_roles(1, 60.0)
    H, V = 8, 16
    mb = {"input_ids": torch.ones(2, 5, dtype=torch.int64), "sample_ids": torch.tensor([3, 7])}
    if pl.role == "teacher":
        meta = {"rows": V, "hidden": H, "dtype": "float32", "bias": False, "scale": 1.0, "softcap": None,
                "model_type": "test", "sharding": "replicate"}
        for w in teacher_apart._send_json(pl, meta, 0, teacher_apart.TAG_META):
            w.wait()
        pl.send(torch.arange(V * H, dtype=torch.float32).reshape(V, H), 0, teacher_apart.TAG_WEIGHT).wait()
        start = teacher_apart._recv_json(pl, 0, teacher_apart.TAG_START, lambda w: w.wait())
        assert start["micro_batches"] == 1, start
        other = {"input_ids": mb["input_ids"], "sample_ids": torch.tensor([3, 8])}  # one row of other data
        pl.send(teacher_apart._header(0, other), 0, teacher_apart.TAG_HEADER).wait()
        return
    student = teacher_apart.ApartTeacher(pl, 0, torch.device("cpu"), sys.argv[1])
    weight_ok = bool(torch.equal(student.weight, torch.arange(V * H, dtype=torch.float32).reshape(V, H)))
    student.start({"samples_consumed": 0}, 0, 1, 1)
    try:
        with student.side(mb, None, torch.device("cpu")):
            pass
        error = None
    except DistillError as e:
        error = str(e)
    print("RESULT " + json.dumps({"weight_ok": weight_ok, "error": error}), flush=True)


if __name__ == "__main__":
    main()
