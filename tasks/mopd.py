"""Stage kind `mopd`: multi-teacher on-policy distillation, one round, on torch + accelerate.

Each step the student (``init``) samples one completion per prompt (``prompts_per_route`` prompts
for every value of ``route_key`` in the data, temperature ``temperature``); the teacher routed to
each prompt scores the student's tokens; the student then takes one optimizer step per minibatch
on the loss of tasks/mopd_loss.py (sampled-token advantage log p_T - log p_old with MiMo's IS
gate, or the exact / top-k reverse KL). Before anything trains, tasks/compat.py refuses teachers
with another tokenizer or padded vocab size, and teachers from another SFT lineage unless
``allow_cross_lineage``. Rounds (Nemotron 3 Ultra) are separate stages, chained by the recipe.

Logged per step: ``kl/<route>`` (exact per-token reverse KL of the rollout student to that
route's teacher, averaged over the sampled states), ``kl``, ``is_drop_rate``, ``reward/<value>``
(verifier accuracy of the student's own samples), ``loss``, ``grad_norm``, ``tokens_per_s``
(generated completion tokens through eos, per second of the whole step).

Departures from the papers: sampling is our own KV-cached loop (no vLLM here, and HF ``generate``
adds ~25% per-token overhead at this size); the outcome reward is centered over the batch, not a
group; teachers run in the trainer's process (no separate inference servers); a weighted mixture
of teachers per sample (AReaL) is not offered, each sample has exactly one teacher.

Run: ``python -m tasks.mopd OUT STUDENT_DIR DATA_DIR route=TEACHER_DIR [...] [key=value ...]``,
e.g. ``python -m tasks.mopd /tmp/mopd /tmp/calib/sft /tmp/calib/data arith=/tmp/calib/rl_arith
max_steps=20`` (config keys are Config fields).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress

PRODUCES = "model"
ROLES: dict[str, str] = {"init": "required", "teachers": "required", "data": "required"}


class Config(BaseModel):
    """One round of multi-teacher on-policy distillation into the `init` student."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(250, ge=1, le=1_000_000, description="Optimizer rounds (rollouts).")
    prompts_per_route: int = Field(
        16, ge=1, le=65_536, description="Prompts per route value (e.g. per domain) per step."
    )
    learning_rate: float = Field(
        3e-4, gt=0, le=1, description="AdamW learning rate (constant); 1e-3 collapsed the demo."
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
    allow_cross_lineage: bool = Field(
        False, description="Accept teachers whose sft_root differs from the student's (warns)."
    )
    minibatches: int = Field(
        1, ge=1, le=64, description="Optimizer steps per rollout batch; > 1 reuses samples "
        "slightly off-policy, which the IS gate then guards."
    )
    seed: int = Field(0, ge=0, description="Seed of prompt draws and sampling.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain (0: skip eval).")
    accelerate_config: str | None = Field(
        None, description="DeepSpeed JSON config handed to accelerate (None: plain accelerate)."
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.is_low >= self.is_high:
            raise ValueError(f"is_low {self.is_low} must be below is_high {self.is_high}")
        return self


def route_table(values: list[str], routes: list[str], unmapped: str) -> dict[str, str]:
    """Route value -> teacher route, refusing (or defaulting) values without a teacher.

    >>> route_table(["arith", "count"], ["arith"], "default:arith")
    {'arith': 'arith', 'count': 'arith'}
    """
    default = unmapped.removeprefix("default:") if unmapped != "error" else None
    if default is not None and default not in routes:
        raise StageInputError(
            f"unmapped: {unmapped!r} names no teacher; known routes: {sorted(routes)}"
        )
    missing = sorted(v for v in values if v not in routes)
    if missing and default is None:
        raise StageInputError(
            f"data has route values {missing} with no teacher; known routes: {sorted(routes)}. "
            "Fix: add a teacher for each, or set `unmapped: default:<route>`."
        )
    return {v: v if v in routes else str(default) for v in values}


def _rows_by_value(inputs: Inputs, key: str) -> dict[str, list[dict]]:
    import json

    from tasks.data import data_file

    by_value: dict[str, list[dict]] = {}
    path = data_file(inputs)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if key not in row:
                raise StageInputError(
                    f"{path}:{lineno}: no field {key!r} to route on; fix `route_key`"
                )
            by_value.setdefault(str(row[key]), []).append(row)
    return by_value


def _fingerprint(path: Path) -> dict:
    from transformers import AutoConfig

    from tasks.models import load_tokenizer, tokenizer_fingerprint

    return tokenizer_fingerprint(load_tokenizer(path), AutoConfig.from_pretrained(str(path)))


def preflight(config: Config, inputs: Inputs) -> tuple[dict[str, list[dict]], dict, list[str]]:
    """Every check that must pass before training: (rows by route value, route table, warnings)."""
    if inputs.init is None or not inputs.teachers:
        raise StageInputError("mopd needs an `init` student and at least one teacher")
    by_value = _rows_by_value(inputs, config.route_key)
    table = route_table(sorted(by_value), sorted(inputs.teachers), config.unmapped)
    student_fp = _fingerprint(Path(inputs.init.path))
    from tasks.compat import check_lineage, check_tokenizers

    fps = {r: _fingerprint(Path(t.path)) for r, t in inputs.teachers.items()}
    check_tokenizers(student_fp, fps)
    warnings = check_lineage(inputs.init, inputs.teachers, config.allow_cross_lineage)
    if config.orm_weight:
        from tasks.domains import DOMAINS

        bad = sorted({v for v, rs in by_value.items() for r in rs
                      if r.get("domain") not in DOMAINS or not isinstance(r.get("answer"), str)})
        if bad:
            raise StageInputError(
                f"orm_weight > 0 needs a known `domain` and an `answer` in every row; rows of "
                f"route values {bad} lack them. Fix: set orm_weight: 0 or complete the data."
            )
    idle = sorted(set(inputs.teachers) - set(table.values()))
    if idle:
        warnings.append(f"teachers {idle} get no data (no row has their {config.route_key!r})")
    return by_value, table, warnings


def _accelerator(config: Config) -> Any:
    import torch
    from accelerate import Accelerator

    if config.accelerate_config is None:
        return Accelerator(cpu=not torch.cuda.is_available())
    if not Path(config.accelerate_config).is_file():
        raise StageInputError(f"accelerate_config {config.accelerate_config} does not exist")
    from accelerate.utils import DeepSpeedPlugin  # needs `pip install deepspeed` (extra "gpu")

    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config.accelerate_config))


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


