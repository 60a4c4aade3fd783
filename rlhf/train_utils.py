"""What the training stages share: TrainingArguments from our config, a JSONL log, where a resumed run
continues, the stop on a non-finite loss, gradient or weight (sft, rm and ppo alike), and the curves plot."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from rlhf.errors import RlhfError

LOG_FILE = "train_log.jsonl"
log = logging.getLogger("rlhf")


class DivergedError(RlhfError, FloatingPointError):
    """Training produced a non-finite loss, gradient or weight; the message names the step and the last good
    checkpoint."""


class TrainingDone(Exception):
    """Raised by the sft/rm callback when a run resumes from the checkpoint at its last step (nothing left to train)."""


def all_finite(tensors) -> bool:
    """Are all ``tensors`` (None entries skipped) free of NaN and inf? One device sync."""
    import torch

    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def diverged(work: Path, what: str) -> DivergedError:
    """The one-line error for ``what`` (e.g. "loss is nan at step 3"), naming the last good checkpoint."""
    from rlhf.manifest import last_checkpoint

    ckpt = last_checkpoint(work)
    todo = (f"The last good checkpoint is {ckpt}: continue with --resume true" if ckpt
            else "No checkpoint was saved before it: rerun")
    return DivergedError(f"{what}; stopping. {todo} (e.g. after lowering learning_rate)")


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (by a run killed after its last checkpoint)."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(r + "\n" for r in rows))


def metrics_before(work: Path, resume_from: str | None, measure, main: bool) -> dict:
    """The metrics measured before training (``measure()``), kept in task_metric_before.json by the main process;
    a resumed run (``resume_from`` set) reads them back from there ({} when the file is missing)."""
    before = work / "task_metric_before.json"
    if resume_from is None:
        metrics = measure()
        if main:
            before.write_text(json.dumps(metrics))
        return metrics
    return json.loads(before.read_text()) if before.is_file() else {}


def resume_point(work: Path, resume: bool, logs: tuple[str, ...] = (LOG_FILE,)) -> str | None:
    """The checkpoint a run continues from: with ``resume``, the newest complete one (rlhf.manifest.checkpoint_problem);
    None: from the start. The main process removes the torn or damaged checkpoints after it, saying so, and the rows
    of ``logs`` that the interrupted run wrote after it."""
    from rlhf.dist import process_state
    from rlhf.manifest import checkpoint_problem, checkpoints

    if not resume:
        return None
    state, found = process_state(), None
    for ckpt in reversed(checkpoints(work)):
        if (problem := checkpoint_problem(ckpt)) is None:
            found = ckpt
            break
        if state.is_main_process:
            log.warning("%s is incomplete or damaged (%s): removed, resuming from the checkpoint before it", ckpt,
                        problem)
            shutil.rmtree(ckpt, ignore_errors=True)
    if state.is_main_process:
        for name in logs:
            truncate_jsonl(work / name, int(found.name.split("-")[1]) if found else -1)
    state.wait_for_everyone()
    log.info("resuming %s from %s", work, found or "the start (no complete checkpoint)")
    return str(found) if found else None


TRACKER_DIR = "runs"  # report_to trackers that write files (tensorboard): inside the stage folder, they travel with it


def trackers(cfg) -> list[str]:
    """The names in ``report_to``, [] for none (transformers' names; "all": every tracker installed)."""
    names = [n.strip().lower() for n in cfg.report_to if n.strip()]
    return [] if names in ([], ["none"]) else names


def tracker_config(config: dict) -> dict:
    """A resolved config as trackers' hyperparameters take it (tensorboard's hparams: scalars and strings only)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


def check_trackers(cfg, started: list) -> None:
    """Say which of report_to's trackers did not start (accelerate drops one whose package is missing)."""
    names = trackers(cfg)
    if names and names != ["all"] and (missing := set(names) - {t.name for t in started}):
        log.warning("report_to: %s not installed (pip install %s): not logged to", ", ".join(sorted(missing)),
                    " ".join(sorted(missing)))


def open_trackers(cfg, folder: Path, run_name: str, config: dict) -> list:
    """report_to's trackers for a loop without an Accelerator (pt), built as accelerate's ``init_trackers`` builds
    them; the ones that write files (tensorboard) write under ``folder``. Log with ``t.log(row, step=...)``, close
    with ``t.finish()``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

    from rlhf.config import ConfigError

    if not trackers(cfg):
        return []
    try:
        kinds = filter_trackers(trackers(cfg), str(folder))
    except ValueError as e:
        raise ConfigError(f"report_to {cfg.report_to}: {e}") from None
    started = []
    for kind in kinds:
        cls = LOGGER_TYPE_TO_CLASS[str(kind)]
        started.append(cls(run_name, str(folder)) if cls.requires_logging_directory else cls(run_name))
        started[-1].start()
        started[-1].store_init_configuration(tracker_config(config))
    check_trackers(cfg, started)
    return started


def train_from(trainer, resume_from: str | None) -> None:
    """``trainer.train``, resumed from ``resume_from``. A checkpoint at the last step (a run killed while saving its
    result) is loaded and not trained on: the HF Trainer would train one step past max_steps."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:  # transformers' default is checkpoints/runs/<date>: the folder root
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # TENSORBOARD_LOGGING_DIR wins
            cb.logging_dir = str(Path(trainer.args.output_dir).parent / TRACKER_DIR)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except TrainingDone:
        log.info("%s is the end of training: nothing left to train", resume_from)


def trainer_kwargs(cfg, work: Path, has_eval: bool) -> dict:
    """TrainingArguments keys from our TrainConfig; checkpoints go to ``work/checkpoints``."""
    import torch

    eval_strategy = "no"
    if has_eval:
        eval_strategy = "steps" if cfg.eval_steps else "epoch"
    return dict(
        output_dir=str(work / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5's name for gradient_checkpointing
        activation_checkpointing_kwargs=({"use_reentrant": cfg.gradient_checkpointing_reentrant}
                                         if cfg.gradient_checkpointing else None),
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=trackers(cfg) or "none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        # HF would log a NaN loss as the mean of the previous ones (log_callback stops on it)
        logging_nan_inf_filter=False,
    )


def log_callback(work: Path):
    """The TrainerCallback of sft and rm: every log row to ``work/train_log.jsonl``, and a stop (DivergedError) at the
    first non-finite gradient (before the optimizer applies it), logged loss or grad norm, or trainable weight; a
    checkpoint with non-finite weights is removed as soon as it is written, so the last good one is finite."""
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        params: list = []

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.params = [p for p in model.parameters() if p.requires_grad]
            if state.global_step:  # resumed: the checkpoint's weights are loaded
                self.check_weights(state, work / "checkpoints" / f"checkpoint-{state.global_step}")
            if state.global_step >= state.max_steps > 0:
                raise TrainingDone()

        # under fp16 the loss scaler skips a step with inf gradients (and lowers its scale): no divergence
        def on_pre_optimizer_step(self, args, state, control, **kw):
            if not args.fp16 and not all_finite([p.grad for p in self.params]):
                raise diverged(work, f"the gradient is not finite at step {state.global_step + 1}")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {}, step=state.global_step, epoch=state.epoch)
            if state.is_world_process_zero:
                with open(work / LOG_FILE, "a") as f:
                    f.write(json.dumps(logs) + "\n")
            for k in ("loss", "eval_loss") if args.fp16 else ("loss", "grad_norm", "eval_loss"):
                if k in logs and not math.isfinite(float(logs[k])):
                    raise diverged(work, f"{k} is {logs[k]} at step {state.global_step}")

        def on_save(self, args, state, control, **kw):
            self.check_weights(state, work / "checkpoints" / f"checkpoint-{state.global_step}")

        def on_train_end(self, args, state, control, **kw):
            self.check_weights(state)

        def check_weights(self, state, ckpt: Path | None = None):
            if not all_finite(self.params):
                if ckpt is not None and state.is_world_process_zero:
                    shutil.rmtree(ckpt, ignore_errors=True)
                raise diverged(work, f"the trainable weights are not finite at step {state.global_step}")

    return Guard()


def read_log(work: Path) -> list[dict]:
    p = Path(work) / LOG_FILE
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


def plot_panels(rows: list[dict], keys: list[str]) -> list[str]:
    """The keys of ``keys`` that appear in ``rows``: one panel each, in that order."""
    return [k for k in keys if any(k in r for r in rows)]


def plot_curves(rows: list[dict], keys: list[str], png: Path, title: str) -> None:
    """One panel per key that appears in ``rows`` (x: step), in a grid of at most 4 columns of 4x3-inch panels (2x2
    for 4 keys, 4x4 for PPO's 13), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = plot_panels(rows, keys)
    if not keys:
        return
    cols = min(4, math.ceil(math.sqrt(len(keys))))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(k, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        ax.ticklabel_format(axis="y", useOffset=False)  # 6.2135, not "+6.213" over 0.0005
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=13)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def loss_summary(rows: list[dict]) -> dict:
    """First and last training loss, last eval loss, from the log."""
    train = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    out = {}
    if train:
        out.update(train_loss_first=train[0], train_loss_last=train[-1])
    if evals:
        out.update(eval_loss_first=evals[0], eval_loss=evals[-1])
    return out


def load_train_eval(cfg, kind: str) -> tuple[list[dict], list[dict], dict]:
    """Training and held-out examples of the config's datasets, and their fingerprints.

    Held-out: ``eval_dataset`` when given, else ``val_size`` (a share < 1 or a count) split off the
    training rows with the config's seed.
    """
    from rlhf.config import ConfigError
    from rlhf.data import fingerprint, held_out_split, load_examples

    kw = dict(kind=kind, registry_file=cfg.registry_file, num_samples=cfg.num_samples,
              skip_invalid=cfg.skip_invalid_rows, seed=cfg.seed)
    train = load_examples(cfg.dataset, **kw)
    evals = load_examples(cfg.eval_dataset, **kw) if cfg.eval_dataset else []
    if not cfg.eval_dataset and cfg.val_size > 0:
        held, rest = held_out_split(len(train), cfg.val_size, cfg.seed)
        if not held or not rest:
            raise ConfigError(f"val_size {cfg.val_size} leaves no training or no eval rows out of {len(train)}; "
                              "give a share in (0, 1) or a smaller count")
        held = set(held)
        evals = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    prints = fingerprint(cfg.dataset + cfg.eval_dataset, cfg.registry_file)
    return train, evals, prints


def dataset_metric(names: list[str], registry_file: str | None) -> str | None:
    """The checkable metric a registry entry declares (``metric:``), if any of ``names`` has one."""
    from rlhf.data import load_registry

    reg = load_registry(registry_file)
    for n in names:
        if isinstance(reg.get(n), dict) and reg[n].get("metric"):
            return reg[n]["metric"]
    return None
