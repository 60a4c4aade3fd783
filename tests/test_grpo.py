"""GRPO stage: group advantages and the GRPO loss (rlhf/rl.py) against hand-computed values, reward functions
(rlhf/rewards.py), and `rlhf grpo` end to end on tiny parents: a Python reward and the RM folder, resume after
SIGKILL, the NaN stop and bad inputs."""
import math

import pytest
import torch

from rlhf import rl

# ----------------------------------------------------------------------------------------------------------------
# the maths, by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])  # groups of 2: (1, 0), (0, 1), (3, 3)
    # grpo: mean 0.5, unbiased std sqrt(0.5) -> +-0.5 / (0.7071 + 1e-4); equal rewards -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert torch.allclose(rl.group_advantages(r, 2), torch.tensor([a, -a, -a, a, 0.0, 0.0]))
    assert torch.allclose(rl.group_advantages(r, 2, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    # rloo, k = 3: r_i - mean of the other two
    r3 = torch.tensor([1.0, 2.0, 6.0])
    assert torch.allclose(rl.group_advantages(r3, 3, "rloo"), torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    assert torch.allclose(rl.group_advantages(r3, 3, "grpo"),
                          (r3 - 3.0) / (math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2) + 1e-4))
    with pytest.raises(ValueError, match="whole groups"):
        rl.group_advantages(r3, 2)
    with pytest.raises(ValueError, match="k >= 2"):
        rl.group_advantages(r3, 1)


def test_grpo_loss_aggregations_by_hand():
    # two sequences: ratios (1.5, 0.5) with A = 1 (row 0, 2 tokens), ratio 1.1 with A = -1 (row 1, 1 token + pad)
    logp = torch.log(torch.tensor([[1.5, 0.5], [1.1, 7.0]]))
    old, mask, adv = torch.zeros(2, 2), torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, -1.0])
    # per token max(-A r, -A clip(r, 0.8, 1.2)): -1.2, -0.5 ; 1.1 (as in test_ppo's policy loss)
    loss, stats = rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="grpo")
    assert loss.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.1) / 2)  # mean of sequence means
    assert stats["policy_clipfrac"] == pytest.approx(1 / 3)
    assert rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="dapo")[0].item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3)
    assert rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="dr_grpo", max_len=4)[0].item() == pytest.approx(
        (-1.2 - 0.5 + 1.1) / (2 * 4))
    # micro-batches: each row's share of the two-row batch adds up to the batch's loss
    for lt in ("grpo", "dapo", "dr_grpo"):
        whole = rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type=lt, max_len=4)[0]
        parts = sum(rl.grpo_loss(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2, loss_type=lt,
                                 max_len=4, batch_rows=2, batch_tokens=mask.sum())[0] for i in range(2))
        assert parts.item() == pytest.approx(whole.item()), lt
    with pytest.raises(ValueError, match="loss_type"):
        rl.grpo_loss(logp, old, adv, mask, 0.2, loss_type="ppo")


def test_grpo_kl_term_is_k3_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # exp(ref - logp) - (ref - logp) - 1
    loss, stats = rl.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, ref_logp=ref,
                               kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2)  # A = 0: only the KL term
    assert stats["kl"] == pytest.approx(sum(k3) / 2)
    # its gradient: d/dlogp of exp(ref - logp) + logp = 1 - exp(ref - logp), times 0.1 / 2 (token mean)
    x = logp.clone().requires_grad_(True)
    rl.grpo_loss(x, x.detach(), torch.tensor([0.0]), torch.ones(1, 2), 0.2, ref_logp=ref, kl_coef=0.1)[0].backward()
    want = [0.05 * (1 - math.exp(-0.5)), 0.05 * (1 - math.exp(1.0))]
    assert torch.allclose(x.grad, torch.tensor([want]))


def test_on_policy_grpo_gradient_is_the_advantage_weighted_log_prob_gradient():
    """ratio = 1 (old = detached current): the loss's gradient is -A/len per token, the REINFORCE gradient."""
    x = torch.tensor([[-0.3, -0.7, -1.0]], requires_grad=True)
    rl.grpo_loss(x, x.detach(), torch.tensor([2.0]), torch.tensor([[1.0, 1.0, 0.0]]), 0.2)[0].backward()
    assert torch.allclose(x.grad, torch.tensor([[-1.0, -1.0, 0.0]]))