class Trainer:
    """The MOPD loop around one student and its teacher panel: collect a batch, update on it."""

    def __init__(
        self,
        config: Config,
        accelerator: Any,
        student: Any,
        teachers: dict[str, Any],
        tokenizer: Any,
        table: dict[str, str],
    ) -> None:
        import torch

        self.config, self.acc, self.tok, self.table = config, accelerator, tokenizer, table
        for teacher in teachers.values():
            teacher.eval().requires_grad_(False)
        self.teachers = teachers
        opt = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0)
        self.student, self.opt = accelerator.prepare(student, opt)
        self.gen = torch.Generator(device=accelerator.device).manual_seed(config.seed)
        self.tokens = 0

    def unwrapped(self) -> Any:
        """The bare student module (for sampling, saving and evaluation)."""
        return self.acc.unwrap_model(self.student)

    def collect(self, rows: list[dict]) -> dict[str, Any]:
        """Sample one completion per row, route each row to its teacher, score, verify."""
        import torch

        from tasks import domains as _domains
        from tasks import mopd_loss as L

        cfg, dev, model = self.config, self.acc.device, self.unwrapped()
        model.eval()
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            enc = self.tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = side
        rollout = L.sample(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                           cfg.max_new_tokens, cfg.temperature, self.tok.eos_token_id,
                           self.tok.pad_token_id, self.gen)
        values = [str(r[cfg.route_key]) for r in rows]
        by_route: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            by_route.setdefault(self.table[value], []).append(i)
        groups = {r: torch.tensor(ix, device=dev) for r, ix in sorted(by_route.items())}
        scored = L.score(model, self.teachers, rollout, groups, cfg.temperature,
                         keep_full=cfg.estimator != "sampled_token")
        texts = self.tok.batch_decode(rollout.tokens.tolist(), skip_special_tokens=True)
        rewards = [
            _domains.reward(r["domain"], text, r["answer"])
            if r.get("domain") in _domains.DOMAINS and isinstance(r.get("answer"), str)
            else float("nan")
            for r, text in zip(rows, texts, strict=True)
        ]
        return {"rollout": rollout, "scored": scored, "groups": groups, "values": values,
                "rewards": torch.tensor(rewards, device=dev)}

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """`minibatches` optimizer steps on one collected batch; returns loss statistics."""
        import torch

        from tasks import mopd_loss as L

        cfg, rollout, scored = self.config, batch["rollout"], batch["scored"]
        orm = L.orm_advantage(batch["rewards"], cfg.orm_weight) if cfg.orm_weight else None
        self.student.train()
        size = rollout.tokens.shape[0]
        sums = {"tokens": 0.0, "dropped": 0.0, "loss_sum": 0.0}
        norms = []
        for j in range(cfg.minibatches):
            idx = torch.arange(j, size, cfg.minibatches, device=rollout.tokens.device)
            logits = L.completion_logits(self.student, rollout, idx)
            full = scored.teacher_logp_full
            loss_sum, stats = L.mopd_loss(
                logits, rollout.tokens[idx], rollout.mask[idx], scored.old_logp[idx],
                scored.teacher_logp[idx], None if full is None else full[idx],
                estimator=cfg.estimator, temperature=cfg.temperature, is_low=cfg.is_low,
                is_high=cfg.is_high, top_k=cfg.top_k, orm_adv=None if orm is None else orm[idx],
            )
            self.acc.backward(loss_sum / max(stats["tokens"], 1.0))
            norms.append(float(self.acc.clip_grad_norm_(self.student.parameters(),
                                                        cfg.max_grad_norm)))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            for k in sums:
                sums[k] += stats[k]
        n = max(sums["tokens"], 1.0)
        return {"loss": sums["loss_sum"] / n, "is_drop_rate": sums["dropped"] / n,
                "grad_norm": _mean(norms)}

    def step(self, rows: list[dict]) -> dict[str, float]:
        """One rollout + update; the metrics point logged for this step."""
        start = time.perf_counter()
        batch = self.collect(rows)
        point = self.update(batch)
        tokens = float(batch["rollout"].mask.sum())
        self.tokens += int(tokens)
        kl = batch["scored"].kl
        sizes = {r: float(batch["rollout"].mask[ix].sum()) for r, ix in batch["groups"].items()}
        point["kl"] = sum(kl[r] * sizes[r] for r in kl) / max(sum(sizes.values()), 1.0)
        point.update({f"kl/{r}": v for r, v in kl.items()})
        rewards = batch["rewards"].tolist()
        for value in sorted(set(batch["values"])):
            got = [x for v, x in zip(batch["values"], rewards, strict=True) if v == value]
            if got and got[0] == got[0]:  # nan: no verifier for this row
                point[f"reward/{value}"] = _mean(got)
        point["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        return point


def run(
    config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress
) -> dict:
    """Distil the teachers into the student for `max_steps` rollouts; save; evaluate."""
    import torch

    from tasks import domains as _domains
    from tasks import models
    from tasks.evaluate import evaluate

    by_value, table, warnings = preflight(config, inputs)  # raises before any weight is loaded
    models.quiet()
    assert inputs.init is not None
    tokenizer = models.load_tokenizer(inputs.init.path)
    accelerator = _accelerator(config)
    torch.manual_seed(config.seed)
    student = models.load_model(inputs.init.path)
    used = sorted(set(table.values()))
    teachers = {r: models.load_model(inputs.teachers[r].path).to(accelerator.device) for r in used}
    trainer = Trainer(config, accelerator, student, teachers, tokenizer, table)
    rng = random.Random(config.seed)
    history: list[dict] = []
    start = time.perf_counter()
    for step in range(1, config.max_steps + 1):
        k = config.prompts_per_route
        rows = [r for v in sorted(by_value) for r in rng.choices(by_value[v], k=k)]
        point = trainer.step(rows)
        history.append({"step": step, **point})
        progress(step, config.max_steps, point)
    seconds = time.perf_counter() - start
    student = trainer.unwrapped()
    student.eval()
    models.save_model(student, tokenizer, out_dir)
    seen = {r.get("domain") for rs in by_value.values() for r in rs}
    present = sorted(seen & set(_domains.DOMAINS))
    scores = evaluate(student, tokenizer, present, config.eval_n) if config.eval_n else {}
    head, tail = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10) :]
    train: dict[str, Any] = {
        "steps": config.max_steps,
        "seconds": seconds,
        "tokens": trainer.tokens,
        "tokens_per_s": trainer.tokens / max(seconds, 1e-9),
        "is_drop_rate": _mean([h["is_drop_rate"] for h in history]),
        "routes": table,
    }
    for key in sorted(k for k in history[-1] if k.startswith("kl/")):
        # first / last tenth of the run: single steps are too noisy to compare
        train[f"{key}/first"] = _mean([h[key] for h in head if key in h])
        train[f"{key}/last"] = _mean([h[key] for h in tail if key in h])
    return {"eval": scores, "train": train, "history": models.subsample(history),
            "warnings": warnings}


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
