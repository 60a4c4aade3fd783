#!/usr/bin/env bash
# The GPU check: what this project has never run on CUDA, in one script (under 8 minutes on one H200).
#
#   bash benchmarks/gpu_check.sh                    # on a machine with an NVIDIA GPU -> runs/gpu_check/results.md
#   bash benchmarks/gpu_check.sh --dry-run          # on a CPU, a few steps per stage: checks the script itself
#
# Options: --out DIR (default runs/gpu_check; the dry run: a temporary folder), --wheels DIR (first install the
# wheels in DIR: packages the machine lacks, for a machine that cannot reach a registry), --python PY.
#   bash benchmarks/gpu_check.sh --fetch-wheels .whl   # here, beforehand: the wheels (Python 3.12, x86-64) of what an
#                                                      # image with torch/transformers/peft/accelerate lacks, at the
#                                                      # versions this venv has (bitsandbytes, trl, datasets, ...)
#   On this project's lent H200 (no registry; its python3 has torch, transformers, peft, accelerate), e.g.:
#     run: bash benchmarks/gpu_check.sh --python python3 --wheels .whl --out /tmp/gc; cp /tmp/gc/*.md /tmp/gc/*.json
#          /tmp/gc/*.txt $OUT/          (carry: .whl, ignored through .git/info/exclude; ~45 MB of wheels)
#   RLHF_WHEELS="bitsandbytes trl ... transformers" adds packages (e.g. when the image's transformers is older than 5).
#
# What it runs (benchmarks/gpu_check.py): the demo chain pt -> sft -> rm -> ppo with sft/rm/ppo on a 4-bit base
# (bitsandbytes' CUDA kernels), bf16 autocast and bf16 weights (dtype auto on a GPU), SDPA attention; then the
# real-model chain sft -> rm -> ppo of configs/smollm2-135m/ when SmolLM2-135M-Instruct is in its cache
# (python scripts/fetch_smollm2.py; skipped with a note otherwise). Per stage: wall time, peak GPU memory
# (allocated and reserved) beside `rlhf estimate`'s peak for the same config, tokens/s of sft and rm training and
# of PPO's rollout and update. Results: OUT/results.md and OUT/results.json; the stage folders under OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT=""
WHEELS=""
FETCH=""
PY="${RLHF_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --fetch-wheels) FETCH="$2"; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "Error: unknown option '$1' (bash benchmarks/gpu_check.sh --help lists them)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -n "$FETCH" ]; then
  PINS=$("$PY" -c "from importlib.metadata import version as v
import os
print(' '.join(f'{n}=={v(n)}' for n in os.environ.get('RLHF_WHEELS', 'bitsandbytes trl datasets dill multiprocess').split()))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${RLHF_WHEELS_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux2014_x86_64 -d "$FETCH" $PINS
  ls -la "$FETCH"
  exit 0
fi
if [ -z "$OUT" ]; then
  if [ "$DRY" = 1 ]; then OUT="$(mktemp -d -t rlhf_gpu_check_XXXXXX)"; else OUT=runs/gpu_check; fi
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1 PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # the CPU path, even beside a GPU
fi
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/rlhf_gpu_check_site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/rlhf_gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import rlhf.stages" 2>/dev/null; then  # this checkout, without its dependencies (already there)
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "Error: could not install rlhf from $(pwd) with $PY; run scripts/setup.sh or pass --python" >&2; exit 1; }
fi
"$PY" -c "import torch, transformers, peft, trl, bitsandbytes, accelerate, datasets" 2>/dev/null \
  || { echo "Error: $PY lacks one of torch, transformers, peft, trl, bitsandbytes, accelerate, datasets;" \
            "install them (pip install -e .) or pass --wheels DIR" >&2; exit 1; }

mkdir -p "$OUT"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')   commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  fi
  "$PY" -c "import torch, transformers, peft, trl, bitsandbytes as b; print('torch', torch.__version__, 'cuda',
torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__,
'| bitsandbytes', b.__version__)"
} | tee "$OUT/environment.txt"
ARGS=(--out "$OUT")
if [ "$DRY" = 1 ]; then ARGS+=(--dry-run); fi
"$PY" benchmarks/gpu_check.py "${ARGS[@]}"
