"""The RL maths on tensors, pure torch (no rlhf imports): masked ops, KL estimators, per-token rewards, GAE,
whitening, the clipped PPO losses, KL control and score normalisation (the PPO recipe is stages/ppo.py); group
advantages (GRPO, RLOO) and the GRPO loss (stages/grpo.py).

Sources: InstructGPT (Ouyang et al. 2022), PPO (Schulman et al. 2017), GAE (Schulman et al. 2016), trl's PPO v2,
and "The N Implementation Details of RLHF with PPO" (Huang et al. 2022/2024; cited below as [N-impl]).

Shapes: (B, R) over response tokens; ``mask`` is 1 on real tokens (up to and including the first stop token), 0
after. Statistics over a batch (whitening, score normalisation) are taken over every process (``all_sum``).
"""
from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes (``t`` itself in a one-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at ``ids``: (B, T, V), (B, T) -> (B, T). A row at a time, so no (B, T, V) log-softmax
    is kept for the backward beside the logits."""
    return torch.stack([row.gather(-1, i[:, None])[:, 0] - row.logsumexp(-1) for row, i in zip(logits, ids)])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of softmax(logits) over the last dim, a row at a time: logsumexp(l) - sum(softmax(l) * l)."""
    return torch.stack([row.logsumexp(-1) - (row.softmax(-1) * row).sum(-1) for row in logits])


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every process (unbiased variance, as trl); entries outside the
    mask become 0."""
    total, n = all_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / n.clamp(min=1)
    var = all_sum(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || ref) estimate on the sampled tokens: k1 = log-ratio; k3 = (r - 1) - log r with
    r = p_ref / p_policy (Schulman, "Approximating KL divergence", 2020)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL on every response token, plus the score on the last real one (InstructGPT
    eq. 2)."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns). The value after the last real
    token is 0 (the episode ends there)."""
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    last, advantages = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def clipped_surrogate(logp, old_logp, advantages, cliprange: float):
    """Per-token clipped surrogate loss max(-A r, -A clip(r, 1 -+ cliprange)) with r = exp(logp - old_logp)
    (Schulman et al. 2017, eq. 7) and whether the clipped term was taken; ``advantages`` broadcast against logp."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.max(unclipped, clipped), clipped > unclipped


def policy_loss(logp, old_logp, advantages, mask, cliprange: float):
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), token mean over the response (trl's PPO v2).

    Returns (loss, stats): clip fraction and approx KL (0.5 * mean log-ratio^2) [N-impl]."""
    per_token, was_clipped = clipped_surrogate(logp, old_logp, advantages, cliprange)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {"policy_clipfrac": masked_mean(was_clipped.float(), mask).item(),
                 "approx_kl": (0.5 * masked_mean((logp - old_logp) ** 2, mask)).item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# Critic-free RL (stages/grpo.py): k samples per prompt, the group's rewards as the baseline.


def group_advantages(rewards: torch.Tensor, k: int, estimator: str = "grpo", scale: bool = True) -> torch.Tensor:
    """One advantage per sample; rows are groups of ``k`` consecutive samples of one prompt.

    grpo: (r - mean of the group) / (std of the group + 1e-4), unbiased std (DeepSeekMath, Shao et al. 2024, sec.
    4.1.2; trl's GRPOTrainer); ``scale`` False keeps r - mean (Dr. GRPO, Liu et al. 2025: the std favours groups
    that are nearly all right or all wrong). rloo: r minus the mean of the other k - 1 samples of the group
    (Ahmadian et al. 2024; Kool et al. 2019), i.e. k / (k - 1) * (r - mean)."""
    if k < 2:
        raise ValueError(f"group advantages need k >= 2 samples per prompt, got {k}")
    if len(rewards) % k:
        raise ValueError(f"{len(rewards)} rewards are not whole groups of {k}")
    groups = rewards.view(-1, k)
    mean = groups.mean(1, keepdim=True)
    if estimator == "rloo":
        adv = (groups * k - groups.sum(1, keepdim=True)) / (k - 1)  # r_i - (sum - r_i) / (k - 1)
    elif estimator == "grpo":
        adv = groups - mean
        if scale:
            adv = adv / (groups.std(1, keepdim=True) + 1e-4)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r} (grpo, rloo)")
    return adv.reshape(-1)


def grpo_loss(logp, old_logp, advantages, mask, cliprange: float, *, ref_logp=None, kl_coef: float = 0.0,
              loss_type: str = "grpo", max_len: int | None = None, batch_rows: int | None = None,
              batch_tokens: float | None = None):
    """The GRPO objective on a (micro-)batch: per-token clipped surrogate with the sequence's advantage, plus
    kl_coef * the k3 estimate of KL(policy || ref) per token (DeepSeekMath eq. 3-4; it is unbiased and never
    negative), aggregated by ``loss_type``:

    grpo: mean over sequences of each one's token mean (Shao et al. 2024); dapo: sum over tokens / tokens of the
    batch (Yu et al. 2025: long responses weigh by their length); dr_grpo: sum / (rows x max_len) (Liu et al. 2025).

    With micro-batches, ``batch_rows`` and ``batch_tokens`` are the rows and response tokens of the whole batch
    whose loss this one is a share of (default: this micro-batch), so the shares add up to the batch's loss.
    Returns (loss, stats): clip fraction, approx KL to the rollout policy, mean per-token KL to the reference."""
    per_token, was_clipped = clipped_surrogate(logp, old_logp, advantages[:, None], cliprange)
    kl = None
    if ref_logp is not None and kl_coef:
        kl = kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + kl_coef * kl
    rows = batch_rows or len(logp)
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / rows
    elif loss_type == "dapo":
        loss = masked.sum() / (batch_tokens if batch_tokens is not None else mask.sum().clamp(min=1))
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (rows * (max_len or mask.shape[1]))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (grpo, dapo, dr_grpo)")
    with torch.no_grad():
        stats = {"policy_clipfrac": masked_mean(was_clipped.float(), mask).item(),
                 "approx_kl": (0.5 * masked_mean((logp - old_logp) ** 2, mask)).item()}
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask).item()
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss [N-impl, "value function loss clipping"]: 0.5 * max((v - R)^2, (v_clip - R)^2), with the
    new value kept within cliprange_value of the rollout's value."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).item()}
    return loss, stats


