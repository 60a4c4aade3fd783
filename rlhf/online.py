"""What the online RL stages (stages/ppo.py, stages/grpo.py) share around their loop: prompt encoding, the order
prompts are drawn in, the optimizer by transformers' name, row-chunked no-grad passes, checkpoints that load
weights-only and resume exactly (RNG states included), the Accelerator and the run's log, each step's stats over the
processes, and the run's end (the last checkpoint, the stage folder and its manifest: ``finish_run``). No stage
config type: a stage passes its own config, and its name (``ppo``, ``grpo``) goes into the error messages. Torch is
imported where it is used, so a stage module that imports this one still checks its config and dataset names
before torch loads.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
from pathlib import Path

from rlhf.config import ConfigError

log = logging.getLogger("rlhf")


def stage_name(cfg) -> str:
    """``ppo`` for a PPOConfig, ``grpo`` for a GRPOConfig: the command named in error messages."""
    return type(cfg).__name__.removesuffix("Config").lower()


def optimizer_for(cfg):
    """``params -> optimizer`` for ``cfg.optim`` as transformers builds it for sft and rm
    (``Trainer.get_optimizer_cls_and_kwargs``), so every stage takes the same names (adamw_torch_fused, lion_8bit,
    paged_adamw_8bit, ...); weight_decay applies to every trainable parameter. Checked before the working folder.
    Through the module that holds the Trainer's mapping, not ``transformers.Trainer``: importing that pulls in
    datasets, pandas and pyarrow (~87 MiB of RSS), which the RL stages have no use for (tests/test_ppo.py checks
    that both give the same optimizer)."""
    import dataclasses
    import functools
    import types

    from transformers import trainer_optimizer
    from transformers.training_args import OptimizerNames, TrainingArguments

    from rlhf.errors import did_you_mean

    stage, names = stage_name(cfg), [o.value for o in OptimizerNames]
    if cfg.optim not in names:
        raise ConfigError(f"{stage}: key 'optim' is {cfg.optim!r}, which transformers does not know"
                          + did_you_mean(cfg.optim, names, otherwise=f"; use one of {', '.join(names)}"))
    # TrainingArguments' own defaults (betas, eps, optim_args, ...), not an instance: creating one would set up the
    # devices again and reset the state of the run's Accelerator
    fields = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = types.SimpleNamespace(**{**fields, "optim": OptimizerNames(cfg.optim), "learning_rate": cfg.learning_rate,
                                    "weight_decay": cfg.weight_decay})
    handler = trainer_optimizer._OPTIMIZER_HANDLERS.get(args.optim)  # what Trainer.get_optimizer_cls_and_kwargs does
    try:
        if handler is None:
            raise ValueError("transformers' Trainer cannot build it")
        cls, kwargs = handler(trainer_optimizer.OptimizerContext(
            args=args, model=None, optimizer_kwargs={"lr": args.learning_rate},
            adam_kwargs={"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon},
            optim_args=trainer_optimizer._parse_optim_args(args.optim_args)))
    except (ValueError, ImportError, AttributeError) as e:  # e.g. its package is not installed; GaLore needs a model
        raise ConfigError(f"{stage}: key 'optim' {cfg.optim!r}: {(str(e).splitlines() or [type(e).__name__])[0]}") \
            from None
    return functools.partial(cls, weight_decay=cfg.weight_decay, **kwargs)


def encode_prompts(tokenizer, examples: list[dict], max_len: int, what: str,
                   stage: str = "ppo") -> tuple[list[list[int]], list[dict]]:
    """Prompt ids (chat template, generation prompt) of ``examples`` and the examples kept; longer than ``max_len``
    tokens: skipped with a warning, all of them: a ConfigError."""
    from rlhf.templates import encode_prompt

    kept = [(ids, e) for e in examples if (ids := encode_prompt(tokenizer, e["messages"], max_len))]
    if examples and not kept:
        raise ConfigError(
            f"{stage}: every one of the {len(examples)} prompts of {what} is longer than max_prompt_length={max_len} "
            "tokens "
            f"(chat template applied); raise max_prompt_length or use shorter prompts")
    if len(kept) < len(examples):
        log.warning("%s: %d of %d prompts of %s are longer than max_prompt_length=%d and are skipped", stage,
                    len(examples) - len(kept), len(examples), what, max_len)
    return [k[0] for k in kept], [k[1] for k in kept]


def prompt_order(step: int, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Prompt indices of an RL step: epochs of seeded shuffles, deterministic in (seed, step) so --resume needs no
    sampler state; each process takes its own slice."""
    start = (step * world + rank) * batch
    out = []
    for i in range(start, start + batch):
        epoch = i // n
        perm = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        out.append(perm[i % n])
    return out


