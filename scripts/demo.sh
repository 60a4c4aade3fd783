#!/usr/bin/env bash
# Set up .venv and run the demo pipeline on the embedded default: pre-train a tiny base on the
# bundled corpus, then sft -> rm -> ppo. Outputs in runs/demo/. Extra arguments go to every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for stage in pt sft rm ppo; do
  echo "=== rlhf $stage configs/demo/$stage.yaml"
  .venv/bin/rlhf "$stage" "configs/demo/$stage.yaml" --overwrite-output-dir true "$@"
done
