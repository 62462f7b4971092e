"""Loss and advantage math of multi-teacher on-policy distillation (MOPD), as pure torch functions.

The student samples a completion y for a prompt; the teacher routed to that prompt only scores y.
Per completion token t (MiMo-V2-Flash Eq. 7-8, NeMo-RL ``opd.py``, verl ``opd.md``):

    A_t = stopgrad(log p_T(y_t|s_t) - log p_old(y_t|s_t)) [+ orm_weight * centered outcome reward]
    w_t = stopgrad(p_theta(y_t|s_t) / p_old(y_t|s_t)) if is_low <= w_t <= is_high else 0
    L   = -sum_t(mask_t * w_t * A_t * log p_theta(y_t|s_t)) / n_tokens          ("sampled_token")

``full_vocab`` minimises the exact per-state reverse KL sum_v p_theta(v)(log p_theta(v) - log
p_T(v)) (weighted by the same gate) instead of its one-sample estimate; ``top_k`` does the same
over the student's k most likely tokens plus one "tail" bin holding the rest of the mass.

Departures from the papers, on purpose:

- No group baseline and one sample per prompt (MiMo): the teacher's log-ratio is already a dense
  per-token signal. The outcome reward, when mixed in, is centered over the whole batch (MiMo
  normalises per group; with one sample per prompt there is no group).
- ``top_k`` keeps a tail bin (k + 1 outcomes) rather than renormalising over the top-k tokens:
  it stays a true KL (>= 0, zero iff the binned distributions agree) and still sees mass that
  the teacher puts outside the student's top-k, which renormalisation would hide.
- Losses are returned as sums over tokens plus token counts, not means, so the trainer can
  compute them one teacher route at a time and still divide by the whole batch's token count.
- log p_old comes from a full forward of the rollout-time student on exactly the chunk the
  teacher scores (verl recomputes it too), not from the sampler's incremental KV-cached logits:
  then student == teacher gives A_t == 0, KL == 0 and zero gradient, bit for bit. With one
  minibatch that forward is the differentiated one itself, so w_t == 1 and the gate only acts
  when ``minibatches`` > 1 (or, later, when an inference engine samples).
- The full / top-k KL terms use a detached log-ratio (`surrogate`): same value and analytic
  gradient, but exact zeros where the autograd of the "+1" term would leave float noise.

The rollout side (sampling, chunking, scoring) is tasks/rollout.py.

Run: ``python -m pytest tests/test_mopd.py -q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ESTIMATORS = ("sampled_token", "full_vocab", "top_k")


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax over the vocabulary at `temperature` (fp32: bf16 log-ratios are too coarse)."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def gather_tokens(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, V] log-probs, [B, T] ids -> [B, T] log-probs of those ids."""
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def reverse_kl_full(
    logp_s: torch.Tensor, logp_t: torch.Tensor, surrogate: bool = False
) -> torch.Tensor:
    """Exact per-state KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)), shape [B, T].

    Terms with p_s(v) == 0 are 0 (not nan) even where the teacher gives -inf. With `surrogate`
    the log-ratio carries no gradient: same value, and the same gradient sum_v grad p_s(v) *
    log-ratio (the "+1" term of the full gradient sums to zero analytically), but without
    relying on float cancellation, so identical student and teacher give exactly zero gradient.
    """
    p_s = logp_s.exp()
    ratio = logp_s - logp_t
    if surrogate:
        ratio = ratio.detach()
    terms = torch.where(p_s > 0, p_s * ratio, torch.zeros_like(p_s))
    return terms.sum(-1)


