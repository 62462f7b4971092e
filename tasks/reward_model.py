"""Stage kind `reward_model`: a scalar reward model trained on preference pairs with TRL's
RewardTrainer.

Starts from the `init` causal LM: ``AutoModelForSequenceClassification.from_pretrained(init,
num_labels=1)`` keeps its transformer and tokenizer and adds a fresh score head (seeded), so the
RM reads exactly the token ids its policies write (checked again by every consumer). It trains
on the `data` input's ``prompt``/``chosen``/``rejected`` rows with the Bradley-Terry loss
``-log sigmoid(r(chosen) - r(rejected))`` and saves a plain HF directory that
``AutoModelForSequenceClassification.from_pretrained`` loads. It produces a ``reward_model``
artifact: a policy can never start from it, only score with it (`grpo`'s and `ppo`'s
``reward_model:``).

Snapshots (``snapshots: [steps]`` / ``snapshot_every: N``, tasks/snapshots.py): the RM at those
steps is published as ``STAGE@STEP``, the same sequence-classification directory as the final
artifact, so ``reward_model: rm@250`` scores with it. With ``eval_snapshots: true`` each one's
eval is the RM's own (held-out pairwise accuracy per domain, ``eval_n`` pairs), not generation.

Evaluation (``metrics.eval.<domain>``): held-out pairwise accuracy, the fraction of pairs whose
chosen text scores higher. The pairs come from the same 500 held-out problems per domain that
every policy is evaluated on (`tasks.evaluate.heldout_rows`): chosen = the correct answer,
rejected = `wrong_answer`, a pure, deterministic near miss of it (a number off by one or ten or
with its digits swapped; a string with two letters swapped, one replaced, dropped or doubled),
kept only if the domain's verifier rejects it. Near misses are what a trained policy gets wrong,
so they are the hard case for an RM. Domains: those of the data's rows (or `eval_domains`).

Departures from TRL defaults (why): fp32, no gradient checkpointing (tiny model, CPU), logging
every step (the curve is the `history` metric), learning rate 1e-3 (1e-4 barely moves a 0.7M
parameter RM in a few hundred steps). When the init is a judge that already solves the task,
use a lower rate and more steps: at 1e-3 the Bradley-Terry gradient overwrites what the trunk
computes before the head learns to read it (``bench/rm_accuracy.py``: on arith pairs, an init
that solves 96 % of held-out sums ranks .52 of them right after 2000 steps at 1e-3, .92 at
3e-4; the recipes' 600-step RMs, which start from the policy's SFT, measured no better at
3e-4). Other RewardConfig fields go in `trainer: {...}`.

Run: ``python -m tasks.reward_model INIT_DIR DATA_DIR OUT_DIR [max_steps]``.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.kind import Role, train_rows

PRODUCES = "reward_model"
RESUMABLE = True  # `resume_every` works here: the HF Trainer checkpoints (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The causal LM whose transformer and tokenizer the RM "
                 "starts from (a fresh one-label score head is added)."),
    "data": train_rows("prompt", "chosen", "rejected",
                       description="Preference pairs: chosen should score above rejected."),
}


class Config(BaseModel):
    """Reward-model hyper-parameters; `trainer` passes any other RewardConfig field to TRL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    per_device_train_batch_size: int = Field(32, ge=1, description="Pairs per step.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    lr_scheduler_type: str = Field(
        "linear", description="transformers scheduler name (linear, cosine, constant, ...).")
    max_length: int = Field(
        128, ge=8, description="Pairs whose chosen or rejected text is longer (tokens) are "
        "dropped (TRL RewardTrainer filters, it does not truncate).")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pull mean rewards toward 0 (TRL; 0.01 recommended). Useful "
        "when the RM's raw score is mixed with the verifier's 0/1 in `grpo`.")
    seed: int = Field(0, description="Seed of the score head's init, data order and dropout.")
    eval_n: int = Field(500, ge=0, description="Held-out pairs per domain for evaluation.")
    eval_domains: list[str] | None = Field(
        None, description="Domains to evaluate (None: every known domain in the data rows).")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="Extra TRL RewardConfig fields, passed through as is.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        from tasks.models import check_passthrough

        check_passthrough(self.trainer, set(type(self).model_fields)
                          - {"trainer", "eval_n", "eval_domains"})
        for name in self.eval_domains or []:
            if name not in _domains.DOMAINS:
                raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")
        return self


