"""One logger for the package, quiet third-party noise; under several processes only the main one talks."""
from __future__ import annotations

import logging
import os
import warnings


def process_rank() -> int:
    """This process's global rank under torchrun / accelerate launch / deepspeed (0 when run plainly)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def close_process_group() -> None:
    """End of a launched run (torchrun / accelerate launch): destroy the process group while the interpreter is whole.
    Left to interpreter exit, a gloo worker thread still releasing the last collective's tensors needs the GIL, is
    killed inside a C++ destructor, and the process aborts (SIGABRT, "terminate called without an active exception";
    tests/test_multiprocess.py). A no-op in a one-process run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    logging.basicConfig(format="[rlhf] %(message)s", level=level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes on CPU warns on every 8-bit matmul; it is expected there and says nothing actionable
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    # peft calls transformers' deprecated gradient-checkpointing names; nothing a user can change
    warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing(_enable)?` is deprecated", category=FutureWarning)
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
