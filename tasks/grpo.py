"""Stage kind `grpo`: RL with verifiable rewards through TRL's GRPOTrainer.

Starts from `init`, samples `num_generations` completions per prompt of the `data` input (rows
with prompt/answer/domain, optionally filtered to `domains`: a specialist trains on one), and
scores each with ONE reward function that dispatches on the row's `domain` column to
`tasks.domains.reward` (TRL passes extra dataset columns to reward functions as kwargs). It logs
the mean reward per domain too, so a multi-domain run shows which domain moves. After training,
greedy held-out accuracy on `eval_domains` (default: every domain of the data input, so a
specialist's regressions elsewhere are visible) and the final model is saved.

`per_device_train_batch_size` counts completions (TRL's convention): 128 = 16 prompts x G=8.
`beta` is the KL-to-reference coefficient (TRL default 0: no reference model is built). With
beta > 0 the reference is the `reference` input when given, else the `init` model; it must share
the student's tokenizer (checked). vLLM generation (`use_vllm`) needs vllm importable and CUDA.

Rewards from reward models: `reward_model:` names one RM stage (route `rm`) or a map
{name: RM stage} (Llama 2's helpfulness and safety). Each RM is one more reward function, scored
on the text it was trained on (tasks/rm_scoring.py), weighted by `reward_weights[name]` (default
1.0) beside the verifier's `verifier_weight` (default 1.0; 0: RM only, the verifier is still
computed and logged). TRL sums the weighted rewards before the group advantage. The history keeps
the verifier's mean (`verifier`, the sampled accuracy) and each RM's raw mean score (`rm/<name>`)
apart, so an RM score that climbs while accuracy falls (reward hacking) shows. Every RM must share
the policy's tokenizer (checked before training). With no RM the reward is the verifier alone,
exactly as before.

Departures from TRL defaults (why): fp32 and no gradient checkpointing (tiny model, CPU);
logging every step (the reward curve is the `history` metric). Other GRPOConfig fields go in
`trainer: {...}`.

This module holds the config, the plan-time hooks and `run`; the reward function, its log keys
and the curves' summary are tasks/grpo_rewards.py, the checks around TRL tasks/grpo_checks.py.

Run: ``python -m tasks.grpo INIT_DIR DATA_DIR OUT_DIR DOMAIN [max_steps]``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.grpo_checks import align_resume, check_reference, check_vllm
from tasks.grpo_rewards import domain_reward, history_keys, train_metrics
from tasks.kind import KindCheckError, Node, Role, train_rows

PRODUCES = "model"
RESUMABLE = True  # `resume_every` works here: the HF Trainer checkpoints (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The policy trained."),
    "data": train_rows("prompt", "answer", "domain",
                       description="Prompts with answers, each judged by its domain's verifier."),
    "reference": Role("model", required=False, description="KL reference (beta > 0)."),
    "reward_model": Role("reward_model", required=False, many=True, default_name="rm",
                         description="Reward models scoring each sample beside the verifier: one "
                         "stage, or {name: stage}, weighted by `reward_weights`."),
}

_TRL_FIELDS = (
    "max_steps",
    "num_generations",
    "per_device_train_batch_size",
    "learning_rate",
    "beta",
    "loss_type",
    "max_completion_length",
    "temperature",
    "use_vllm",
    "seed",
)


class Config(BaseModel):
    """GRPO hyper-parameters; `trainer` passes any other GRPOConfig field through to TRL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(150, ge=1, description="Optimizer steps (one generation round each).")
    num_generations: int = Field(8, ge=2, description="Completions per prompt (group size G).")
    per_device_train_batch_size: int = Field(
        128, ge=2, description="Completions per step (prompts x num_generations)."
    )
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    beta: float = Field(0.0, ge=0, description="KL-to-reference coefficient (0: no reference).")
    loss_type: str = Field("dapo", description="TRL GRPO loss (dapo, grpo, dr_grpo, bnpo, ...).")
    max_completion_length: int = Field(8, ge=1, description="Max new tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    domains: list[str] | None = Field(
        None, description="Train only on rows of these domains (None: all rows of the data)."
    )
    eval_domains: list[str] | None = Field(
        None, description="Domains to evaluate after training (None: every domain in the data)."
    )
    use_vllm: bool = Field(False, description="Generate rollouts with vLLM (needs CUDA + vllm).")
    vllm_mode: Literal["server", "colocate"] = Field(
        "colocate", description="vLLM in this process (colocate) or a `trl vllm-serve` server."
    )
    vllm_server_base_url: str | None = Field(
        None, description="URL of the vLLM server (vllm_mode=server), e.g. http://host:8000."
    )
    seed: int = Field(0, description="Seed of prompt order and sampling.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain for evaluation.")
    reward_weights: dict[str, float] = Field(
        default_factory=dict, description="Weight of each `reward_model` route's score, by name "
        "(a route not listed: 1.0).")
    verifier_weight: float = Field(
        1.0, ge=0, description="Weight of the verifier's 0/1 reward (0: reward models only; "
        "the verifier is still logged).")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="Extra TRL GRPOConfig fields, passed through as is."
    )

    @model_validator(mode="after")
    def _valid(self) -> Config:
        from tasks.models import check_passthrough

        check_passthrough(self.trainer, set(type(self).model_fields) - {"trainer", "eval_n"})
        for name in (*(self.domains or []), *(self.eval_domains or [])):
            if name not in _domains.DOMAINS:
                raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size {self.per_device_train_batch_size} must be a "
                f"multiple of num_generations {self.num_generations}"
            )
        bad = {k: w for k, w in self.reward_weights.items() if not math.isfinite(w)}
        if bad:
            raise ValueError(f"reward_weights must be finite numbers: {bad}")
        return self


