"""`rlhf grpo`: critic-free online RL (GRPO, RLOO) on one (quantized) base that carries every role as a LoRA adapter.

The recipe follows DeepSeekMath (Shao et al. 2024, GRPO), RLOO (Ahmadian et al. 2024) and trl's GRPOTrainer.
One GRPO step:

    sample `batch_size` prompts -> `num_generations` responses each from `policy` (left padding, sampling, cut
    after the first stop token) -> reward of each response: the weighted sum of the RM folder's score (`reward`
    adapter + score head, at the score token) and the Python reward functions of `reward_funcs` -> group-relative
    advantages (grpo: (r - mean) / std of the prompt's group; rloo: r - mean of the others) -> `num_iterations`
    passes over minibatches of `mini_batch_size` responses: clipped surrogate + kl_coef * k3 KL to `ref` per token
    (rlhf.rl.grpo_loss) -> optimizer step.

Roles on one base (rlhf.roles, base weights stored once): `policy` (trainable, from sft_dir), `ref` (sft_dir,
frozen; not loaded with kl_coef 0), `reward` (rm_dir adapter + its score head, frozen; only with rm_dir). No critic.
Steps, save_steps, logging_steps and eval_steps count GRPO steps (rollout + update).

Where things are: the advantages and the loss are rlhf/rl.py, the Python reward functions rlhf/rewards.py, the
roles rlhf/roles.py, sampling rlhf/generation.py, prompts, optimizer and checkpoints rlhf/online.py (shared with
PPO), the held-out evaluation rlhf/evaluate.py (policy_eval).

Output folder: the policy adapter at the root (``PeftModel.from_pretrained(base, folder)``), tokenizer, manifest,
``train_log.jsonl``, ``samples.jsonl``, ``training_curves.png``, ``checkpoints/``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf import online
from rlhf.config import ConfigError, DataConfig, ModelConfig, TrainConfig, opt

if TYPE_CHECKING:  # imported where used: `rlhf grpo` checks its config and dataset names before torch loads
    import torch

    from rlhf.roles import OneBase

log = logging.getLogger("rlhf")

@dataclass
class GRPOConfig(ModelConfig, DataConfig, TrainConfig):
    sft_dir: str = opt("", "Policy folder to start from (rlhf sft, or dpo/grpo/ppo): the policy and the KL reference "
                           "start from its adapter (and tokenizer).")
    rm_dir: str = opt("", "RM stage folder (optional): its adapter and score head, on the same base, give a reward.")
    reward_funcs: list[str] = opt([], "Python reward functions, module:function, called as fn(prompts, completions, "
                                      "**dataset columns) -> list of floats (rlhf/rewards.py; e.g. "
                                      "rlhf.rewards:demo_task).")
    reward_weights: list[float] = opt([], "Weight of each reward: the RM's first (with rm_dir), then reward_funcs' "
                                          "in order; empty: 1.0 each.")
    num_generations: int = opt(8, "Responses sampled per prompt (the group, k).")
    batch_size: int = opt(4, "Prompts per GRPO step (per process): batch_size x num_generations responses.")
    mini_batch_size: int = opt(0, "Responses per optimizer step (0: all of the step's); must divide them.")
    num_iterations: int = opt(1, "Passes over each step's responses (trl's num_iterations; 1: on-policy, ratio 1).")
    advantage_estimator: str = opt("grpo", "grpo (reward minus the group's mean, over its std) or rloo (minus the "
                                           "mean of the other k-1 samples).", choices=["grpo", "rloo"])
    scale_rewards: bool = opt(True, "grpo: divide by the group's std (False: Dr. GRPO, Liu et al. 2025).")
    loss_type: str = opt("grpo", "Loss aggregation: grpo (mean of each response's token mean), dapo (token mean over "
                                 "the batch), dr_grpo (token sum / (responses x max_new_tokens)).",
                         choices=["grpo", "dapo", "dr_grpo"])
    kl_coef: float = opt(0.04, "Weight of the per-token KL (k3) to the frozen SFT adapter (trl's beta; 0: no "
                               "reference is loaded).")
    cliprange: float = opt(0.2, "Policy ratio clip range (trl's epsilon).")
    max_prompt_length: int = opt(512, "Prompts longer than this (in tokens, template applied) are skipped.")
    max_new_tokens: int = opt(64, "Longest response (trl's max_completion_length).")
    temperature: float = opt(1.0, "Sampling temperature; log-probs use the same temperature-scaled logits.")
    top_k: int = opt(0, "Top-k sampling (0: off).")
    top_p: float = opt(1.0, "Nucleus sampling (1.0: off).")
    missing_eos_penalty: float | None = opt(None, "Subtract this from the reward of a response that ends without a "
                                                  "stop token.")
    sample_every: int = opt(10, "Write prompt/response/reward samples to samples.jsonl every N steps (0: never).")
    eval_samples: int = opt(64, "Held-out prompts evaluated (reward, task metric; sampled and greedy) at the start, "
                                "every eval_steps and at the end (0: off).")
    # TrainConfig fields with a GRPO meaning
    learning_rate: float = opt(1e-5, "Peak learning rate.")
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule over all optimizer steps.")
    max_steps: int = opt(-1, "GRPO steps (-1: num_train_epochs passes over the prompts).")
    per_device_train_batch_size: int = opt(8, "Micro-batch (responses) of the update; mini_batch_size / "
                                              "per_device_train_batch_size micro-batches accumulate per optimizer "
                                              "step.")
    per_device_eval_batch_size: int = opt(16, "Batch of the no-grad passes (generation, reference, reward).")
    gradient_accumulation_steps: int = opt(1, "Not set in GRPO: accumulation is mini_batch_size / "
                                              "per_device_train_batch_size.")
    logging_steps: int = opt(1, "Print a log line every N steps (train_log.jsonl has every step).")
    save_steps: int = opt(50, "Write a checkpoint every N steps.")

    @property
    def rollout_size(self) -> int:
        return self.batch_size * self.num_generations

    def validate(self):
        def bad(key, why):
            raise ConfigError(f"grpo: key '{key}' {why}")

        if self.num_generations < 2:
            bad("num_generations", f"must be >= 2 (got {self.num_generations}): the group is the baseline")
        for key in ("batch_size", "num_iterations", "max_new_tokens", "max_prompt_length"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1 (got {getattr(self, key)})")
        mini = self.mini_batch_size or self.rollout_size
        if self.rollout_size % mini:
            bad("mini_batch_size", f"({mini}) must divide batch_size x num_generations ({self.rollout_size})")
        if mini % min(self.per_device_train_batch_size, mini):
            bad("per_device_train_batch_size", f"({self.per_device_train_batch_size}) must divide mini_batch_size "
                                               f"({mini})")
        if self.gradient_accumulation_steps != 1:
            bad("gradient_accumulation_steps", "is derived in GRPO (mini_batch_size / per_device_train_batch_size); "
                                               "set mini_batch_size instead")
        if self.temperature <= 0:
            bad("temperature", f"must be > 0 (got {self.temperature}); GRPO samples its responses")
        if self.kl_coef < 0:
            bad("kl_coef", f"must be >= 0 (got {self.kl_coef})")
        if not self.rm_dir and not self.reward_funcs:
            bad("reward_funcs", "is empty and no rm_dir is given: name a reward (an RM folder, or Python functions "
                                "module:function such as rlhf.rewards:demo_task)")
        n = bool(self.rm_dir) + len(self.reward_funcs)
        if self.reward_weights and len(self.reward_weights) != n:
            bad("reward_weights", f"has {len(self.reward_weights)} weights for {n} rewards (the RM's first, then "
                                  "reward_funcs'); give one per reward or none")


# ---------------------------------------------------------------------------------------------------------------
# Setup: the roles on one base, the rewards


def build_roles(cfg: GRPOConfig, pad_token_id: int) -> OneBase:
    """The one base with GRPO's roles (rlhf.roles): policy, and ref (kl_coef > 0) and reward (rm_dir) if used."""
    from rlhf.loader import AdapterSpec
    from rlhf.roles import OneBase, load_head, load_roles

    adapters = [AdapterSpec("policy", cfg.sft_dir, trainable=True)]
    if cfg.kl_coef:
        adapters.append(AdapterSpec("ref", cfg.sft_dir))
    if cfg.rm_dir:
        adapters.append(AdapterSpec("reward", cfg.rm_dir))
    model = load_roles(cfg, adapters)
    reward_head = load_head(cfg.rm_dir, model) if cfg.rm_dir else None
    return OneBase(model, reward_head, None, trainable=["policy"], temperature=cfg.temperature,
                   pad_token_id=pad_token_id)


