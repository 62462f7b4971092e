"""Stage kind `mopd`: multi-teacher on-policy distillation, one round, on torch + accelerate.

Each step the student (``init``) samples one completion per prompt (``prompts_per_route`` prompts
for every value of ``route_key`` in the data, temperature ``temperature``); the teacher routed to
each prompt scores the student's tokens; the student then takes one optimizer step per minibatch
on the loss of tasks/mopd_loss.py (sampled-token advantage log p_T - log p_old with MiMo's IS
gate, or the exact / top-k reverse KL). Before anything trains, tasks/compat.py refuses teachers
with another tokenizer or padded vocab size, and teachers from another SFT lineage unless
``allow_cross_lineage``. A route may name a schedule of teachers (progressive distillation from
one teacher's snapshots, `switch_at`: tasks/mopd_schedule.py); the stage publishes snapshots
of its own student (`snapshots:`, tasks/snapshots.py). Rounds (Nemotron 3 Ultra) are separate
stages, chained by the recipe.

Logged per step: ``kl/<route>`` (exact per-token reverse KL of the rollout student to that
route's teacher, averaged over the sampled states), ``kl``, ``is_drop_rate``, ``reward/<value>``
(verifier accuracy of the student's own samples), ``loss``, ``grad_norm``, ``tokens_per_s``
(generated completion tokens through eos, per second of the whole step).

This module holds the config, the plan-time checks and `run`; the checks before training are
tasks/mopd_routes.py, the loop tasks/mopd_trainer.py, sampling and scoring tasks/rollout.py, the
math tasks/mopd_loss.py.

Speed (bench/mopd_vs_trl.py): every forward runs on a chunk of one route's rows, sorted by prompt
length, with all-padding columns cut (rollout.view); with one minibatch the student's forward is
shared by the loss and log p_old (no separate scoring pass); sampling is our own KV-cached loop.
On the tiny demo models that makes a step 1.12-1.20x TRL's DistillationTrainer and as fast as
the three passes (sample, student forward + backward, teacher forward) timed alone.

Departures from the papers: no vLLM / inference servers (teachers run in the trainer's process,
sampling is HF-model based); the outcome reward is centered over the batch, not a group; a
weighted mixture of teachers per sample (AReaL) is not offered, each sample has one teacher.

Run: ``python -m tasks.mopd OUT STUDENT_DIR DATA_DIR route=TEACHER_DIR [...] [key=value ...]``,
e.g. ``python -m tasks.mopd /tmp/mopd /tmp/calib/sft /tmp/calib/data arith=/tmp/calib/rl_arith
max_steps=20`` (config keys are Config fields).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, no_progress
from tasks.kind import (
    KindCheckError,
    Node,
    Role,
    columns_of,
    route_values_of,
    train_rows,
    trained_domains_of,
)
from tasks.mopd_routes import (
    check_teachers,
    preflight,
    route_table,  # noqa: F401  (re-exported: tests/test_mopd.py reads mopd.route_table)
)
from tasks.mopd_routes import (  # noqa: F401  (re-exported for tests/test_kind_contract.py)
    rows_by_value as _rows_by_value,
)

PRODUCES = "model"
RESUMABLE = True  # `resume_every` works here: its loop snapshots itself (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The student (and its sampler)."),
    "teachers": Role("model", many=True, schedule=True, description="route -> teacher that "
                     "scores the student's samples of that route, or a schedule of teachers "
                     "(progressive: [rl@125, rl@250, rl], tasks/mopd_schedule.py)."),
    "data": train_rows("prompt",
                       description="Prompts; the `route_key` column picks each row's teacher."),
}


class Config(BaseModel):
    """One round of multi-teacher on-policy distillation into the `init` student."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(
        450, ge=1, le=1_000_000, description="Rollouts (one optimizer step each per minibatch)."
    )
    prompts_per_route: int = Field(
        16, ge=1, le=65_536, description="Prompts per route value (e.g. per domain) per step."
    )
    learning_rate: float = Field(
        1e-4, gt=0, le=1, description="AdamW learning rate (constant after warm-up). On the demo "
        "3e-4 drifted away from the teachers (greedy sort accuracy -8 to -14 points) and 1e-3 "
        "collapsed; 1e-4 lowered the KL steadily."
    )
    warmup_steps: int = Field(
        20, ge=0, description="Linear learning-rate warm-up (optimizer steps). Adam's first steps "
        "move every weight by ~lr whatever the gradient; unwarmed, one step at 3e-4 cost the "
        "demo's SFT student 9 points."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_new_tokens: int = Field(8, ge=1, le=65_536, description="Longest sampled completion.")
    temperature: float = Field(
        1.0, gt=0, le=10, description="Sampling temperature; log-probs of student and teachers "
        "are taken at the same temperature."
    )
    is_low: float = Field(0.5, gt=0, le=1, description="IS gate: drop tokens with p/p_old below.")
    is_high: float = Field(2.0, ge=1, description="IS gate: drop tokens with p/p_old above.")
    estimator: Literal["sampled_token", "full_vocab", "top_k"] = Field(
        "sampled_token", description="Reverse-KL estimator: one-sample advantage, exact sum "
        "over the vocabulary, or student top-k tokens plus a tail bin."
    )
    top_k: int = Field(16, ge=1, description="k of the top_k estimator.")
    orm_weight: float = Field(
        0.0, ge=0, le=100, description="alpha: weight of the batch-centered verifier reward "
        "added to every token's advantage (0: pure distillation)."
    )
    route_key: str = Field("domain", min_length=1, description="Data field that picks the teacher.")
    unmapped: str = Field(
        "error", pattern=r"^(error|default:.+)$", description="Route value with no teacher: "
        "'error' refuses the run; 'default:<route>' sends it to that teacher."
    )
    route_checks: Literal["error", "warn"] = Field(
        "error", description="Teachers that would get no rows (no data row has their route) "
        "or that trained on other domains than their route: refused when the recipe is planned "
        "(error), or planned with a warning that the manifest keeps (warn)."
    )
    allow_cross_lineage: bool = Field(
        False, description="Accept teachers whose sft_root differs from the student's (warns)."
    )
    minibatches: int = Field(
        1, ge=1, le=64, description="Optimizer steps per rollout batch; > 1 reuses samples "
        "slightly off-policy, which the IS gate then guards."
    )
    seed: int = Field(0, ge=0, description="Seed of prompt draws and sampling.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain (0: skip eval).")
    switch_at: list[int] | dict[str, list[int]] | None = Field(
        None, description="Teacher schedules: the first steps of phases 2..n, for every "
        "scheduled route (a list) or per route ({route: [steps]}); None: equal fractions of "
        "max_steps."
    )
    accelerate_config: str | None = Field(
        None, description="DeepSpeed JSON config handed to accelerate (None: plain accelerate)."
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.is_low >= self.is_high:
            raise ValueError(f"is_low {self.is_low} must be below is_high {self.is_high}")
        return self


def check(node: Node, nodes: Mapping[str, Node]) -> list[str]:
    """Kind hook, at plan time: the data has the routing column, every route value has a
    teacher, every teacher gets rows, and no teacher was trained on other domains than its route.
    Returns warnings (route_checks: warn); raises KindCheckError with the YAML place otherwise."""
    from tasks import mopd_schedule

    mopd_schedule.check(dict(node.inputs.get("teachers") or {}), node.config.get("switch_at"),
                        int(node.config.get("max_steps", 1)))
    by_route = mopd_schedule.phases(node.parents("teachers"))  # schedules: one per route
    teachers = {r: node.parents("teachers")[names[-1]] for r, names in by_route.items()}
    key, unmapped = node.config.get("route_key", "domain"), node.config.get("unmapped", "error")
    default = unmapped[len("default:"):] if unmapped.startswith("default:") else None
    if default is not None and default not in teachers:
        raise KindCheckError(("unmapped",), f"default route {default!r} is not a teacher route "
                             f"({', '.join(teachers)})")
    data = nodes.get((node.inputs.get("data") or {}).get("train", ""))
    cols = columns_of(data)
    if data is not None and cols is not None and key not in cols:
        raise KindCheckError(("route_key",), f"the rows of data stage {data.name!r} have no "
                             f"column {key!r} to route on (they have {', '.join(sorted(cols))}); "
                             "fix `route_key` or add the column to every row")
    values = route_values_of(data, key)
    problems: list[tuple[tuple[str, ...], str]] = []
    if values is not None:
        missing = sorted(values - set(teachers))
        if missing and default is None:
            raise KindCheckError(("teachers",), f"no teacher for route(s) {', '.join(missing)} "
                                 f"of the routing key {key!r} in its data; add them to teachers, "
                                 "or set unmapped: default:<route>")
        idle = sorted(set(teachers) - values - {default})
        if idle:
            problems.append((("teachers", idle[0]), f"teachers {idle} get no rows: no row of "
                             f"data stage {data.name!r} has their {key!r} "
                             f"({', '.join(sorted(values))}); they would train for nothing. "
                             "Remove them, or set route_checks: warn"))
    for route, stage in sorted(teachers.items()):
        trained = trained_domains_of(nodes.get(stage)) if key == "domain" else None
        if trained is not None and route not in trained:
            problems.append((("teachers", route), f"teacher {stage!r} for route {route!r} trains "
                             f"only on domains {sorted(trained)}: {route} prompts would be "
                             f"distilled from a specialist of other domains. Point the route at "
                             "a stage trained on it, or set route_checks: warn"))
    if problems and node.config.get("route_checks", "error") == "error":
        raise KindCheckError(*problems[0])
    return [msg.rsplit(". ", 1)[0] for _, msg in problems]


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps, warm-up, prompts per route
    and evaluation; `switch_at` steps keep their place in the shorter run."""
    from tasks.kind import scaled

    out = scaled(config, factor, {"max_steps": 1, "warmup_steps": 0, "prompts_per_route": 4,
                                  "eval_n": 10})
    full, small, sw = config.get("max_steps"), out.get("max_steps"), config.get("switch_at")
    if sw and isinstance(full, int) and isinstance(small, int) and small != full:
        def move(steps: list[int]) -> list[int]:
            return [max(2, min(small, round(s * small / full))) for s in steps]

        out["switch_at"] = move(sw) if isinstance(sw, list) else \
            {r: move(v) for r, v in sw.items()}
    return out


def run(
    config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress
) -> dict:
    """Distil the teachers into the student for `max_steps` rollouts; save; evaluate."""
    import torch

    from tasks import domains as _domains
    from tasks import models, mopd_schedule, snapshots
    from tasks import resume as resume_mod
    from tasks.evaluate import evaluate
    from tasks.mopd_trainer import Trainer, accelerator_for, train_metrics

    by_value, table, warnings = preflight(config, inputs)  # raises before any weight is loaded
    models.quiet()
    assert inputs.init is not None
    tokenizer = models.load_tokenizer(inputs.init.path)
    accelerator = accelerator_for(config)
    torch.manual_seed(config.seed)
    student = models.load_model(inputs.init.path)
    used = sorted(set(table.values()))
    schedule = mopd_schedule.build(config, inputs, accelerator.device, warnings, check_teachers)
    trainer = Trainer(config, accelerator, student, {}, tokenizer, table)
    rng = random.Random(config.seed + accelerator.process_index)  # own prompts per process
    resume = resume_mod.current()
    history, first = resume_mod.restore(resume, trainer, rng)  # a killed attempt's state
    snaps = snapshots.current()
    evaluator = snapshots.evaluator(tokenizer, sorted({r.get("domain") for rs in by_value.values()
                                                       for r in rs} & set(_domains.DOMAINS)),
                                    config.eval_n)
    start = time.perf_counter()
    for step in range(first, config.max_steps + 1):
        schedule.apply(step, trainer.teachers, used)  # a phase's teacher, at its first step
        k = config.prompts_per_route
        rows = [r for v in sorted(by_value) for r in rng.choices(by_value[v], k=k)]
        point = trainer.step(rows)
        history.append({"step": step, **point})
        resume_mod.checkpoint(resume, step, config.max_steps, trainer, rng, history)
        snapshots.take(snaps, step, trainer.unwrapped(), tokenizer, point, evaluator)
        progress(step, config.max_steps, point)
    seconds = time.perf_counter() - start
    student = trainer.unwrapped()
    student.eval()
    seen = {r.get("domain") for rs in by_value.values() for r in rs}
    present = sorted(seen & set(_domains.DOMAINS))
    scores: dict[str, float] = {}
    if accelerator.is_main_process:
        models.save_model(student, tokenizer, out_dir)
        scores = evaluate(student, tokenizer, present, config.eval_n) if config.eval_n else {}
    train = train_metrics(trainer, history, seconds, config.max_steps, table, schedule.record())
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


def _print(step: int, total: int, point: Any) -> None:
    print(step, total, {k: round(v, 3) for k, v in point.items()}, flush=True)


if __name__ == "__main__":
    out, student_dir, data_dir, *rest = sys.argv[1:]
    pairs = dict(a.split("=", 1) for a in rest)
    cfg = Config(**{k: _value(v) for k, v in pairs.items() if k in Config.model_fields})
    ins = Inputs(
        init=_ref(student_dir, "sft"),
        teachers={k: _ref(v, "grpo") for k, v in pairs.items() if k not in Config.model_fields},
        data={"train": _ref(data_dir, "data")},
    )
    result = run(cfg, ins, Path(out), _print)
    print({k: result[k] for k in ("eval", "train", "warnings")})
