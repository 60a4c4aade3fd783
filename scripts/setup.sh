#!/usr/bin/env bash
# Set up .venv with rlhf and its dependencies. Needs only Python >= 3.10.
#   torch: RLHF_TORCH="<pip args>" picks the build yourself, e.g.
#     RLHF_TORCH="torch --index-url https://download.pytorch.org/whl/cu124" bash scripts/setup.sh
#   otherwise: a machine with an NVIDIA GPU (nvidia-smi) gets PyPI's default (CUDA) build; a machine
#   without one gets a CPU build: a local CPU wheel when pip's find-links has one, else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${RLHF_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${RLHF_TORCH:-}" ]; then
    $PIP install $RLHF_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install "torch>=2.4"
  else
    $PIP install --no-deps --no-index "torch==${RLHF_TORCH_CPU_VERSION:-2.13.0}" 2>/dev/null \
      || $PIP install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# RLHF_EXTRAS: the optional dependency groups of pyproject.toml, e.g. "test,deepspeed". DeepSpeed's C++ ops
# compile when first used (DS_BUILD_OPS=0), so installing it needs no CUDA toolkit.
DS_BUILD_OPS=0 $PIP install -e ".[${RLHF_EXTRAS:-test}]"
"$VENV/bin/python" -c "import torch, rlhf; print('rlhf ready: torch', torch.__version__, '| cuda' if torch.cuda.is_available() else '| cpu')"
