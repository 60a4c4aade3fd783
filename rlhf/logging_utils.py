"""One logger for the package, quiet third-party noise; under several processes only the main one talks."""
from __future__ import annotations

import logging
import os
import warnings

from rlhf.dist import process_rank


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logging.basicConfig(format="[rlhf] %(message)s", level=level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes on CPU warns on every 8-bit matmul; it is expected there and says nothing actionable
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    # peft calls transformers' deprecated gradient-checkpointing names; nothing a user can change
    warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                            category=FutureWarning)
    # DeepSpeed calls torch's deprecated all_gather_into_tensor on every ZeRO-3 step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    # bitsandbytes says at import, on CPUs with AVX512-BF16, that an optional package (`kernels`) is missing; its
    # fallback works, and the notice would repeat under our prefix in every stage
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda r: "gemm_4bit_forward from kernels-community" not in r.getMessage())
    logger = logging.getLogger("rlhf")
    if process_rank() != 0:
        # The other processes would repeat the main one's messages, Python warnings and progress bars word for
        # word; what they log at WARNING or above (and tracebacks) still shows.
        logger.setLevel(max(level, logging.WARNING))
        warnings.filterwarnings("ignore")
        import datasets.utils.logging as ds_logging
        import transformers.utils.logging as hf_logging

        for lib in (hf_logging, ds_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    return logger