def reward_sources(cfg: GRPOConfig) -> list[tuple[str, float, object]]:
    """(name, weight, reward function) of each reward: ``rm`` (the RM folder; function None) first, then the Python
    functions. Names are checked before the working folder is made."""
    from rlhf.rewards import load_reward_function

    names = (["rm"] if cfg.rm_dir else []) + list(cfg.reward_funcs)
    weights = cfg.reward_weights or [1.0] * len(names)
    fns = ([None] if cfg.rm_dir else []) + [load_reward_function(s) for s in cfg.reward_funcs]
    return [(n.rpartition(":")[2], w, f) for n, w, f in zip(names, weights, fns)]


def generate(roles: OneBase, prompts, tokenizer, stop_ids, cfg: GRPOConfig, do_sample: bool = True):
    """Responses of the policy (rlhf.generation.generate): (ids, attn, response_mask, ended)."""
    from rlhf.generation import generate as sample

    roles.use("policy")
    return sample(roles.model, prompts, pad_token_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                  max_new_tokens=cfg.max_new_tokens, do_sample=do_sample, temperature=cfg.temperature,
                  top_k=cfg.top_k, top_p=cfg.top_p, batch_size=cfg.per_device_eval_batch_size)


@online.no_grad
def score_responses(roles: OneBase, ids, attn, cfg: GRPOConfig) -> torch.Tensor:
    """The RM folder's scores of prompt + response rows, at the score token (rlhf.scoring)."""
    return online.chunked(roles.scores, len(ids), cfg.per_device_eval_batch_size, ids, attn).float()


