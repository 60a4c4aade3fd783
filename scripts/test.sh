#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh, with DeepSpeed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF_EXTRAS=test,deepspeed bash scripts/setup.sh
.venv/bin/ruff check .  # lint first (pyproject.toml [tool.ruff]: pyflakes, pycodestyle, lines <= 120 characters)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RLHF_REQUIRE_DEEPSPEED=1  # tests/test_multiprocess.py fails instead of skipping its DeepSpeed test
# DeepSpeed compiles its CPU ops (shared-memory all-reduce; CPU Adam for offload) on first use, ~3 min once:
# build them here, outside the tests' time (cached in ~/.cache/torch_extensions)
.venv/bin/python scripts/deepspeed_ops.py
exec .venv/bin/python -m pytest -q "$@"
