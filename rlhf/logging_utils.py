"""One logger for the package, quiet third-party noise."""
from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logging.basicConfig(format="[rlhf] %(message)s", level=level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes on CPU warns on every 8-bit matmul; it is expected there and says nothing actionable
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    return logging.getLogger("rlhf")