# ---------------------------------------------------------------------------------------------------------------
# Rollout: k responses per prompt, their rewards, group advantages


@online.no_grad
def rollout(roles: OneBase, prompts, rows, tokenizer, stop_ids, cfg: GRPOConfig, sources, step: int):
    """Generate ``num_generations`` responses to each prompt, reward them and compute group advantages: (batch of
    tensors, stats, rewards, texts); rows i*k .. i*k+k-1 answer prompt i."""
    import torch

    from rlhf import rl
    from rlhf.generation import decode

    k = cfg.num_generations
    prompts = [p for p in prompts for _ in range(k)]
    rows = [r for r in rows for _ in range(k)]
    ids, attn, mask, ended = generate(roles, prompts, tokenizer, stop_ids, cfg)
    width, n, size, fmask = mask.shape[1], len(ids), cfg.per_device_eval_batch_size, mask.float()
    batch = {"ids": ids, "attn": attn, "mask": fmask}
    needs_old = cfg.num_iterations > 1 or (cfg.mini_batch_size or n) < n  # else the ratio is 1 (old = current)
    if needs_old:
        batch["logp"] = online.chunked(lambda i, a: roles.policy_forward(i, a, width)[0], n, size, ids, attn)
    if cfg.kl_coef:
        batch["ref_logp"] = online.chunked(lambda i, a: roles.policy_forward(i, a, width, adapter="ref")[0], n, size,
                                           ids, attn)
    texts = decode(tokenizer, ids[:, -width:], mask, ended)
    total, stats = torch.zeros(n, device=ids.device), {}
    for name, weight, fn in sources:
        if fn is None:
            r = score_responses(roles, ids, attn, cfg)
        else:
            columns = [{c: v for c, v in row["meta"].items() if c not in ("file", "row")} for row in rows]
            r = torch.tensor(fn([row["messages"] for row in rows], texts, columns), dtype=torch.float32,
                             device=ids.device)
        if not torch.isfinite(r).all():
            raise FloatingPointError(f"the reward {name} returned {r[~torch.isfinite(r)][0].item()} at GRPO step "
                                     f"{step}")
        stats[f"reward_{name}"] = r.mean().item()
        total += weight * r
    if cfg.missing_eos_penalty is not None:
        total = total - cfg.missing_eos_penalty * (~ended).float()
    batch["advantages"] = rl.group_advantages(total, k, cfg.advantage_estimator, cfg.scale_rewards)
    group_std = total.view(-1, k).std(1)
    stats.update(reward_mean=total.mean().item(), reward_std=total.std().item() if n > 1 else 0.0,
                 reward_group_std=group_std.mean().item(), frac_groups_same=(group_std < 1e-6).float().mean().item(),
                 response_length=mask.sum(1).float().mean().item(), eos_share=ended.float().mean().item())
    return batch, stats, total, texts