def reverse_kl_top_k(
    logp_s: torch.Tensor, logp_t: torch.Tensor, k: int, surrogate: bool = False
) -> torch.Tensor:
    """KL(p_s || p_t) over the student's top-k tokens plus one tail bin for the rest, [B, T].

    The top-k set is chosen without gradient (from the student); k >= V is the exact full KL.
    `surrogate` as in `reverse_kl_full` (the k + 1 bins partition the vocabulary, so the
    dropped term again sums to zero).
    """
    vocab = logp_s.shape[-1]
    if k >= vocab:
        return reverse_kl_full(logp_s, logp_t, surrogate)
    idx = logp_s.detach().topk(k, dim=-1).indices
    top_s, top_t = logp_s.gather(-1, idx), logp_t.gather(-1, idx)
    head = reverse_kl_full(top_s, top_t, surrogate)  # same formula, restricted to the k bins
    # Tail log-mass = logsumexp over the tokens outside the top-k (stable where the tail is tiny).
    outside = torch.ones_like(logp_s, dtype=torch.bool).scatter(-1, idx, False)
    neg_inf = torch.full_like(logp_s, float("-inf"))
    tail_s = torch.where(outside, logp_s, neg_inf).logsumexp(-1)
    tail_t = torch.where(outside, logp_t, neg_inf).logsumexp(-1)
    p_tail = tail_s.exp()
    ratio = tail_s - tail_t
    if surrogate:
        ratio = ratio.detach()
    tail = torch.where(p_tail > 0, p_tail * ratio, torch.zeros_like(p_tail))
    return head + tail


def is_gate(
    logp_new: torch.Tensor, logp_old: torch.Tensor, low: float, high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MiMo's importance-sampling gate: (w, kept) with w = p_new/p_old inside [low, high] else 0.

    Tokens outside the band are dropped, not clipped (a clipped token would still push with a
    stale advantage). w carries no gradient.
    """
    ratio = (logp_new.detach() - logp_old).exp()
    kept = (ratio >= low) & (ratio <= high)
    return torch.where(kept, ratio, torch.zeros_like(ratio)), kept


def orm_advantage(rewards: torch.Tensor, orm_weight: float) -> torch.Tensor:
    """Outcome-reward advantage per sample [B]: orm_weight * (reward - batch mean)."""
    rewards = rewards.float()
    return orm_weight * (rewards - rewards.mean())


def advantages(
    teacher_logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    orm_adv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token advantage [B, T]: log p_T(y_t) - log p_old(y_t) [+ orm_adv of the sample].

    Padding positions get exactly 0 so that they never leak into sums.
    """
    adv = (teacher_logp - old_logp).detach()
    if orm_adv is not None:
        adv = adv + orm_adv.detach().unsqueeze(-1)
    return adv * mask


def mopd_loss(
    student_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    teacher_logp_full: torch.Tensor | None = None,
    *,
    estimator: str = "sampled_token",
    temperature: float = 1.0,
    is_low: float = 0.5,
    is_high: float = 2.0,
    top_k: int = 16,
    orm_adv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed MOPD loss over the tokens of one chunk, and stats to aggregate across chunks.

    student_logits: [B, T, V] logits (with grad) at the positions that predict `tokens`.
    tokens, mask: [B, T] sampled completion ids and 1 for real tokens (through eos), 0 for pads.
    old_logp, teacher_logp: [B, T] log p_old(tokens) (sampling policy) and log p_T(tokens).
    teacher_logp_full: [B, T, V] teacher log-probs, needed by full_vocab and top_k.
    orm_adv: [B] outcome-reward advantage (`orm_advantage`) or None. With full_vocab / top_k the
    KL term replaces the sampled teacher term and the outcome term stays a policy gradient on the
    sampled tokens.

    Returns (loss_sum, stats): divide loss_sum by the batch's total token count before backward.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    mask = mask.float()
    logp_full = log_probs(student_logits, temperature)
    logp = gather_tokens(logp_full, tokens)
    w, kept = is_gate(logp, old_logp, is_low, is_high)
    if estimator == "sampled_token":
        per_token = -w * advantages(teacher_logp, old_logp, mask, orm_adv) * logp
    else:
        if teacher_logp_full is None:
            raise ValueError(f"estimator {estimator!r} needs the teacher's full log-probs")
        if estimator == "full_vocab":
            kl = reverse_kl_full(logp_full, teacher_logp_full, surrogate=True)
        else:
            kl = reverse_kl_top_k(logp_full, teacher_logp_full, top_k, surrogate=True)
        per_token = w * kl
        if orm_adv is not None:
            per_token = per_token - w * orm_adv.detach().unsqueeze(-1) * logp
    loss_sum = (per_token * mask).sum()
    stats = {
        "tokens": float(mask.sum()),
        "dropped": float(((~kept).float() * mask).sum()),
        "loss_sum": float(loss_sum.detach()),
    }
    return loss_sum, stats