def _near_misses(answer: str, rng: random.Random) -> list[str]:
    """Candidate wrong answers close to `answer`, in a seeded order."""
    out: list[str] = []
    if answer.isdigit():
        n = int(answer)
        out += [str(n + d) for d in (1, -1, 10, -10) if n + d >= 0]
        if len(answer) > 1:
            out.append(answer[::-1])
    chars = list(answer)
    alphabet = sorted(set(answer)) + [c for c in "abcdefghijklmnopqrstuvwxyz0123456789"
                                      if c not in answer]
    for i in range(len(chars)):
        if i + 1 < len(chars):
            out.append("".join(chars[:i] + [chars[i + 1], chars[i]] + chars[i + 2:]))
        out.append("".join(chars[:i] + chars[i + 1:]))
        out.append("".join(chars[:i + 1] + chars[i:]))
        same_kind = [c for c in alphabet if c != chars[i] and c.isdigit() == chars[i].isdigit()]
        if same_kind:
            out.append("".join(chars[:i] + [rng.choice(same_kind)] + chars[i + 1:]))
    rng.shuffle(out)
    return out


def wrong_answer(domain: str, prompt: str, answer: str) -> str:
    """A near miss of `answer` that the domain's verifier rejects; pure in its arguments.

    >>> w = wrong_answer("arith", "12+34=", "46")
    >>> w != "46" and w == wrong_answer("arith", "12+34=", "46")
    True
    >>> _domains.verify("sort", wrong_answer("sort", "sort:aab=", "aab"), "aab")
    False
    """
    rng = random.Random(f"rm-pair|{domain}|{prompt}|{answer}")
    for cand in _near_misses(answer, rng):
        if cand.strip() and not _domains.verify(domain, cand, answer):
            return cand
    return answer + "?"  # no near miss is wrong (a domain with many right answers)


def heldout_pairs(domain: str, n: int = 500, seed: int = 1234) -> list[dict]:
    """Held-out pairs of `domain`: the evaluation problems of every policy, chosen = answer."""
    from tasks.evaluate import heldout_rows

    return [{"prompt": r["prompt"], "chosen": r["answer"], "domain": domain,
             "rejected": wrong_answer(domain, r["prompt"], r["answer"])}
            for r in heldout_rows(domain, n, seed)]


def pairwise_accuracy(model: Any, tokenizer: Any, domains: list[str], n: int = 500,
                      seed: int = 1234) -> dict[str, float]:
    """Fraction of held-out pairs per domain whose chosen text scores strictly higher."""
    from tasks.rm_scoring import rm_texts, score

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for domain in domains:
            pairs = heldout_pairs(domain, n, seed)
            prompts = [p["prompt"] for p in pairs]
            eos = tokenizer.eos_token
            good = score(model, tokenizer, rm_texts(prompts, [p["chosen"] for p in pairs], eos))
            bad = score(model, tokenizer, rm_texts(prompts, [p["rejected"] for p in pairs], eos))
            out[domain] = sum(g > b for g, b in zip(good, bad, strict=True)) / max(len(pairs), 1)
    finally:
        model.train(was_training)
    return out


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps, warm-up and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "warmup_steps": 0, "eval_n": 10})