# ---------------------------------------------------------------------------------------------------------------
# Update: num_iterations passes over minibatches of the step's responses; the loss is rlhf.rl.grpo_loss.


def grpo_update(roles: OneBase, batch: dict, cfg: GRPOConfig, optimizer, scheduler, accelerator, params) -> dict:
    import torch

    from rlhf import rl
    from rlhf.online import average_gradients, release_freed_memory

    n, width, device = len(batch["ids"]), batch["mask"].shape[1], batch["ids"].device
    mini, micro = cfg.mini_batch_size or n, min(cfg.per_device_train_batch_size, cfg.mini_batch_size or n)
    roles.model.train()  # dropout is off (roles.load_roles); train mode only enables gradient checkpointing
    release_freed_memory(device)  # what the rollout's passes freed, before the update's peak
    sums: dict[str, list[float]] = {}
    for _ in range(cfg.num_iterations):
        order = torch.randperm(n) if cfg.num_iterations > 1 or mini < n else torch.arange(n)
        for start in range(0, n, mini):
            optimizer.zero_grad(set_to_none=True)
            idx = order[start : start + mini]
            tokens = batch["mask"][idx].sum().clamp(min=1)
            for m0 in range(0, mini, micro):
                mb = {k: v[idx[m0 : m0 + micro]] for k, v in batch.items()}
                logp, ent, _ = roles.policy_forward(mb["ids"], mb["attn"], width, entropy=True)
                logp = logp.float()
                old = mb["logp"] if "logp" in mb else logp.detach()
                loss, stats = rl.grpo_loss(logp, old, mb["advantages"], mb["mask"], cfg.cliprange,
                                           ref_logp=mb.get("ref_logp"), kl_coef=cfg.kl_coef, loss_type=cfg.loss_type,
                                           max_len=cfg.max_new_tokens, batch_rows=mini, batch_tokens=tokens)
                accelerator.backward(loss)
                release_freed_memory(device)  # else each micro-batch's activations can add to the peak RSS (CPU)
                stats.update(loss=loss.item() * mini / len(mb["ids"]), entropy=rl.masked_mean(ent, mb["mask"]).item())
                for k, v in stats.items():
                    sums.setdefault(k, []).append(v)
            if accelerator.num_processes > 1:  # data parallel: average gradients (the model is not DDP-wrapped)
                average_gradients(params, accelerator)
            sums.setdefault("grad_norm", []).append(float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)))
            optimizer.step()
            scheduler.step()
    return {k: sum(v) / len(v) for k, v in sums.items()}


# the panels of training_curves.png (those in the log): reward, its parts and its cost, then what the update did
PLOT_KEYS = ["reward_mean", "reward_rm", "task_metric", "kl", "eval_reward", "eval_task_metric",
             "eval_task_metric_greedy", "eos_share", "response_length", "reward_group_std", "loss", "policy_clipfrac",
             "approx_kl", "entropy"]


