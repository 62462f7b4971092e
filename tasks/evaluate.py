"""Batched generation and held-out accuracy per domain (the verifier is the evaluator).

- `generate`: left-padded batches through ``model.generate`` (KV cache), stops at eos, returns
  the completion text only (no prompt, no special tokens). Greedy by default; sampling is seeded
  in a forked RNG so evaluation never shifts a training run's random stream.
- `evaluate`: greedy accuracy on `n` distinct held-out problems per domain (split "heldout" of
  `tasks.domains`, fixed seed), so every stage of every recipe is scored on the same problems;
  `select` passes split "validation" to choose without seeing them.

Run: ``python -m tasks.evaluate /path/to/model_dir arith reverse`` prints accuracy per domain.
"""

from __future__ import annotations

import sys
from typing import Any

from tasks import domains as _domains


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    batch_size: int = 256,
    seed: int | None = None,
) -> list[str]:
    """Completions for `prompts` (text after the prompt, up to and without eos)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only batching: prompts end where generation starts
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "use_cache": True,
    }
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    else:  # a model's generation_config may carry sampling knobs that greedy would warn about
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            for i in range(0, len(prompts), batch_size):
                batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                ids = model.generate(**batch, **gen_kwargs)
                new = ids[:, batch["input_ids"].shape[1] :]
                out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def heldout_rows(domain: str, n: int = 500, seed: int = 1234) -> list[dict]:
    """The fixed held-out problems `evaluate` scores (exposed for reports and tests): a prefix
    of the test set (tasks/domains.py), never more, so no validation problem is ever scored."""
    if n > _domains.TEST_N or seed != _domains.TEST_SEED:
        raise ValueError(f"held-out evaluation draws at most {_domains.TEST_N} problems of seed "
                         f"{_domains.TEST_SEED} (the test set), got n={n}, seed={seed}: more "
                         "would reach the validation split; lower eval_n to 500 or less")
    return _domains.generate(domain, n, seed=seed, split="heldout")


def evaluate(
    model: Any, tokenizer: Any, domains: list[str], n: int = 500, seed: int = 1234,
    split: str = "heldout",
) -> dict[str, float]:
    """Greedy accuracy (0..1) on `n` distinct problems per domain of `split` (held-out, the
    test set every stage reports; `select` chooses on "validation", disjoint from it)."""
    scores: dict[str, float] = {}
    for domain in domains:
        rows = heldout_rows(domain, n, seed) if split == "heldout" else \
            _domains.generate(domain, n, seed=seed, split=split)
        if not rows:
            scores[domain] = 0.0
            continue
        # Room for the longest answer plus eos; a model that rambles past it is wrong anyway.
        longest = max(
            len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows
        )
        completions = generate(model, tokenizer, [r["prompt"] for r in rows], longest + 1)
        correct = sum(
            _domains.verify(domain, c, r["answer"]) for c, r in zip(completions, rows, strict=True)
        )
        scores[domain] = correct / len(rows)
    return scores


if __name__ == "__main__":
    from tasks.models import load_model, load_tokenizer

    path = sys.argv[1]
    names = sys.argv[2:] or list(_domains.DOMAINS)
    print(evaluate(load_model(path), load_tokenizer(path), names))