def _with_snapshots(callback: Any, tokenizer: Any, history: list[dict], config: Config,
                    domains: list[str]) -> list[Any]:
    """`callback`, plus the snapshot taker when the stage publishes snapshots; its eval (with
    eval_snapshots) is `pairwise_accuracy`, the RM's own, not tasks/snapshots.py's generation."""
    from tasks import snapshots

    def evaluate(model: Any) -> dict[str, float]:
        return pairwise_accuracy(model, tokenizer, domains, config.eval_n)

    use = evaluate if config.eval_n and domains else None
    cb = snapshots.trainer_callback(snapshots.current(), tokenizer, history, use)
    return [callback] if cb is None else [callback, cb]


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Train an RM from `init` on the pairs; save to `out_dir`; return eval/train/history."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from tasks import models
    from tasks import resume as resume_mod
    from tasks.data import data_file
    from tasks.sft import init_ref, read_jsonl, require_columns

    models.quiet()
    path = data_file(inputs)
    rows = read_jsonl(path)
    require_columns(rows, path, ("prompt", "chosen", "rejected"))
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"],
                                  "rejected": r["rejected"]} for r in rows])
    present = sorted({r.get("domain") for r in rows} & set(_domains.DOMAINS))
    eval_domains = config.eval_domains if config.eval_domains is not None else present

    init = init_ref(inputs)
    tokenizer = models.load_tokenizer(init.path)
    with torch.random.fork_rng(devices=[]):  # the new score head's init is seeded
        torch.manual_seed(config.seed)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(init.path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    history: list[dict] = []
    keys = {k: k for k in ("loss", "accuracy", "margin", "learning_rate", "grad_norm",
                           "num_tokens")}
    callback = models.progress_callback(progress, config.max_steps, history, keys)
    work = out_dir / ".trainer"
    resume = resume_mod.current()
    args = {
        **models.trainer_defaults(work),
        "use_cpu": not torch.cuda.is_available(),
        **config.trainer,
        **config.model_dump(include={"max_steps", "learning_rate", "per_device_train_batch_size",
                                     "warmup_steps", "lr_scheduler_type", "seed", "max_length",
                                     "center_rewards_coefficient"}),
        **resume_mod.trainer_args(resume),  # checkpoints into the resume dir (resume_every)
    }
    try:
        rm_args = RewardConfig(**args)
    except (TypeError, ValueError) as e:
        raise StageInputError(f"invalid RewardConfig from the stage's fields: {e}") from e
    trainer = RewardTrainer(model=model, args=rm_args, train_dataset=dataset,
                            processing_class=tokenizer,
                            callbacks=_with_snapshots(callback, tokenizer, history, config,
                                                      eval_domains))
    if len(trainer.train_dataset) == 0:
        raise StageInputError(f"{path}: every pair is longer than max_length "
                              f"{config.max_length} tokens; raise max_length")
    models.silence_printer(trainer)
    start = time.perf_counter()
    checkpoint = resume_mod.last_checkpoint(resume)  # None: start from `init`
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    model = trainer.model
    model.config._name_or_path = str(out_dir)
    models.save_model(model, tokenizer, out_dir)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    losses = [h["loss"] for h in history if "loss" in h]
    accs = [h["accuracy"] for h in history if "accuracy" in h]
    train = {
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "final_accuracy": sum(accs[-10:]) / len(accs[-10:]) if accs else float("nan"),
        "steps": float(trainer.state.global_step),
        "seconds": seconds,
        "rows": float(len(trainer.train_dataset)),
    }
    scores = (pairwise_accuracy(model, tokenizer, eval_domains, config.eval_n)
              if config.eval_n else {})
    return {"eval": scores, "train": train, "history": models.subsample(history),
            "resumed_from_step": resume_mod.resumed_step(checkpoint)}


if __name__ == "__main__":
    init_dir, data_dir, out = (Path(a) for a in sys.argv[1:4])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 300

    def _ref(p: Path, kind: str) -> ArtifactRef:
        return ArtifactRef(key="0" * 64, path=p, kind=kind, stage=kind, recipe="cli")

    ins = Inputs(init=_ref(init_dir, "sft"), data={"train": _ref(data_dir, "data")})
    print(run(Config(max_steps=steps), ins, out, lambda s, t, m: print(s, t, dict(m))))