def plot(rows: list[dict], png: Path, names: list[str]) -> None:
    from rlhf.train_utils import plot_curves

    keys = PLOT_KEYS[:2] + [f"reward_{n}" for n in names if f"reward_{n}" not in PLOT_KEYS] + PLOT_KEYS[2:]
    plot_curves(rows, keys, png, "grpo")


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def run(cfg: GRPOConfig) -> str:
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rlhf.config import to_dict
    from rlhf.evaluate import metric_fn, policy_eval
    from rlhf.loader import inherit_quantization, load_adapter_weights, load_tokenizer
    from rlhf.manifest import check_parent, prepare_output
    from rlhf.roles import save_adapter
    from rlhf.stage_folder import POLICY_ADAPTERS
    from rlhf.templates import apply_template, stop_token_ids
    from rlhf.train_utils import LOG_FILE, dataset_metric, diverged, load_train_eval, resume_point

    started, requested = time.time(), to_dict(cfg)
    # --- parents: a policy folder (and an RM) on the same base
    flag = "model_name_or_path (--model-name-or-path)"
    sft = check_parent(cfg.sft_dir, POLICY_ADAPTERS, for_stage="rlhf grpo", base_model=cfg.model_name_or_path or None,
                       base_option=flag)
    inherit_quantization(cfg, sft, cfg.sft_dir)
    cfg.model_name_or_path = cfg.model_name_or_path or sft["base_model"]["path"]
    parents = [(cfg.sft_dir, sft)]
    if cfg.rm_dir:
        parents.append((cfg.rm_dir, check_parent(cfg.rm_dir, "rm", for_stage="rlhf grpo",
                                                 base_model=cfg.model_name_or_path, base_option=flag)))
    for folder, m in parents:
        if m["config"].get("finetuning_type", "lora") != "lora" or cfg.finetuning_type != "lora":
            raise ConfigError(f"rlhf grpo puts every role on one base as a LoRA adapter, but {folder} was trained "
                              f"with finetuning_type={m['config'].get('finetuning_type')} (grpo config: "
                              f"{cfg.finetuning_type}); train it with finetuning_type: lora")
    sources = reward_sources(cfg)
    accelerator = online.accelerator_for(cfg)

    # --- data (checked before the working folder is made)
    tokenizer = load_tokenizer(cfg.sft_dir, cfg.trust_remote_code)
    cfg.template = apply_template(tokenizer, sft["config"].get("template", "auto") if cfg.template == "auto"
                                  else cfg.template)
    stop_ids = stop_token_ids(tokenizer)
    if cfg.rm_dir and (rm_pad := load_tokenizer(cfg.rm_dir, cfg.trust_remote_code).pad_token_id) != \
            tokenizer.pad_token_id:  # the reward is read at the rightmost non-pad token (rlhf.scoring)
        raise ConfigError(f"grpo: the RM folder {cfg.rm_dir} pads with token id {rm_pad}, the policy folder "
                          f"{cfg.sft_dir} with {tokenizer.pad_token_id}: train the RM from this SFT folder")
    train, evals, fingerprints = load_train_eval(cfg, kind="prompt")
    what = "dataset " + ",".join(cfg.dataset)
    prompts, train_rows = online.encode_prompts(tokenizer, train, cfg.max_prompt_length, what, "grpo")
    eval_prompts, eval_rows = online.encode_prompts(tokenizer, evals[: cfg.eval_samples], cfg.max_prompt_length,
                                                    "eval_dataset", "grpo")
    metric = dataset_metric(cfg.eval_dataset or cfg.dataset, cfg.registry_file) if eval_rows else None
    train_metric = metric_fn(dataset_metric(cfg.dataset, cfg.registry_file))
    per_step = cfg.batch_size * accelerator.num_processes
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(len(prompts) * cfg.num_train_epochs / per_step)
    log.info("grpo: %d prompts, %d held-out, %d steps of %d prompts x %d responses x %d processes, rewards %s, "
             "template %s", len(prompts), len(eval_prompts), total_steps, cfg.batch_size, cfg.num_generations,
             accelerator.num_processes, ", ".join(f"{n} x {w}" for n, w, _ in sources), cfg.template)
    new_optimizer = online.optimizer_for(cfg)
    work = prepare_output(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir, requested=requested)

    # --- model: one base, its roles
    roles = build_roles(cfg, tokenizer.pad_token_id)
    roles.autocast = accelerator.autocast
    params = roles.params
    optimizer = accelerator.prepare(new_optimizer(params))
    mini = cfg.mini_batch_size or cfg.rollout_size
    updates = total_steps * cfg.num_iterations * (cfg.rollout_size // mini)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * updates)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=updates)
    step, metrics = 0, {}
    if ckpt := resume_point(work, cfg.resume, logs=(LOG_FILE, "samples.jsonl")):
        load_adapter_weights(roles.model, "policy", Path(ckpt) / "policy")
        step = online.load_checkpoint(Path(ckpt), optimizer, scheduler, accelerator.process_index)["step"]
    main = accelerator.is_main_process
    run_log = online.RunLog(work, cfg, accelerator)

    def run_eval(tag: str) -> dict:
        if not eval_prompts:
            return {}
        res = policy_eval(lambda p, sample: generate(roles, p, tokenizer, stop_ids, cfg, do_sample=sample),
                          eval_prompts, [e["meta"] for e in eval_rows], tokenizer, metric, seed=cfg.seed,
                          score=(lambda ids, attn: score_responses(roles, ids, attn, cfg)) if cfg.rm_dir else None,
                          accelerator=accelerator)
        run_log.write({"step": step, **res})
        log.info("grpo eval (%s, step %d): %s", tag, step, {k: round(v, 4) for k, v in res.items()})
        return res

    def save(at: int):
        online.save_checkpoint(work, at, lambda folder: save_adapter(roles.model, "policy", folder / "policy"),
                               optimizer, scheduler, {}, cfg.save_total_limit, accelerator)

    metrics.update({f"{k}_before": v for k, v in run_eval("start").items()} if step == 0 else run_log.start_eval())

    # --- loop
    bar = tqdm(total=total_steps, initial=step, desc="grpo", disable=not main)
    last_saved = step
    while step < total_steps:
        t0 = time.time()
        idx = online.prompt_order(step, len(prompts), cfg.batch_size, cfg.seed, accelerator.process_index,
                                  accelerator.num_processes)
        rows = [train_rows[i] for i in idx]
        try:
            batch, stats, rewards, texts = rollout(roles, [prompts[i] for i in idx], rows, tokenizer, stop_ids, cfg,
                                                   sources, step + 1)
            t1 = time.time()
            if train_metric:
                stats["task_metric"] = float(train_metric([r["meta"] for r in rows for _ in
                                                           range(cfg.num_generations)], texts))
            stats.update(grpo_update(roles, batch, cfg, optimizer, scheduler, accelerator, params))
            step += 1
            stats = online.step_stats(stats, params, accelerator, step, "GRPO")
        except FloatingPointError as e:
            raise diverged(work, str(e)) from None
        t2 = time.time()
        stats.update(step=step, lr=scheduler.get_last_lr()[0], time_rollout=t1 - t0, time_update=t2 - t1,
                     tokens_per_s=batch["mask"].sum().item() / (t2 - t0))
        run_log.write(stats)
        bar.update(1)
        bar.set_postfix(reward=f"{stats['reward_mean']:.3f}", eos=f"{stats['eos_share']:.2f}")
        if step % cfg.logging_steps == 0 and main:
            log.info("grpo step %d: %s", step, {k: round(v, 4) for k, v in stats.items() if k != "step"})
        if cfg.sample_every and (step % cfg.sample_every == 0 or step == 1):
            for i in range(0, min(4 * cfg.num_generations, len(texts)), cfg.num_generations):
                run_log.write({"step": step, "prompt": tokenizer.decode(prompts[idx[i // cfg.num_generations]]),
                               "response": texts[i], "reward": rewards[i].item()}, samples=True)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            run_eval(f"step {step}")
        if step % cfg.save_steps == 0:
            save(step)
            last_saved = step
    bar.close()

    # --- save: the policy at the folder root
    return online.finish_run(cfg, run_log, step=step, last_saved=last_saved, params=params, run_eval=run_eval,
                             save=save, save_policy=lambda folder: save_adapter(roles.model, "policy", folder),
                             tokenizer=tokenizer, metrics=metrics, reward="reward", state={},
                             plot=lambda rows, png: plot(rows, png, [n for n, _, _ in sources]),
                             datasets=fingerprints, started=started)
