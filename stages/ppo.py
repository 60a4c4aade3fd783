"""`rlhf ppo`: PPO on one (quantized) base that carries every role as a LoRA adapter.

The recipe follows InstructGPT (Ouyang et al. 2022), trl's PPO v2 docs, and "The N Implementation Details
of RLHF with PPO" (Huang et al. 2022/2024; cited below as [N-impl]). One PPO step:

    sample `batch_size` prompts -> generate with `policy` (left padding, sampling, cut after the first stop
    token) -> score the response at its last token with `reward` + score head -> per-token reward
    -kl_coef * (logp_policy - logp_ref), the score added on the last token -> values from `value` -> GAE
    -> whitened advantages -> `ppo_epochs` passes over minibatches of `mini_batch_size`: clipped policy loss
    + vf_coef * clipped value loss -> optimizer step.

Roles on one base (rlhf.roles, base weights stored once): `policy` (trainable, from sft_dir), `ref` (sft_dir,
frozen), `reward` (rm_dir adapter + its score head, frozen), `value` (rm_dir adapter + a copy of its head,
trainable; InstructGPT's critic init), or with value_model=shared a value head on the policy's hidden states.
Steps, save_steps, logging_steps and eval_steps count PPO steps (rollout + update).

Where things are: the losses, KL, rewards and advantages are rlhf/rl.py (pure torch); the roles on one base and
their saving are rlhf/roles.py; sampling is rlhf/generation.py. This file is the recipe: config, setup, rollout,
update, evaluation, checkpoints, then ``run`` (the loop), top to bottom.

Output folder: the policy adapter at the root (``PeftModel.from_pretrained(base, folder)``), ``value/`` (the
critic in the RM folder's format: adapter + head), tokenizer, manifest, ``train_log.jsonl``,
``samples.jsonl``, ``training_curves.png``, ``checkpoints/``.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf import online
from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, opt
from rlhf.online import (average_gradients, chunked, encode_prompts, no_grad, optimizer_for, prompt_order,
                         release_freed_memory)

if TYPE_CHECKING:  # imported where used: `rlhf ppo` checks its config and dataset names before torch loads
    import torch

    from rlhf import rl
    from rlhf.roles import OneBase

log = logging.getLogger("rlhf")

ROLES = ("policy", "ref", "reward", "value")


@dataclass
class PPOConfig(ModelConfig, DataConfig, TrainConfig):
    sft_dir: str = opt("", "SFT stage folder: the policy and the KL reference start from its adapter (and tokenizer).")
    rm_dir: str = opt("", "RM stage folder: its adapter and score head give the reward and initialise the critic.")
    value_model: str = opt("adapter", "Critic: adapter (a trainable `value` adapter + head initialised from the RM, "
                                      "InstructGPT) or shared (a value head on the policy's hidden states).",
                           choices=["adapter", "shared"])
    batch_size: int = opt(16, "Prompts per PPO step (rollout batch per process).")
    mini_batch_size: int = opt(8, "Samples per optimizer step; batch_size / mini_batch_size optimizer steps per PPO "
                                  "epoch.")
    ppo_epochs: int = opt(4, "Passes over each rollout batch.")
    max_prompt_length: int = opt(512, "Prompts longer than this (in tokens, template applied) are skipped.")
    max_new_tokens: int = opt(64, "Longest response (trl's response_length).")
    temperature: float = opt(0.7, "Sampling temperature; log-probs use the same temperature-scaled logits [N-impl].")
    top_k: int = opt(0, "Top-k sampling (0: off). Off by default: log-probs are of the full temperature-scaled "
                        "distribution.")
    top_p: float = opt(1.0, "Nucleus sampling (1.0: off); see top_k.")
    missing_eos_penalty: float | None = opt(None, "Subtract this from the (normalised) score of a response that ends "
                                                  "without a stop token (trl).")
    kl_coef: float = opt(0.05, "Initial coefficient of the per-token KL penalty to the reference (trl's kl_coef).")
    adaptive_kl: bool = opt(False, "Adapt kl_coef towards kl_target (Ziegler et al. 2019).")
    kl_target: float = opt(6.0, "Target KL (nats per response) of the adaptive controller.")
    kl_horizon: int = opt(10000, "Horizon (in samples) of the adaptive controller.")
    kl_estimator: str = opt("k1", "Per-token KL estimator: k1 (log-ratio, trl's default) or k3 (unbiased, never "
                                  "negative).", choices=["k1", "k3"])
    score_norm: str = opt("none", "Score normalisation by running statistics of all scores so far: none, scale "
                                  "(divide by std; trl's use_score_scaling) or normalize (also subtract the mean; "
                                  "use_score_norm).", choices=["none", "scale", "normalize"])
    score_clip: float | None = opt(None, "Clip (normalised) scores to [-score_clip, score_clip].")
    gamma: float = opt(1.0, "Discount factor.")
    lam: float = opt(0.95, "GAE lambda.")
    cliprange: float = opt(0.2, "Policy ratio clip range.")
    cliprange_value: float = opt(0.2, "Value clip range.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    whiten_advantages: bool = opt(True, "Whiten advantages over the rollout's response tokens [N-impl].")
    critic_warmup_steps: int = opt(0, "First PPO steps that train only the critic, so early advantages are not critic "
                                      "noise (OpenRLHF's freezing_actor_steps).")
    sample_every: int = opt(10, "Write prompt/response/score samples to samples.jsonl every N PPO steps (0: never).")
    eval_samples: int = opt(64, "Held-out prompts scored (mean reward and task metric) at the start, every eval_steps "
                                "and at the end (0: off).")
    # TrainConfig fields with a PPO meaning
    learning_rate: float = opt(1.41e-5, "Peak learning rate (trl's PPO default).")
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule over all optimizer steps (linear anneals to 0 "
                                           "[N-impl]).")
    max_steps: int = opt(-1, "PPO steps (-1: num_train_epochs passes over the prompts).")
    num_train_epochs: float = opt(1.0, "Passes over the prompts when max_steps is -1.")
    per_device_train_batch_size: int = opt(4, "Micro-batch of the PPO update; mini_batch_size / "
                                              "per_device_train_batch_size micro-batches accumulate per optimizer "
                                              "step.")
    per_device_eval_batch_size: int = opt(16, "Batch of the no-grad passes (generation, reference, reward, value).")
    gradient_accumulation_steps: int = opt(1, "Not set in PPO: accumulation is mini_batch_size / "
                                              "per_device_train_batch_size.")
    logging_steps: int = opt(1, "Print a log line every N PPO steps (train_log.jsonl has every step).")
    save_steps: int = opt(50, "Write a checkpoint every N PPO steps.")

    def validate(self):
        def bad(key, why):
            raise ConfigError(f"ppo: key '{key}' {why}")

        if self.batch_size % self.mini_batch_size:
            bad("mini_batch_size", f"({self.mini_batch_size}) must divide batch_size ({self.batch_size})")
        if self.mini_batch_size % self.per_device_train_batch_size:
            bad("per_device_train_batch_size", f"({self.per_device_train_batch_size}) must divide mini_batch_size "
                                               f"({self.mini_batch_size})")
        if self.gradient_accumulation_steps != 1:
            bad("gradient_accumulation_steps", "is derived in PPO (mini_batch_size / per_device_train_batch_size); "
                                               "set mini_batch_size instead")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0 (got {self.temperature}); PPO samples its responses")
        for key in ("max_new_tokens", "max_prompt_length", "ppo_epochs", "batch_size"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1 (got {getattr(self, key)})")


# ---------------------------------------------------------------------------------------------------------------
# Setup: the roles on one base, the optimizer, the prompts


def build_roles(cfg: PPOConfig, pad_token_id: int) -> OneBase:
    """The one base with PPO's roles (rlhf.roles); pad_token_id: the RM's (its score token)."""
    from rlhf.loader import AdapterSpec
    from rlhf.roles import OneBase, load_head, load_roles, zero_value_head

    adapters = [AdapterSpec("policy", cfg.sft_dir, trainable=True), AdapterSpec("ref", cfg.sft_dir),
                AdapterSpec("reward", cfg.rm_dir)]
    if cfg.value_model == "adapter":
        adapters.append(AdapterSpec("value", cfg.rm_dir, trainable=True))
    model = load_roles(cfg, adapters)
    reward_head = load_head(cfg.rm_dir, model)
    if cfg.value_model == "adapter":
        value_head = copy.deepcopy(reward_head).requires_grad_(True)  # InstructGPT: critic initialised from the RM
    else:
        value_head = zero_value_head(reward_head)
    shared = cfg.value_model == "shared"
    return OneBase(model, reward_head, value_head, trainable=["policy"] if shared else ["policy", "value"],
                   shared_value=shared, temperature=cfg.temperature, pad_token_id=pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# Rollout


@no_grad
def generate(roles: OneBase, prompts: list[list[int]], tokenizer, stop_ids, cfg: PPOConfig, do_sample: bool = True):
    """Sample responses with the policy (rlhf.generation.generate): (ids, attn, response_mask, ended), tokens after
    the first stop token replaced by pad and masked out. The model stays in eval mode for the no-grad passes."""
    from rlhf.generation import generate as sample

    roles.use("policy")
    roles.model.eval()
    return sample(roles.model, prompts, pad_token_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                  max_new_tokens=cfg.max_new_tokens, do_sample=do_sample, temperature=cfg.temperature,
                  top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.per_device_eval_batch_size)


@no_grad
def score_responses(roles: OneBase, ids, attn, cfg: PPOConfig) -> torch.Tensor:
    """Reward-model scores of prompt + response rows (tokens after the stop token are pad)."""
    return chunked(roles.scores, len(ids), cfg.per_device_eval_batch_size, ids, attn).float()


@no_grad
def rollout(roles: OneBase, prompts, tokenizer, stop_ids, cfg: PPOConfig, kl_ctl: rl.KLController,
            score_norm: rl.ScoreNormalizer, step: int):
    """Generate, score, and compute advantages for one batch of prompts: a dict of tensors and stats."""
    import torch

    from rlhf import rl

    ids, attn, mask, ended = generate(roles, prompts, tokenizer, stop_ids, cfg)
    width, n, size = mask.shape[1], len(ids), cfg.per_device_eval_batch_size
    fmask = mask.float()
    logp, ref_logp, values = [], [], []
    for i in range(0, n, size):
        chunk = ids[i : i + size], attn[i : i + size]
        lp, _, v = roles.policy_forward(*chunk, width)  # v: the shared value head, if that is the critic
        logp.append(lp)
        ref_logp.append(roles.policy_forward(*chunk, width, adapter="ref")[0])
        values.append(v if v is not None else roles.values(*chunk, width))
    logp, ref_logp, values = torch.cat(logp), torch.cat(ref_logp), torch.cat(values).float()
    raw_scores = score_responses(roles, ids, attn, cfg)
    if not torch.isfinite(raw_scores).all():
        raise FloatingPointError(f"the reward model returned {raw_scores[~torch.isfinite(raw_scores)][0].item()} at "
                                 f"PPO step {step}")
    scores = rl.shape_scores(raw_scores, ended, score_norm, cfg.missing_eos_penalty)
    kl = rl.kl_penalty(logp, ref_logp, cfg.kl_estimator) * fmask
    rewards = rl.token_rewards(kl, scores, fmask, kl_ctl.value)
    advantages, returns = rl.gae(rewards, values, fmask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = rl.masked_whiten(advantages, fmask)
    lengths = mask.sum(1).float()
    # the score's std over every process's responses (the other statistics are means, averaged over processes)
    s = rl.all_sum(torch.stack([torch.tensor(float(n), dtype=torch.float64, device=raw_scores.device),
                             raw_scores.double().sum(), (raw_scores.double() ** 2).sum()]))
    n_all, total, squares = s.tolist()
    score_std = math.sqrt(max(squares - total**2 / n_all, 0.0) / (n_all - 1)) if n_all > 1 else 0.0
    stats = {
        "score_mean": raw_scores.mean().item(), "score_std": score_std,
        "kl": kl.sum(1).mean().item(), "non_score_reward": (rewards.sum(1) - scores).mean().item(),
        "response_length": lengths.mean().item(), "eos_share": ended.float().mean().item(),
        "value_mean": rl.masked_mean(values, fmask).item(), "return_mean": rl.masked_mean(returns, fmask).item(),
        "kl_coef": kl_ctl.value,
    }
    batch = {"ids": ids, "attn": attn, "mask": fmask, "logp": logp, "values": values * fmask, "advantages": advantages,
             "returns": returns}
    return batch, stats, raw_scores


# ---------------------------------------------------------------------------------------------------------------
# Update: PPO epochs over minibatches; the loss is policy_loss + vf_coef * value_loss (rlhf/rl.py).


def ppo_update(roles: OneBase, batch: dict, cfg: PPOConfig, optimizer, scheduler, accelerator, params,
               train_policy: bool = True) -> dict:
    import torch

    from rlhf import rl

    n, width = len(batch["ids"]), batch["mask"].shape[1]
    micro = cfg.per_device_train_batch_size
    device = batch["ids"].device
    roles.model.train()  # dropout is off (roles.load_roles); train mode only enables gradient checkpointing
    release_freed_memory(device)  # what the rollout's passes freed, before the update's peak (CPU; docs/dpo_grpo.md)
    sums: dict[str, list[float]] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n)
        for start in range(0, n, cfg.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            for m0 in range(start, start + cfg.mini_batch_size, micro):
                mb = {k: v[order[m0 : m0 + micro]] for k, v in batch.items()}
                share = micro / cfg.mini_batch_size  # gradient accumulation
                # Each role's loss is backpropagated right after its forward: with gradient checkpointing the
                # recomputation must run with the same adapter active.
                with torch.set_grad_enabled(train_policy or roles.shared_value):
                    logp, ent, shared_values = roles.policy_forward(mb["ids"], mb["attn"], width, entropy=True,
                                                                    detach_hidden=not train_policy)
                pg, stats = rl.policy_loss(logp.float(), mb["logp"], mb["advantages"], mb["mask"], cfg.cliprange)
                if shared_values is not None:  # one graph: loss = pg + vf_coef * vf
                    vf, vstats = rl.value_loss(shared_values.float(), mb["values"], mb["returns"], mb["mask"],
                                               cfg.cliprange_value)
                    accelerator.backward(((pg if train_policy else 0.0) + cfg.vf_coef * vf) * share)
                else:  # two adapters, two graphs: the same gradients as one backward of pg + vf_coef * vf
                    if train_policy:
                        accelerator.backward(pg * share)
                    values = roles.values(mb["ids"], mb["attn"], width)
                    vf, vstats = rl.value_loss(values.float(), mb["values"], mb["returns"], mb["mask"],
                                               cfg.cliprange_value)
                    accelerator.backward(cfg.vf_coef * vf * share)
                release_freed_memory(device)  # else each micro-batch's activations can add to the peak RSS (CPU)
                stats.update(vstats, policy_loss=pg.item(), value_loss=vf.item(),
                             entropy=rl.masked_mean(ent, mb["mask"]).item())
                for k, v in stats.items():
                    sums.setdefault(k, []).append(v)
            if accelerator.num_processes > 1:  # data parallel: average gradients (the model is not DDP-wrapped)
                average_gradients(params, accelerator)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            sums.setdefault("grad_norm", []).append(float(grad_norm))
            optimizer.step()
            scheduler.step()
    return {k: sum(v) / len(v) for k, v in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# The curves (held-out evaluation: rlhf.evaluate.policy_eval)


# the panels of training_curves.png (those in the log): reward and its cost, then what the update did
PLOT_KEYS = ["score_mean", "kl", "task_metric", "pref_metric", "eval_reward", "eval_task_metric",
             "eval_task_metric_greedy", "eval_pref_metric_greedy", "eos_share", "response_length",
             "policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approx_kl", "entropy"]


def plot(rows: list[dict], png: Path) -> None:
    from rlhf.train_utils import plot_curves

    plot_curves(rows, PLOT_KEYS, png, "ppo")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (the saved roles: rlhf/roles.py)


def save_checkpoint(work: Path, step: int, roles: OneBase, optimizer, scheduler, kl_ctl, score_norm, limit: int | None,
                    accelerator) -> None:
    """checkpoint-N (rlhf.online.save_checkpoint: complete or absent, weights-only): policy and value, optimizer,
    scheduler, KL controller, score statistics, step, and each process's RNG states."""
    from rlhf.roles import save_adapter, save_value

    def weights(folder: Path):
        save_adapter(roles.model, "policy", folder / "policy")
        save_value(roles, folder / "value")

    online.save_checkpoint(work, step, weights, optimizer, scheduler,
                           {"kl_ctl": kl_ctl.state_dict(), "score_norm": score_norm.state_dict()}, limit, accelerator)


