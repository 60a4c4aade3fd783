"""Build DeepSpeed's CPU ops now (they compile on first use otherwise): on a machine without CUDA, the
shared-memory communication op that every DeepSpeed run loads and CPU Adam (ZeRO offload). Takes ~3 min
the first time, then seconds (cached in ~/.cache/torch_extensions). Needs g++; ninja comes with deepspeed."""
import torch

if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator

    for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is not None:
            builder.load(verbose=False)
            print(f"deepspeed op ready: {builder.absolute_name()}")