class KLController:
    """Fixed kl_coef, or adaptive (Ziegler et al. 2019, sec. 2.2): coef *= 1 + clip(KL/target - 1, +-0.2) * n/horizon,
    with n the samples of the step."""

    def __init__(self, value: float, target: float | None = None, horizon: int | None = None):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.value *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class ScoreNormalizer:
    """Running mean/std of every score seen by any process (parallel Welford), then scale or normalize, then clip
    (trl v1's use_score_scaling / use_score_norm / score_clip)."""

    def __init__(self, mode: str = "none", clip: float | None = None):
        self.mode, self.clip = mode, clip
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode != "none":
            stats = torch.tensor([len(scores), scores.sum().item()], dtype=torch.float64, device=scores.device)
            n, total = all_sum(stats).tolist()
            mean = total / n
            m2 = all_sum(((scores.double() - mean) ** 2).sum()).item()
            delta, total = mean - self.mean, self.count + n
            self.mean += delta * n / total
            self.m2 += m2 + delta**2 * self.count * n / total
            self.count = total
            std = math.sqrt(self.m2 / max(self.count - 1, 1)) + 1e-8
            scores = scores / std if self.mode == "scale" else (scores - self.mean) / std
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def shape_scores(raw: torch.Tensor, ended: torch.Tensor, norm: ScoreNormalizer, missing_eos_penalty: float | None):
    """The score PPO optimises: normalised/clipped RM score, minus the penalty for a response with no stop token."""
    scores = norm(raw)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ended).float()
    return scores