def no_grad(fn):
    """``@torch.no_grad()`` that imports torch when ``fn`` is called, not when its module is imported."""
    @functools.wraps(fn)
    def no_grad_fn(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return no_grad_fn


def chunked(fn, n: int, size: int, *tensors):
    """fn over row chunks of `tensors`, results concatenated."""
    import torch

    return torch.cat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, n, size)])


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only (not macOS, not musl)
    except (OSError, TypeError):  # no C library to open by name (Windows)
        return None


def release_freed_memory(device) -> None:
    """On CPU, give the pages the allocator holds free back to the OS (glibc's ``malloc_trim(0)``).

    There the activations are malloc'd, and glibc keeps what a forward and backward free: its mmap threshold rises
    to the largest block freed, so the next micro-batch's blocks come from the heap, whose holes it never returns.
    Each micro-batch of an update could then add to the peak RSS, and the rollout's no-grad passes to the update's
    (docs/dpo_grpo.md, "Trimming the heap"). Called between the phases of an online step, where the live tensors
    are fewest; it costs the page faults of refilling what it returned. A no-op on CUDA (its caching allocator
    holds the tensors) and without glibc."""
    if getattr(device, "type", device) == "cpu" and (trim := _malloc_trim()) is not None:
        trim(0)


def average_gradients(params, accelerator) -> None:
    """Mean of each gradient over the processes, in one all-reduce of all of them flattened (one call per
    parameter costs a round trip each: it made PPO on 2 processes slower than on 1)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    for g, avg in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(work: Path, step: int, save_weights, optimizer, scheduler, state: dict, limit: int | None,
                    accelerator) -> None:
    """checkpoint-N: the weights (``save_weights(folder)``, main process), optimizer and scheduler, ``state`` and the
    step (trainer_state.json), and each process's RNG states. Written to a temporary folder, then renamed: complete
    or absent. Every file loads weights-only (tensors and plain values: the RNG states as lists), so loading runs no
    pickled code."""
    import numpy as np
    import torch

    from rlhf.manifest import checkpoints

    ckpt = work / "checkpoints" / f"checkpoint-{step}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    accelerator.wait_for_everyone()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()
    if main:
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(tmp, ckpt)
        for old in checkpoints(work)[:-limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_plain(path: Path):
    """torch.load weights-only: a file that needs unpickling (a planted payload) is refused, never run."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        from rlhf.manifest import StageError

        raise StageError(f"{path} is not a plain tensor file (weights-only loading refused it: "
                         f"{str(e).splitlines()[0]}); "
                         f"rlhf writes tensors and plain values only: delete {path.parent} to resume from the "
                         "checkpoint "
                         "before it") from None


def load_checkpoint(ckpt: Path, optimizer, scheduler, rank: int = 0) -> dict:
    """Optimizer, scheduler and this process's RNG states from ``ckpt``; returns its trainer_state.json (``step``
    and the stage's ``state``). The caller loads the weights."""
    import numpy as np
    import torch

    opt_state = load_plain(ckpt / "optimizer.pt")
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    rng_file = ckpt / f"rng_state_{rank}.pth"  # a run resumed on fewer/more processes reuses process 0's
    rng = load_plain(rng_file if rng_file.is_file() else ckpt / "rng_state_0.pth")
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ---------------------------------------------------------------------------------------------------------------
# The run: processes, the log


def accelerator_for(cfg):
    """accelerate's Accelerator of an RL stage: mixed precision from bf16/fp16, CPU processes when there is no GPU
    (torchrun/accelerate launch on CPUs: gloo), report_to's trackers writing under <output_dir>/runs; data parallel
    only (DeepSpeed/FSDP refused); the seed per process; only the main process logs below warnings."""
    import torch
    from accelerate import Accelerator
    from transformers import set_seed

    from rlhf.manifest import work_dir
    from rlhf.train_utils import TRACKER_DIR, trackers

    stage = stage_name(cfg)
    try:
        accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no",
                                  cpu=not torch.cuda.is_available(), log_with=trackers(cfg) or None,
                                  project_dir=str(work_dir(cfg.output_dir) / TRACKER_DIR))
    except ValueError as e:
        if not trackers(cfg):
            raise
        raise ConfigError(f"report_to {cfg.report_to}: {e} (rlhf {stage} logs through accelerate's trackers)") from None
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise ConfigError(f"rlhf {stage} runs data-parallel (one base per process, gradients averaged); launch it "
                          "without DeepSpeed/FSDP (e.g. configs/accelerate/multi_gpu.yaml)")
    set_seed(cfg.seed + accelerator.process_index)
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one process reports
    return accelerator


