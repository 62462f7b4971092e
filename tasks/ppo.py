"""Stage kind `ppo`: our own compact PPO against reward models and/or the verifier (InstructGPT).

TRL 1.16 no longer ships a PPO trainer, so this is our own, on the MOPD plumbing: this module
holds the config, the checks and `run`; the loop, the critic, the scorer and their assembly
are tasks/ppo_trainer.py, the math tasks/ppo_loss.py, sampling tasks/rollout.py.

Each step the policy (``init``) samples one completion per prompt (``prompts_per_step`` rows of
the data, optionally filtered to ``domains``) with tasks/rollout.py's KV-cached loop. Each
sample gets a sequence score: ``sum_i reward_weights[i] * RM_i(prompt + completion)`` (every
``reward_model:`` route, scored on the text it was trained on, tasks/rm_scoring.py) ``+
verifier_weight * verifier`` (the row's domain verifier, 0/1). Per token, as in InstructGPT:
``r_t = -kl_coef * (log pi(y_t) - log pi_ref(y_t))``, plus the score at the last token. GAE
(``gamma``, ``lam``) over the critic's values gives advantages (whitened per batch), and
``ppo_epochs`` passes of ``minibatches`` minibatches minimise the clipped surrogate
(``cliprange``) plus ``vf_coef`` times the clipped value loss (``cliprange_value``).

The reference is ``init`` unless ``reference:`` names one. The critic is a linear head on the
policy's last hidden state (``value_init: policy``, shared trunk) or a separate value model
initialised from the reward model with the largest weight (``value_init: reward_model``, as
InstructGPT). Before any weight is loaded: the reference and every RM must share the policy's
tokenizer and vocab size (tasks/rm_scoring.py on tasks/compat.py), and some reward must be left.

Logged per step, apart so reward hacking shows: ``score`` (the combined sequence score),
``rm/<name>`` (each RM's raw mean), ``verifier`` and ``verifier/<domain>`` (accuracy of the
samples, logged at any weight), ``kl`` (exact per-token KL(pi || pi_ref) of the sampling policy,
mean over tokens), ``kl_reward`` (the KL term of the reward, summed per sample), ``value_loss``,
``policy_loss``, ``clip_frac``, ``value_clip_frac``, ``approx_kl``, ``entropy``, ``mean_length``,
``ended`` (fraction of samples that ended with eos; the others lose ``missing_eos_penalty``).
After training: greedy held-out accuracy per domain (``eval``) and the held-out mean score of
each RM on those greedy answers (``train.heldout_rm/<name>``).
Snapshots (``snapshots: [steps]`` / ``snapshot_every: N``, tasks/snapshots.py): the policy after
those optimizer steps is published as ``STAGE@STEP`` (greedy held-out accuracy with
``eval_snapshots: true``); taking one draws no random number, so the final weights are the same.

Departures from InstructGPT (Ouyang et al. 2022) and its PPO (Stiennon et al. 2020): no
pretraining-mix term (PPO-ptx); a fixed ``kl_coef``, no adaptive KL controller; one sample per
prompt, advantages whitened over the batch of each process; the RM score is not re-normalised
to the SFT model's mean; value_init: policy shares the trunk with the policy (the old TRL
design), where InstructGPT used a separate value model (value_init: reward_model here).

Run: ``python -m tasks.ppo OUT POLICY_DIR DATA_DIR [rm=RM_DIR ...] [key=value ...]`` (keys
are Config fields; ``name=DIR`` pairs that are not fields are reward models).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.kind import KindCheckError, Node, Role, columns_of, train_rows

PRODUCES = "model"
RESUMABLE = True  # `resume_every` works here: its loop snapshots itself (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The policy trained (and the KL reference by default)."),
    "data": train_rows("prompt", description="Prompts; the verifier also reads `domain` and "
                       "`answer` (needed when verifier_weight > 0)."),
    "reference": Role("model", required=False,
                      description="KL reference (default: the init policy)."),
    "reward_model": Role("reward_model", required=False, many=True, default_name="rm",
                         description="Reward models scoring each sample: one stage, or "
                         "{name: stage}, weighted by `reward_weights`."),
}


class Config(BaseModel):
    """PPO hyper-parameters (InstructGPT's recipe at tiny sizes)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(100, ge=1, le=1_000_000, description="Rollouts (batches) to train on.")
    prompts_per_step: int = Field(32, ge=1, le=65_536, description="Prompts (one sample each) "
                                  "per rollout, drawn uniformly from the (filtered) rows.")
    ppo_epochs: int = Field(2, ge=1, le=64, description="Passes over each rollout batch.")
    minibatches: int = Field(2, ge=1, le=1024, description="Optimizer steps per pass.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate of the "
                                 "policy (constant after warm-up).")
    value_learning_rate: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate of the "
                                       "critic (the value head, or the whole value model).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up (optimizer steps): Adam's "
                              "first steps move every weight by ~lr whatever the gradient.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping, policy and critic "
                                 "apart.")
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL penalty to the reference "
                           "(InstructGPT's beta); 0: no penalty.")
    cliprange: float = Field(0.2, gt=0, le=10, description="PPO ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip of the value update around the "
                                   "rollout's values (in score units).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss; with value_init: "
                           "policy it sets how much the critic shapes the shared trunk.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="Lambda of GAE.")
    max_new_tokens: int = Field(8, ge=1, le=65_536, description="Longest sampled completion.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature; log-probs of "
                               "policy and reference are taken at the same temperature.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over each batch.")
    seed: int = Field(0, ge=0, description="Seed of prompt draws, sampling and minibatch order.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain (0: skip eval).")
    domains: list[str] | None = Field(None, description="Train only on rows of these domains "
                                      "(None: every row of the data).")
    value_init: Literal["policy", "reward_model"] = Field(
        "policy", description="Critic: a linear head on the policy's trunk, or a separate value "
        "model initialised from the reward model with the largest weight (InstructGPT).")
    reward_weights: dict[str, float] = Field(
        default_factory=dict, description="Weight of each `reward_model` route's score, by name "
        "(a route not listed: 1.0; `reward_model: STAGE` is the route `rm`).")
    verifier_weight: float = Field(
        1.0, ge=0, description="Weight of the verifier's 0/1 reward (0: reward models only; the "
        "verifier is still logged where rows have `domain` and `answer`).")
    missing_eos_penalty: float = Field(
        0.0, ge=0, description="Subtracted from the score of a sample cut at max_new_tokens "
        "without eos (TRL's missing_eos_penalty): an RM never saw such text in training.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        for name in self.domains or []:
            if name not in _domains.DOMAINS:
                raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")
        bad = {k: w for k, w in self.reward_weights.items() if not math.isfinite(w)}
        if bad:
            raise ValueError(f"reward_weights must be finite numbers: {bad}")
        if self.minibatches > self.prompts_per_step:
            raise ValueError(f"minibatches {self.minibatches} exceeds prompts_per_step "
                             f"{self.prompts_per_step}: a minibatch would be empty")
        return self


def trained_domains(config: dict[str, Any]) -> set[str] | None:
    """Kind hook: the domains this stage trains on (None: every row of its data)."""
    return set(config["domains"]) if config.get("domains") else None


def weights_of(routes: Mapping[str, Any], reward_weights: Mapping[str, float]) -> dict[str, float]:
    """RM route -> weight (1.0 unless listed).

    >>> weights_of({"help": "a", "safe": "b"}, {"safe": 0.5})
    {'help': 1.0, 'safe': 0.5}
    """
    return {name: float(reward_weights.get(name, 1.0)) for name in sorted(routes)}


def reward_problem(routes: Mapping[str, Any], config: Mapping[str, Any]
                   ) -> tuple[tuple[str, ...], str] | None:
    """(place, message) of the first reward rule a stage breaks, or None. Shared by the plan-time
    hook and the run-time preflight so both say the same thing."""
    weights = config.get("reward_weights") or {}
    for name in weights:
        if name not in routes:
            have = f"its routes are {', '.join(sorted(routes))}" if routes else "it has none"
            return (("reward_weights", name), f"{name!r} is not a `reward_model` route ({have}); "
                    f"name a route, or add `reward_model: {{{name}: STAGE}}`")
    if not any(weights_of(routes, weights).values()) and not config.get("verifier_weight", 1.0):
        place = ("reward_weights",) if routes else ("verifier_weight",)
        return place, ("ppo has no reward source: every reward model weighs 0 and so does the "
                       "verifier; add a `reward_model:` with a non-zero weight, or set "
                       "verifier_weight > 0")
    if config.get("value_init") == "reward_model" and not routes:
        return ("value_init",), ("value_init: reward_model needs a `reward_model:` input; add "
                                 "one or use value_init: policy")
    return None


def check(node: Node, nodes: Mapping[str, Node]) -> list[str]:
    """Kind hook, at plan time: some reward is left, `reward_weights` names real routes, the
    critic has an RM to start from, and the verifier's columns are in the data."""
    problem = reward_problem(dict(node.inputs.get("reward_model") or {}), node.config)
    if problem:
        raise KindCheckError(*problem)
    data = nodes.get((node.inputs.get("data") or {}).get("train", ""))
    cols = columns_of(data)
    lack = sorted({"answer", "domain"} - cols) if cols is not None else []
    if node.config.get("verifier_weight", 1.0) and lack and data is not None:
        raise KindCheckError(("verifier_weight",), f"the verifier reads `answer` and `domain`, "
                             f"but the rows of data stage {data.name!r} lack {', '.join(lack)}; "
                             "set verifier_weight: 0 (reward models only) or add the columns")
    return []


def preflight(config: Config, inputs: Inputs) -> tuple[list[dict], list[str]]:
    """Every check that must pass before a weight is loaded: (rows, warnings)."""
    from transformers import AutoConfig

    from tasks.data import data_file
    from tasks.models import load_tokenizer
    from tasks.rm_scoring import check_compatible
    from tasks.sft import init_ref, read_jsonl, require_columns

    init = init_ref(inputs)
    problem = reward_problem(dict(inputs.reward_model), config.model_dump())
    if problem:
        raise StageInputError(f"{'.'.join(problem[0])}: {problem[1]}")
    path = data_file(inputs)
    rows = read_jsonl(path)
    require_columns(rows, path, ("prompt",))
    if config.domains is not None:
        rows = [r for r in rows if r.get("domain") in config.domains]
        if not rows:
            raise StageInputError(f"{path} has no rows of domains {config.domains}")
    if config.verifier_weight:
        bad = next((r for r in rows if r.get("domain") not in _domains.DOMAINS
                    or not isinstance(r.get("answer"), str)), None)
        if bad is not None:
            raise StageInputError(f"{path}: verifier_weight > 0 needs a known `domain` and an "
                                  f"`answer` in every row; {bad['prompt']!r} lacks them. Fix: "
                                  "set verifier_weight: 0 or complete the data")
    tokenizer, policy_config = load_tokenizer(init.path), AutoConfig.from_pretrained(init.path)
    if inputs.reference is not None:
        check_compatible("reference", inputs.reference, tokenizer, policy_config)
    for name, ref in sorted(inputs.reward_model.items()):
        check_compatible(f"reward model {name!r}", ref, tokenizer, policy_config)
        labels = AutoConfig.from_pretrained(ref.path).num_labels
        if labels != 1:
            raise StageInputError(f"reward model {name!r} (stage {ref.stage!r}) has {labels} "
                                  "labels; a reward model has one (num_labels=1)")
    warnings = []
    if inputs.reference is not None and config.kl_coef == 0:
        warnings.append("a reference input was given but kl_coef == 0: it is not used")
    return rows, warnings


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps, warm-up and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "warmup_steps": 0, "eval_n": 10})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """PPO-train `init` against its reward sources for `max_steps` rollouts; save; evaluate."""
    import torch
    from accelerate import Accelerator

    from tasks import models, snapshots
    from tasks import resume as resume_mod
    from tasks.evaluate import evaluate
    from tasks.ppo_trainer import build, summary
    from tasks.rm_scoring import heldout_rm

    rows, warnings = preflight(config, inputs)  # raises before any weight is loaded
    assert inputs.init is not None
    models.quiet()
    tokenizer = models.load_tokenizer(inputs.init.path)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(config.seed)
    trainer = build(config, inputs, accelerator, tokenizer,
                    weights_of(inputs.reward_model, config.reward_weights))
    rng = random.Random(config.seed + accelerator.process_index)  # own prompts per process
    resume = resume_mod.current()
    history, first = resume_mod.restore(resume, trainer, rng)  # a killed attempt's state
    present = sorted({r.get("domain") for r in rows} & set(_domains.DOMAINS))
    snaps = snapshots.current()
    evaluator = snapshots.evaluator(tokenizer, present, config.eval_n)
    start = time.perf_counter()
    for step in range(first, config.max_steps + 1):
        point = trainer.step(rng.choices(rows, k=config.prompts_per_step))
        history.append({"step": step, **point})
        resume_mod.checkpoint(resume, step, config.max_steps, trainer, rng, history)
        snapshots.take(snaps, step, trainer.unwrapped().policy, tokenizer, point, evaluator)
        progress(step, config.max_steps, point)
    policy = trainer.unwrapped().policy
    policy.eval()
    scores: dict[str, float] = {}
    train = summary(history, config.max_steps, time.perf_counter() - start, trainer.tokens)
    if accelerator.is_main_process:
        models.save_model(policy, tokenizer, out_dir)
        if config.eval_n:
            scores = evaluate(policy, tokenizer, present, config.eval_n)
            held = heldout_rm(policy, tokenizer, present, config.eval_n, inputs.reward_model)
            train.update({f"heldout_rm/{name}": v for name, v in held.items()})
    return {"eval": scores, "train": train, "history": models.subsample(history),
            "warnings": warnings, "resumed_from_step": first - 1 if first > 1 else None}


def _ref(path: str, kind: str) -> ArtifactRef:
    return ArtifactRef(key=f"local:{path}", path=Path(path), kind=kind, stage=Path(path).name,
                       recipe="cli")


def _value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


if __name__ == "__main__":
    out, policy_dir, data_dir, *rest = sys.argv[1:]
    pairs = dict(a.split("=", 1) for a in rest)
    fields = {k: _value(v) for k, v in pairs.items() if k in Config.model_fields}
    ins = Inputs(init=_ref(policy_dir, "sft"), data={"train": _ref(data_dir, "data")},
                 reward_model={k: _ref(v, "reward_model") for k, v in pairs.items()
                               if k not in fields})
    result = run(Config(**fields), ins, Path(out),
                 lambda s, t, p: print(s, t, {k: round(v, 3) for k, v in p.items()}, flush=True))
    print({k: result[k] for k in ("eval", "train", "warnings")})
