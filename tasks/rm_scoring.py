"""Reward-model scoring: one text convention for training, evaluating and using a reward model.

A reward model (the `reward_model` kind, a sequence-classification head with one label on the
tiny Llama) reads ``bos + prompt + completion + eos``. That is what TRL's RewardTrainer trains
on (it appends eos to `chosen` / `rejected` and our tokenizer's post-processor prepends bos), so
the held-out pairwise accuracy of the `reward_model` kind and the RM rewards of `grpo` score the
same text. The eos is left off a sample that did not end (cut at ``max_completion_length``): the
verifier calls a completion that never stops wrong, and the RM sees the same difference.

Why `grpo` passes a function and not the RM itself: GRPOTrainer scores a model in
``reward_funcs`` on ``prompt + completion`` tokenized with ``add_special_tokens=False`` and no
eos, which is not the text our RMs were trained on.

`check_compatible` refuses, before any training, an RM or a reference whose tokenizer differs
from the policy's (vocabulary, ``config.vocab_size``, bos/eos/pad, chat template, the fields of
`tasks.compat.FINGERPRINT_FIELDS`): the RM would read other token ids than the policy writes.

`heldout_rm` is the RM side of a policy's eval: each RM's mean score on its greedy held-out answers.

Run: imported by tasks/reward_model.py, tasks/grpo.py (`policy_rewards`), tasks/dpo.py and
tasks/ppo.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from artifacts.refs import ArtifactRef, StageInputError
from tasks.compat import FINGERPRINT_FIELDS


def check_compatible(label: str, ref: ArtifactRef, policy_tok: Any, policy_config: Any,
                     config: Any = None) -> None:
    """StageInputError naming `label` (e.g. "reward model 'rm'") and its stage unless its
    tokenizer fingerprint equals the policy's. `config`: its model config (read when None)."""
    from transformers import AutoConfig

    from tasks.models import load_tokenizer, tokenizer_fingerprint

    mine = tokenizer_fingerprint(policy_tok, policy_config)
    config = config if config is not None else AutoConfig.from_pretrained(str(ref.path))
    theirs = tokenizer_fingerprint(load_tokenizer(ref.path), config)
    diff = [f"{f}: {label}={theirs.get(f)!r} policy={mine.get(f)!r}"
            for f in FINGERPRINT_FIELDS if mine.get(f) != theirs.get(f)]
    if diff:
        raise StageInputError(
            f"{label} (stage {ref.stage!r} of recipe {ref.recipe!r}) does not share the policy's "
            f"tokenizer: {'; '.join(diff)}. It would read other token ids than the policy writes."
            " Fix: build it from the policy's lineage (same tokenizer files and vocab_size)"
        )


def load_reward_model(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved RM, in eval mode, float32, pad id set for batching."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.models import load_tokenizer

    tok = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def rm_texts(prompts: list[str], completions: list[str], eos: str,
             ended: list[bool] | None = None) -> list[str]:
    """What the RM reads: prompt + completion (+ eos where the sample ended; bos comes from the
    tokenizer).

    >>> rm_texts(["1+1="], ["2"], "<eos>"), rm_texts(["1+1="], ["22"], "<eos>", [False])
    (['1+1=2<eos>'], ['1+1=22'])
    """
    ended = ended if ended is not None else [True] * len(prompts)
    return [p + c + (eos if e else "")
            for p, c, e in zip(prompts, completions, ended, strict=True)]


def score(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 256) -> list[float]:
    """One scalar per text (the RM's logit), right-padded batches, no gradient."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                out.extend(model(**batch).logits[:, 0].float().tolist())
    finally:
        tokenizer.padding_side = side
    return out


class RMReward:
    """A GRPO reward function scoring each sample with one RM; TRL logs its mean as
    ``rewards/<__name__>/mean`` beside the verifier's, so the two curves stay apart."""

    def __init__(self, name: str, path: str | Path, eos_token_id: int) -> None:
        self.__name__ = f"rm_{name}"
        self.model, self.tokenizer = load_reward_model(path)
        self.eos_token_id = eos_token_id
        self._placed = False

    def __call__(self, prompts: list, completions: list, completion_ids: list | None = None,
                 **kwargs: Any) -> list[float]:
        if not self._placed:  # the rank's device, known once the trainer runs
            import torch

            if torch.cuda.is_available():
                self.model.to(torch.device("cuda", torch.cuda.current_device()))
            self._placed = True
        ended = ([self.eos_token_id in ids for ids in completion_ids]
                 if completion_ids is not None else None)
        texts = rm_texts(list(prompts), list(completions), self.tokenizer.eos_token, ended)
        return score(self.model, self.tokenizer, texts)


def policy_rewards(
    verifier: Any, rms: Mapping[str, ArtifactRef], reward_weights: Mapping[str, float],
    verifier_weight: float, tokenizer: Any, model_config: Any,
) -> tuple[list[Any], list[float] | None, dict[str, str]]:
    """The reward functions of a policy stage (grpo; ppo later): (functions, their weights or
    None for TRL's default, TRL log key -> history name).

    The verifier comes first and always runs (logged even at weight 0); each RM follows, after
    its tokenizer is checked against the policy's. No RM: the verifier alone, unweighted, so a
    verifier-only stage trains exactly as it did before RMs existed."""
    unknown = sorted(set(reward_weights) - set(rms))
    if unknown:
        raise StageInputError(f"reward_weights {unknown} name no `reward_model` route (routes: "
                              f"{sorted(rms) or 'none'})")
    if not rms:
        if verifier_weight == 0:
            raise StageInputError("verifier_weight 0 and no reward_model: no reward is left")
        return [verifier], None, {f"rewards/{verifier.__name__}/mean": "verifier"}
    for name, ref in sorted(rms.items()):
        check_compatible(f"reward model {name!r}", ref, tokenizer, model_config)
    funcs: list[Any] = [verifier]
    weights = [verifier_weight]
    keys = {f"rewards/{verifier.__name__}/mean": "verifier"}
    for name, ref in sorted(rms.items()):
        funcs.append(RMReward(name, ref.path, tokenizer.eos_token_id))
        weights.append(reward_weights.get(name, 1.0))
        keys[f"rewards/rm_{name}/mean"] = f"rm/{name}"
    return funcs, weights, keys


def heldout_rm(model: Any, tokenizer: Any, domains: list[str], n: int,
               rms: Mapping[str, Any]) -> dict[str, float]:
    """Mean score of each RM on greedy answers to the held-out problems `evaluate` uses (same
    length rule), over `domains`: the RM side of the eval, to set beside the accuracy."""
    import torch

    from tasks.evaluate import heldout_rows

    scorers = {name: RMReward(name, ref.path, tokenizer.eos_token_id) for name, ref in rms.items()}
    got: dict[str, list[float]] = {name: [] for name in rms}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    try:
        for domain in domains:
            rows = heldout_rows(domain, n)
            longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
                          for r in rows)
            prompts = [r["prompt"] for r in rows]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=longest + 1, do_sample=False,
                                     temperature=None, top_k=None, top_p=None,
                                     eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:].tolist()
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            for name, rm in scorers.items():
                got[name] += rm(prompts, texts, completion_ids=new)
    finally:
        tokenizer.padding_side = side
    return {name: sum(xs) / len(xs) for name, xs in got.items() if xs}