class RunLog:
    """The rows of a run: ``train_log.jsonl`` (also sent to report_to's trackers, same names) and
    ``samples.jsonl``, written by the main process. Trackers start here (``accelerator.init_trackers``)."""

    def __init__(self, work: Path, cfg, accelerator):
        from rlhf.config import to_dict
        from rlhf.train_utils import LOG_FILE, check_trackers, tracker_config

        self.work, self.log_file, self.samples_file = work, work / LOG_FILE, work / "samples.jsonl"
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        accelerator.init_trackers(stage_name(cfg), config=tracker_config(to_dict(cfg)))
        if self.main:
            check_trackers(cfg, accelerator.trackers)

    def write(self, row: dict, samples: bool = False) -> None:
        if self.main:
            with open(self.samples_file if samples else self.log_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if not samples:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def start_eval(self) -> dict:
        """The evaluation a resumed run logged at step 0, as ``<key>_before`` metrics."""
        from rlhf.train_utils import read_log

        first = next((r for r in read_log(self.log_file.parent) if r["step"] == 0), {})
        return {f"{k}_before": v for k, v in first.items() if k.startswith("eval_")}

    def finish(self) -> None:
        """Close the trackers' files; not accelerator.end_training(), which also destroys the process group (the
        wait_for_everyone after it, and a pipeline's next stage, need it)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()


def step_stats(stats: dict, params, accelerator, step: int, stage: str) -> dict:
    """A step's stats averaged over the processes; a stat or a trainable weight that is not finite raises
    FloatingPointError (the stage turns it into its ``diverged`` error)."""
    import math

    import torch

    from rlhf.train_utils import all_finite

    stats = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in stats.items()}
    if bad := [k for k, v in stats.items() if not math.isfinite(v)]:
        raise FloatingPointError(f"{', '.join(bad)} not finite at {stage} step {step}")
    if not all_finite(params):
        raise FloatingPointError(f"the trainable weights are not finite at {stage} step {step}")
    return stats


def finish_run(cfg, run_log: RunLog, *, step: int, last_saved: int, params, run_eval, save, save_policy, tokenizer,
               metrics: dict, reward: str, state: dict, plot, datasets: dict, started: float) -> str:
    """The end of an RL run, every process: the weights checked, the end-of-run evaluation (``run_eval("end")``, as
    ``<key>_after`` metrics), the last checkpoint (``save(step)``) unless the loop just wrote it, the trackers closed.
    Then the main process writes the stage folder: the policy (``save_policy(work)``) and tokenizer, metrics from the
    log (``<reward>_first``/``_last`` of the ``<reward>_mean`` rows, kl_last, eos_share_last, steps),
    trainer_state.json (``step`` and ``state``), the curves (``plot(rows, png)``) and the manifest; the others wait.
    Returns the output folder."""
    from rlhf.config import to_dict
    from rlhf.dist import launch_info
    from rlhf.manifest import finish_output
    from rlhf.train_utils import all_finite, diverged, read_log

    stage, work, accelerator = stage_name(cfg), run_log.work, run_log.accelerator
    if not all_finite(params):  # e.g. resumed from a damaged checkpoint at the last step
        raise diverged(work, f"the trainable weights are not finite at {stage.upper()} step {step}")
    metrics.update({f"{k}_after": v for k, v in run_eval("end").items()})
    if last_saved != step:
        save(step)
    run_log.finish()  # the trackers' files closed before the folder is renamed
    if accelerator.is_main_process:
        save_policy(work)  # the policy at the folder root: PeftModel.from_pretrained(base, folder)
        tokenizer.save_pretrained(str(work))
        rows = read_log(work)
        if step_rows := [r for r in rows if f"{reward}_mean" in r]:
            metrics.update({f"{reward}_first": step_rows[0][f"{reward}_mean"],
                            f"{reward}_last": step_rows[-1][f"{reward}_mean"]})
            metrics.update({f"{k}_last": step_rows[-1][k] for k in ("kl", "eos_share") if k in step_rows[-1]})
        metrics["steps"] = step
        (work / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        plot(rows, work / "training_curves.png")
        log.info("%s metrics: %s", stage, {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
        finish_output(work, cfg.output_dir, stage=stage, config=to_dict(cfg), base_model=cfg.model_name_or_path,
                      parent=cfg.sft_dir, datasets=datasets, metrics=metrics, started=started,
                      launch=launch_info(accelerator))
    accelerator.wait_for_everyone()
    return str(Path(cfg.output_dir))
