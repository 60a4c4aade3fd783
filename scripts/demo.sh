#!/usr/bin/env bash
# Set up .venv and run the demo pipeline on the embedded default: pre-train a tiny base on the
# bundled corpus, then sft -> rm -> ppo on the demo task. Outputs in runs/demo/; a rerun skips
# stages that are finished and unchanged. Extra arguments go to `rlhf pipeline`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/rlhf pipeline configs/demo/pipeline.yaml "$@"
.venv/bin/rlhf inspect runs/demo/ppo   # the chain with each stage's metrics
