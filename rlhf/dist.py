"""Process state under a launcher (`accelerate launch`, torchrun, deepspeed), on accelerate.

The rank is read one way, ``process_rank()``: the global rank the launcher gave this process (``RANK``, which
torch.distributed and so accelerate's ``PartialState.process_index`` read too), known before torch is imported, so
the CLI and the logging can tell the main process at no cost. ``process_state()`` is accelerate's state, for what
needs the processes together (is_main_process, wait_for_everyone, local_process_index).
"""
from __future__ import annotations

import os

from rlhf.errors import StageError


def process_rank() -> int:
    """This process's global rank under torchrun / accelerate launch / deepspeed (0 when run plainly)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def fsdp_launch() -> bool:
    """Was this process started by `accelerate launch` with an FSDP config?"""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def process_state():
    """accelerate's process state (rank, world size); CPU-only machines use gloo (torchrun/accelerate launch)."""
    import torch
    from accelerate import PartialState

    if fsdp_launch() and not torch.cuda.is_available():
        raise StageError("FSDP needs GPUs: accelerate runs FSDP only on GPU-type devices and on CPUs silently falls "
                         "back to plain data parallel; launch with configs/accelerate/cpu.yaml or a DeepSpeed config "
                         "instead")
    return PartialState(cpu=not torch.cuda.is_available())


def launch_info(accelerator=None) -> dict:
    """How a run was spread: number of processes, accelerate's distributed type, DeepSpeed's ZeRO stage."""
    state = accelerator.state if accelerator is not None else process_state()
    info = {"num_processes": state.num_processes, "distributed_type": state.distributed_type.value}
    if getattr(state, "deepspeed_plugin", None) is not None:
        info["zero_stage"] = state.deepspeed_plugin.zero_stage
    return info


def close_process_group() -> None:
    """End of a launched run (torchrun / accelerate launch): destroy the process group while the interpreter is whole.
    Left to interpreter exit, a gloo worker thread still releasing the last collective's tensors needs the GIL, is
    killed inside a C++ destructor, and the process aborts (SIGABRT, "terminate called without an active exception";
    tests/test_multiprocess.py). A no-op in a one-process run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
