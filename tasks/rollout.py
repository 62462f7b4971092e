"""Rollouts of multi-teacher on-policy distillation: sample, chunk and score, as pure functions.

`sample` is the student's KV-cached sampling loop; `view` / `plan_chunks` cut a batch into
per-route, prompt-length-sorted chunks with all-padding columns removed; `completion_logits`
runs one model on a chunk; `score` puts a chunk's teacher log-probs next to the student's. The
student and its teacher always run on the very same chunk, so identical weights give
bit-identical log-probs (advantage and KL exactly 0: tests/test_mopd.py).

`sample_many` (K samples per prompt: one prefill per prompt, finished rows leave the batch) and
`sample_texts` (the same, text in, text out) are the `generate` kind's sampler.

Run: ``python -m pytest tests/test_mopd.py -q``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tasks.mopd_loss import gather_tokens, log_probs, reverse_kl_full


@dataclass
class Rollout:
    """One batch of student samples, laid out for full forwards of student and teachers."""

    input_ids: torch.Tensor  # [B, P + T]: left-padded prompt, completion, pads after eos
    attention_mask: torch.Tensor  # [B, P + T]: 0 on left pads and on pads after eos
    position_ids: torch.Tensor  # [B, P + T]: 0.. from the first real token
    tokens: torch.Tensor  # [B, T] sampled completion ids
    mask: torch.Tensor  # [B, T] float, 1 through the first eos


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per left-padded prompt with a KV cache; stop when all hit eos.

    Our own loop rather than ``model.generate``: same tokens for the same logits, ~25% less
    per-token overhead at this model size, and the layout the scoring forwards need.
    """
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    batch = prompt_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    attn, last, steps, alive = prompt_mask, position_ids[:, -1], [], []
    for t in range(max_new_tokens):
        probs = F.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        alive.append(~done)
        steps.append(nxt)
        done = done | (nxt == eos_id)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    tokens, mask = torch.stack(steps, 1), torch.stack(alive, 1).float()
    full_mask = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    return Rollout(
        input_ids=torch.cat([prompt_ids, tokens], dim=1),
        attention_mask=full_mask,
        position_ids=(full_mask.long().cumsum(-1) - 1).clamp(min=0),
        tokens=tokens,
        mask=mask,
    )


def view(rollout: Rollout, idx: torch.Tensor) -> Rollout:
    """Rows `idx` of a rollout, with columns that are padding in every one of them cut off.

    Left: prompt columns before the longest prompt of these rows; right: completion columns
    after their longest completion. Routing groups rows of one domain together, so this removes
    most of the padding a mixed batch carries (an arith prompt is 7 tokens, a count one 18).
    """
    attn, mask = rollout.attention_mask[idx], rollout.mask[idx]
    prompt_len = attn.shape[1] - rollout.tokens.shape[1]
    left = int((attn[:, :prompt_len].sum(0) == 0).sum())  # left padding is a prefix of columns
    steps = max(int(mask.sum(1).max()), 1)  # the mask is a prefix of ones in every row
    cols = slice(left, prompt_len + steps)
    return Rollout(
        input_ids=rollout.input_ids[idx, cols],
        attention_mask=attn[:, cols],
        position_ids=rollout.position_ids[idx, cols],
        tokens=rollout.tokens[idx, :steps],
        mask=mask[:, :steps],
    )


def plan_chunks(
    rollout: Rollout, groups: Mapping[str, torch.Tensor], max_rows: int = 32
) -> list[tuple[str, torch.Tensor]]:
    """(route, row indices) chunks: each route's rows sorted by prompt length, <= max_rows each.

    A chunk is the unit every forward runs on: the student and its teacher always see the same
    chunk, so their log-probs are computed in the same layout.
    """
    prompt_len = rollout.attention_mask.shape[1] - rollout.tokens.shape[1]
    lengths = rollout.attention_mask[:, :prompt_len].sum(1)
    chunks = []
    for route, idx in groups.items():
        ordered = idx[torch.argsort(lengths[idx], descending=True, stable=True)]
        chunks += [(route, part) for part in ordered.split(max_rows) if part.numel()]
    return chunks


def completion_logits(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """[B, T, V] logits predicting each completion token (use on a `view` of one chunk)."""
    steps = rollout.tokens.shape[1]
    out = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                position_ids=rollout.position_ids, logits_to_keep=steps + 1)
    # Position i predicts token i + 1: the last T + 1 positions minus the final one. Slicing from
    # the end also works for modules that ignore logits_to_keep and return every position.
    return out.logits[:, -(steps + 1) : -1]


