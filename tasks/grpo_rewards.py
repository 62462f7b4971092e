"""The rewards of stage kind `grpo` (tasks/grpo.py): what TRL calls, logs and what it sums up to.

Holds `domain_reward` (the one verifier reward function, dispatching on each row's `domain`),
`history_keys` (TRL's log names -> the names the stage's `history` keeps) and `train_metrics`
(the first and final points of the reward curves, throughput). It is apart from tasks/grpo.py
so the kind module stays its config, plan-time hooks and `run`; tasks/rm_scoring.py
`policy_rewards` adds the reward models' functions beside `domain_reward`. No torch here.

Run: ``.venv/bin/python -m pytest tests/test_stages.py -q -k reward``.
"""

from __future__ import annotations

from typing import Any

from tasks import domains as _domains

# TRL log name -> history name, beside `reward/<domain>` and the reward models' keys.
_LOGGED = {
    "reward": "reward",
    "reward_std": "reward_std",
    "loss": "loss",
    "kl": "kl",
    "frac_reward_zero_std": "frac_zero_std",
    "entropy": "entropy",
    "completions/mean_length": "mean_length",
    "num_tokens": "num_tokens",
}


def domain_reward(
    prompts: list, completions: list, answer: list[str], domain: list[str], **kwargs: Any
) -> list[float]:
    """One reward for every domain: the row's own verifier (also logs the mean per domain).
    TRL logs it as `rewards/domain_reward/...`: the function's name is part of the log keys."""
    rewards = [
        _domains.reward(d, c, a) for c, a, d in zip(completions, answer, domain, strict=True)
    ]
    log_metric = kwargs.get("log_metric")
    if log_metric is not None:
        for name in sorted(set(domain)):
            mine = [r for r, d in zip(rewards, domain, strict=True) if d == name]
            log_metric(f"reward/{name}", sum(mine) / len(mine))
    return rewards


def history_keys(rm_keys: dict[str, str]) -> dict[str, str]:
    """TRL log name -> history name: the usual curves, `reward/<domain>` of every domain, and
    the reward models' `rm_keys` (from tasks/rm_scoring.py `policy_rewards`)."""
    keys = dict(_LOGGED)
    keys.update({f"reward/{d}": f"reward/{d}" for d in _domains.DOMAINS})
    keys.update(rm_keys)
    return keys


def train_metrics(history: list[dict], rm_keys: dict[str, str], steps: int, seconds: float,
                  rows: int) -> dict[str, float]:
    """The stage's `train` metrics: first reward and mean of the last 10, the same for every
    reward model's curve, optimizer steps, seconds, tokens/s and training rows."""
    rewards = [h["reward"] for h in history if "reward" in h]
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0.0)
    tail = rewards[-10:]
    train = {
        "final_reward": sum(tail) / len(tail) if tail else float("nan"),
        "first_reward": rewards[0] if rewards else float("nan"),
        "steps": float(steps),
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "rows": float(rows),
    }
    for name in rm_keys.values():  # first point and mean of the last 10, as for `reward`
        curve = [h[name] for h in history if name in h]
        if curve:
            train[f"first_{name}"], train[f"final_{name}"] = curve[0], sum(curve[-10:]) / len(
                curve[-10:])
    return train
