"""Loss and advantage math of PPO with a per-token KL penalty (stage kind `ppo`), as pure torch
functions on [B, T] tensors whose mask is a prefix of ones per row (tasks/rollout.py's layout).

- `token_rewards`: InstructGPT's reward, ``r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))`` at
  every completion token, plus the sequence score at the last one (the sampled-token KL
  estimate, as in InstructGPT and TRL's PPOTrainer; the logged KL is the exact one).
- `gae`: generalised advantage estimation (Schulman et al. 2016); the state after the last real
  token is terminal. Returns are advantages + values (the critic's regression target).
- `policy_loss`: the clipped surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps))``.
- `value_loss`: ``0.5 max((V - R)^2, (V_clip - R)^2)``, V_clip within ``cliprange_value`` of the
  rollout's values (on one fixed batch this holds every value within that band, by design).

Every loss is a mean over the minibatch's real tokens (TRL's masked_mean), not per sequence.

Run: ``.venv/bin/python -m pytest tests/test_ppo.py -q`` (and the doctests below).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0 when there are none)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked positions; padding stays exactly 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def token_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
    kl_coef: float,
) -> torch.Tensor:
    """InstructGPT's per-token reward [B, T]: -kl_coef * (log pi - log pi_ref) at every token,
    plus the sequence score at the last real token (the mask is a prefix of ones per row).

    >>> m = torch.tensor([[1.0, 1.0, 0.0]])
    >>> token_rewards(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, 0.0]]),
    ...               torch.tensor([3.0]), m, 0.1).tolist()
    [[-0.05000000074505806, 3.0, 0.0]]
    """
    rewards = kl_coef * (ref_logp - logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation; the state after a
    row's last real token is terminal (value 0); padding gets exactly 0.

    >>> a, r = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]),
    ...            torch.ones(1, 2), gamma=1.0, lam=1.0)
    >>> a.tolist(), r.tolist()
    ([[0.5, 0.75]], [[1.0, 1.0]])
    """
    values = values * mask
    steps = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        alive = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_value = values[:, t + 1] * alive if t + 1 < steps else running * 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * alive * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, a token mean; stats: clip fraction and approx. KL to pi_old."""
    ratio = (logp - old_logp).exp()
    plain, clipped = -adv * ratio, -adv * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(plain, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": float(masked_mean((clipped > plain).float(), mask)),
                 "approx_kl": float(0.5 * masked_mean((logp - old_logp) ** 2, mask))}
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clipped - R)^2), a token mean."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    plain_err, clip_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(plain_err, clip_err), mask)
    return loss, {"value_clip_frac": float(masked_mean((clip_err > plain_err).float(), mask))}