def trained_domains(config: dict[str, Any]) -> set[str] | None:
    """Kind hook: the domains this stage trains on (None: every row of its data)."""
    return set(config["domains"]) if config.get("domains") else None


def check(node: Node, nodes: Mapping[str, Node]) -> list[str]:
    """Kind hook, at plan time: every `reward_weights` name is a `reward_model` route, and
    some reward is left (verifier_weight 0 needs a reward model)."""
    routes = dict(node.inputs.get("reward_model") or {})
    for name in node.config.get("reward_weights") or {}:
        if name not in routes:
            have = f"its routes are {', '.join(sorted(routes))}" if routes else "it has none"
            raise KindCheckError(("reward_weights", name), f"{name!r} is not a `reward_model` "
                                 f"route ({have}); name a route, or add `reward_model: "
                                 f"{{{name}: STAGE}}`")
    if not routes and node.config.get("verifier_weight", 1.0) == 0:
        raise KindCheckError(("verifier_weight",), "verifier_weight 0 leaves no reward: add a "
                             "`reward_model:` or give the verifier a weight")
    return []


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "eval_n": 10})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """GRPO-train `init` on the data rows; save to `out_dir`; return eval/train/history."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tasks import models, snapshots
    from tasks import resume as resume_mod
    from tasks.data import data_file
    from tasks.evaluate import evaluate
    from tasks.rm_scoring import policy_rewards
    from tasks.sft import init_ref, read_jsonl, require_columns

    models.quiet()
    if config.use_vllm:
        check_vllm(config)
    path = data_file(inputs)
    rows = read_jsonl(path)
    require_columns(rows, path, ("prompt", "answer", "domain"))
    present = sorted({r["domain"] for r in rows})
    if config.domains is not None:
        rows = [r for r in rows if r["domain"] in config.domains]
        if not rows:
            raise StageInputError(
                f"{path} has no rows of domains {config.domains}; it has {present}"
            )
    unknown = sorted({r["domain"] for r in rows} - set(_domains.DOMAINS))
    if unknown:
        raise StageInputError(f"{path}: rows of unknown domains {unknown} have no verifier")
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "answer": r["answer"], "domain": r["domain"]} for r in rows]
    )

    init = init_ref(inputs)
    tokenizer = models.load_tokenizer(init.path)
    model = models.load_model(init.path)
    warnings: list[str] = []
    if inputs.reference is not None:
        if config.beta > 0:
            check_reference(inputs.reference, init, model)
            # TRL builds its reference model from config._name_or_path; point it at ours.
            model.config._name_or_path = str(inputs.reference.path)
        else:
            warnings.append("a reference input was given but beta == 0: it is not used")
    reward_funcs, reward_weights, rm_keys = policy_rewards(
        domain_reward, inputs.reward_model, config.reward_weights, config.verifier_weight,
        tokenizer, model.config)

    history: list[dict] = []
    callback = models.progress_callback(progress, config.max_steps, history,
                                        history_keys(rm_keys))
    work = out_dir / ".trainer"
    resume = resume_mod.current()
    args = {
        **models.trainer_defaults(work),
        "use_cpu": not torch.cuda.is_available(),
        **({"vllm_mode": config.vllm_mode} if config.use_vllm else {}),
        **(
            {"vllm_server_base_url": config.vllm_server_base_url}
            if config.use_vllm and config.vllm_server_base_url
            else {}
        ),
        **config.trainer,
        **config.model_dump(include=set(_TRL_FIELDS)),
        **({"reward_weights": reward_weights} if reward_weights else {}),
        **resume_mod.trainer_args(resume),  # checkpoints into the resume dir (resume_every)
    }
    try:
        grpo_args = GRPOConfig(**args)
    except (TypeError, ValueError) as e:
        raise StageInputError(f"invalid GRPOConfig from the stage's fields: {e}") from e
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=snapshots.with_snapshots([callback], tokenizer, history,
                                           config.eval_domains or present,
                                           config.eval_n),
    )
    models.silence_printer(trainer)
    start = time.perf_counter()
    checkpoint = resume_mod.last_checkpoint(resume)  # None: start from `init`
    if resume is not None:
        align_resume(trainer, resume.every, resume_mod.resumed_step(checkpoint))
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    model = trainer.model
    model.config._name_or_path = str(out_dir)
    models.save_model(model, tokenizer, out_dir)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    train = train_metrics(history, rm_keys, trainer.state.global_step, seconds, len(rows))
    eval_domains = config.eval_domains if config.eval_domains is not None else present
    scores = evaluate(model, tokenizer, eval_domains, config.eval_n) if config.eval_n else {}
    metrics: dict = {"eval": scores, "train": train, "history": models.subsample(history),
                     "resumed_from_step": resume_mod.resumed_step(checkpoint)}
    if warnings:
        metrics["warnings"] = warnings
    return metrics


if __name__ == "__main__":
    init_dir, data_dir, out = (Path(a) for a in sys.argv[1:4])
    dom = sys.argv[4] if len(sys.argv) > 4 else "arith"
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 150

    def _ref(p: Path, kind: str) -> ArtifactRef:
        return ArtifactRef(key="0" * 64, path=p, kind=kind, stage=kind, recipe="cli")

    ins = Inputs(init=_ref(init_dir, "sft"), data={"train": _ref(data_dir, "data")})
    print(
        run(Config(max_steps=steps, domains=[dom]), ins, out, lambda s, t, m: print(s, t, dict(m)))
    )