@dataclass
class Scored:
    """Log-probs of one chunk's completion tokens under the rollout student and its teacher."""

    old_logp: torch.Tensor  # [b, t] log p_old(y_t)
    teacher_logp: torch.Tensor  # [b, t] log p_T(y_t)
    teacher_logp_full: torch.Tensor  # [b, t, V]
    kl_sum: float  # sum over the chunk's tokens of the exact reverse KL per state


def score(
    student_logits: torch.Tensor,
    teacher: torch.nn.Module,
    chunk: Rollout,
    temperature: float = 1.0,
) -> Scored:
    """Score a chunk with its teacher, given the rollout student's logits on the same chunk.

    `student_logits` may carry gradient (the fused on-policy update) or not (a pre-pass): only
    detached values are kept. The teacher runs on exactly the chunk the student ran on, so
    identical weights give bit-identical log-probs (A == 0, KL == 0).
    """
    with torch.no_grad():
        logp_t = log_probs(completion_logits(teacher, chunk), temperature)
        logp_s = log_probs(student_logits.detach(), temperature)
        mask = chunk.mask
        kl = float((reverse_kl_full(logp_s, logp_t) * mask).sum())
        return Scored(
            old_logp=gather_tokens(logp_s, chunk.tokens) * mask,
            teacher_logp=gather_tokens(logp_t, chunk.tokens) * mask,
            teacher_logp_full=logp_t,
            kl_sum=kl,
        )


# -- text in, text out: the `generate` kind's sampling -----------------------------------


@torch.no_grad()
def sample_many(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    k: int,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """K samples of each left-padded prompt: [B * K, T] token ids, row b * K + j the j-th sample
    of prompt b, eos included, pads after it.

    The same sampling as `sample` (softmax at `temperature`, one multinomial draw per step), with
    two savings that matter for many samples of short answers: each prompt is prefilled once and
    its KV cache repeated K times, and a row leaves the batch (its cache rows dropped) as soon as
    it has emitted eos, so later steps run only on the rows still writing.
    """
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].repeat_interleave(k, dim=0)
    attn = prompt_mask.repeat_interleave(k, dim=0)
    last = position_ids[:, -1].repeat_interleave(k, dim=0)
    tokens = torch.full((attn.shape[0], max_new_tokens), pad_id, dtype=torch.long,
                        device=prompt_ids.device)
    rows = torch.arange(attn.shape[0], device=prompt_ids.device)  # original index of each row
    for t in range(max_new_tokens):
        probs = F.softmax(logits.float() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tokens[rows, t] = nxt
        going = nxt != eos_id
        if t == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the batch
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, nxt, attn, last = rows[keep], nxt[keep], attn[keep], last[keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        last = last + 1
        out = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last[:, None],
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return tokens


def sample_texts(model: Any, tokenizer: Any, prompts: list[str], k: int, max_new_tokens: int,
                 temperature: float, generator: Any = None,
                 batch_size: int = 512) -> tuple[list[list[str]], list[list[bool]], int]:
    """K sampled completions of each prompt (text up to eos), whether each ended with eos
    (False: cut at `max_new_tokens`), and the tokens generated (through eos).

    Prompts are sorted by length so a batch carries little left padding; each batch of
    ``batch_size // k`` prompts is one `sample_many` call (`generator` seeds it).
    """
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[list[str]] = [[""] * k for _ in prompts]
    ended: list[list[bool]] = [[False] * k for _ in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    n_tokens, step = 0, max(1, batch_size // k)
    try:
        for s in range(0, len(order), step):
            part = order[s : s + step]
            enc = tokenizer([prompts[i] for i in part], return_tensors="pt", padding=True)
            ids = sample_many(model, enc["input_ids"].to(device),
                              enc["attention_mask"].to(device), k, max_new_tokens, temperature,
                              tokenizer.eos_token_id, tokenizer.pad_token_id, generator)
            hit = ids == tokenizer.eos_token_id
            stopped = hit.any(1)
            n_tokens += int(torch.where(stopped, hit.int().argmax(1) + 1, ids.shape[1]).sum())
            texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
            for r, (text, stop) in enumerate(zip(texts, stopped.tolist(), strict=True)):
                out[part[r // k]][r % k], ended[part[r // k]][r % k] = text, stop
    finally:
        tokenizer.padding_side = side
    return out, ended, n_tokens