def load_checkpoint(ckpt: Path, roles: OneBase, optimizer, scheduler, kl_ctl, score_norm, rank: int = 0) -> int:
    from rlhf.loader import load_adapter_weights
    from rlhf.roles import load_value

    load_adapter_weights(roles.model, "policy", ckpt / "policy")
    load_value(roles, ckpt / "value")
    state = online.load_checkpoint(ckpt, optimizer, scheduler, rank)
    kl_ctl.load_state_dict(state["kl_ctl"])
    score_norm.load_state_dict(state["score_norm"])
    return state["step"]


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def run(cfg: PPOConfig) -> str:
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlhf import rl
    from rlhf.config import to_dict
    from rlhf.evaluate import metrics_fn, policy_eval
    from rlhf.generation import decode
    from rlhf.loader import inherit_quantization, load_tokenizer
    from rlhf.manifest import check_parent, prepare_output
    from rlhf.roles import save_adapter, save_value
    from rlhf.stage_folder import POLICY_ADAPTERS
    from rlhf.templates import apply_template, stop_token_ids
    from rlhf.train_utils import LOG_FILE, dataset_metric, diverged, load_train_eval, resume_point

    started, requested = time.time(), to_dict(cfg)  # requested: the config as given (rlhf pipeline compares it)
    # --- parents: a policy folder (sft, or a dpo/grpo/ppo run to go on from) and an RM on the same base
    # model_name_or_path, when set, is the parents' base in another place (moved folders): fingerprints must match
    flag = "model_name_or_path (--model-name-or-path)"
    sft = check_parent(cfg.sft_dir, POLICY_ADAPTERS, for_stage="rlhf ppo", base_model=cfg.model_name_or_path or None,
                       base_option=flag)
    inherit_quantization(cfg, sft, cfg.sft_dir)
    cfg.model_name_or_path = cfg.model_name_or_path or sft["base_model"]["path"]
    rm = check_parent(cfg.rm_dir, "rm", for_stage="rlhf ppo", base_model=cfg.model_name_or_path, base_option=flag)
    for folder, m in ((cfg.sft_dir, sft), (cfg.rm_dir, rm)):
        if m["config"].get("finetuning_type", "lora") != "lora" or cfg.finetuning_type != "lora":
            raise ConfigError(f"rlhf ppo puts every role on one base as a LoRA adapter, but {folder} was trained with "
                              f"finetuning_type={m['config'].get('finetuning_type')} (ppo config: "
                              f"{cfg.finetuning_type}); "
                              "train SFT and RM with finetuning_type: lora")
    accelerator = online.accelerator_for(cfg)  # report_to's trackers write under <output_dir>/runs

    # --- data (checked before the working folder is made)
    tokenizer = load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    cfg.template = apply_template(tokenizer, sft["config"].get("template", "auto") if cfg.template == "auto"
                                  else cfg.template)
    stop_ids = stop_token_ids(tokenizer)
    rm_pad = load_tokenizer(cfg.rm_dir, cfg.trust_remote_code).pad_token_id
    if rm_pad != tokenizer.pad_token_id:  # the reward is read at the rightmost non-pad token (rlhf.scoring)
        raise ConfigError(f"ppo: the RM folder {cfg.rm_dir} pads with token id {rm_pad}, the SFT folder {cfg.sft_dir} "
                          "with "
                          f"{tokenizer.pad_token_id}: train the RM from this SFT folder (rlhf rm --sft-dir "
                          f"{cfg.sft_dir})")
    train, evals, fingerprints = load_train_eval(cfg, kind="prompt")
    prompts, train_rows = encode_prompts(tokenizer, train, cfg.max_prompt_length, "dataset " + ",".join(cfg.dataset))
    eval_prompts, eval_rows = encode_prompts(tokenizer, evals[: cfg.eval_samples], cfg.max_prompt_length,
                                             "eval_dataset")
    metric = dataset_metric(cfg.eval_dataset or cfg.dataset, cfg.registry_file) if eval_rows else None
    train_metric = metrics_fn(dataset_metric(cfg.dataset, cfg.registry_file))  # on the rollouts: reward-hacking alarm
    eval_metas = [e["meta"] for e in eval_rows]
    per_step = cfg.batch_size * accelerator.num_processes
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(len(prompts) * cfg.num_train_epochs / per_step)
    log.info("ppo: %d prompts, %d held-out, %d PPO steps of %d prompts x %d processes, template %s", len(prompts),
             len(eval_prompts), total_steps, cfg.batch_size, accelerator.num_processes, cfg.template)
    new_optimizer = optimizer_for(cfg)
    work = prepare_output(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, requested=requested)

    # --- model: one base, four roles
    roles = build_roles(cfg, tokenizer.pad_token_id)
    roles.autocast = accelerator.autocast
    params = roles.params
    optimizer = accelerator.prepare(new_optimizer(params))
    updates = total_steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * updates)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=updates)
    kl_ctl = rl.KLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    score_norm = rl.ScoreNormalizer(cfg.score_norm, cfg.score_clip)
    step, metrics = 0, {}
    if ckpt := resume_point(work, cfg.resume, logs=(LOG_FILE, "samples.jsonl")):
        step = load_checkpoint(Path(ckpt), roles, optimizer, scheduler, kl_ctl, score_norm, accelerator.process_index)
    main = accelerator.is_main_process

    run_log = online.RunLog(work, cfg, accelerator)  # the trackers get the train_log.jsonl rows, same names

    def run_eval(tag: str) -> dict:
        if not eval_prompts:
            return {}
        res = policy_eval(lambda p, sample: generate(roles, p, tokenizer, stop_ids, cfg, do_sample=sample),
                          eval_prompts, eval_metas, tokenizer, metric, seed=cfg.seed,
                          score=lambda ids, attn: score_responses(roles, ids, attn, cfg), accelerator=accelerator)
        run_log.write({"step": step, **res})
        log.info("ppo eval (%s, step %d): %s", tag, step, {k: round(v, 4) for k, v in res.items()})
        return res

    def save(at: int):
        save_checkpoint(work, at, roles, optimizer, scheduler, kl_ctl, score_norm, cfg.save_total_limit, accelerator)

    # a resumed run's start-of-run evaluation is in the log
    metrics.update({f"{k}_before": v for k, v in run_eval("start").items()} if step == 0 else run_log.start_eval())

    # --- loop
    bar = tqdm(total=total_steps, initial=step, desc="ppo", disable=not main)
    last_saved = step
    while step < total_steps:
        t0 = time.time()
        idx = prompt_order(step, len(prompts), cfg.batch_size, cfg.seed, accelerator.process_index,
                           accelerator.num_processes)
        try:
            batch, stats, scores = rollout(roles, [prompts[i] for i in idx], tokenizer, stop_ids, cfg, kl_ctl,
                                           score_norm, step + 1)
            t1 = time.time()
            texts = decode(tokenizer, batch["ids"][:, -batch["mask"].shape[1] :], batch["mask"])
            if train_metric:
                stats.update(train_metric([train_rows[i]["meta"] for i in idx], texts))
            stats.update(ppo_update(roles, batch, cfg, optimizer, scheduler, accelerator, params,
                                    train_policy=step >= cfg.critic_warmup_steps))
            step += 1
            stats = online.step_stats(stats, params, accelerator, step, "PPO")
        except FloatingPointError as e:
            raise diverged(work, str(e)) from None
        kl_ctl.update(stats["kl"], cfg.batch_size * accelerator.num_processes)
        t2 = time.time()
        stats.update(step=step, lr=scheduler.get_last_lr()[0], time_rollout=t1 - t0, time_update=t2 - t1,
                     tokens_per_s=batch["mask"].sum().item() / (t2 - t0))
        run_log.write(stats)
        bar.update(1)
        bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.3f}", eos=f"{stats['eos_share']:.2f}")
        if step % cfg.logging_steps == 0 and main:
            log.info("ppo step %d: %s", step, {k: round(v, 4) for k, v in stats.items() if k != "step"})
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            for i in range(min(4, len(idx))):
                run_log.write({"step": step, "prompt": tokenizer.decode(prompts[idx[i]]), "response": texts[i],
                               "score": scores[i].item()}, samples=True)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            run_eval(f"step {step}")
        if step % cfg.save_steps == 0:
            save(step)
            last_saved = step
    bar.close()

    # --- save: the policy at the folder root, the critic in value/
    def save_policy(folder: Path):
        save_adapter(roles.model, "policy", folder)
        save_value(roles, folder / "value")

    state = {"kl_ctl": kl_ctl.state_dict(), "score_norm": score_norm.state_dict()}
    return online.finish_run(cfg, run_log, step=step, last_saved=last_saved, params=params, run_eval=run_eval,
                             save=save, save_policy=save_policy, tokenizer=tokenizer, metrics=metrics, reward="score",
                             state=state, plot=plot, datasets=fingerprints, started=started)
