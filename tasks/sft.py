"""Stage kind `sft`: supervised fine-tuning with TRL's SFTTrainer on prompt/completion rows.

Starts from the `init` model, trains on the `data` input's ``train.jsonl`` (prompt + completion;
TRL appends eos to the completion) with completion-only loss (the prompt tokens carry no loss),
then evaluates greedy held-out accuracy on every domain present in the data and saves the final
model and tokenizer as a plain HF directory. No checkpoints mid-run: the store keeps the result.

Departures from TRL defaults (why): fp32 and no gradient checkpointing (tiny model on CPU; TRL
defaults to bf16 + checkpointing for large GPU models), logging every step (the curve is the
`history` metric). Anything else TRL's SFTConfig accepts goes in `trainer: {...}`, e.g. the
demo's schedule, which ends the decay at lr 5e-4 instead of 0: ``lr_scheduler_type: polynomial``
+ ``trainer: {lr_scheduler_kwargs: {lr_end: 5.0e-4, power: 1.0}}``. A checkpoint annealed to lr 0
is knocked over by the first GRPO steps (bench/calibrate_stages.py has the measurements).

Run: ``python -m tasks.sft INIT_DIR DATA_DIR OUT_DIR [max_steps]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks.kind import Role, train_rows

PRODUCES = "model"
RESUMABLE = True  # `resume_every` works here: the HF Trainer checkpoints (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The model fine-tuned."),
    "data": train_rows("prompt", "completion",
                       description="Prompt/completion rows (completion-only loss)."),
}
# An sft stage starts an SFT lineage: teachers and students must share its key (tasks/compat.py).
STARTS_LINEAGE = True


class Config(BaseModel):
    """SFT hyper-parameters; `trainer` passes any other SFTConfig field through to TRL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(750, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    per_device_train_batch_size: int = Field(64, ge=1, description="Sequences per step.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    lr_scheduler_type: str = Field(
        "linear", description="transformers scheduler name (linear, cosine, constant, ...)."
    )
    max_length: int = Field(
        128, ge=8, description="Truncate prompt+completion to this many tokens."
    )
    seed: int = Field(0, description="Seed of data order and dropout.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain for evaluation.")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="Extra TRL SFTConfig fields, passed through as is."
    )

    @model_validator(mode="after")
    def _valid(self) -> Config:
        from tasks.models import check_passthrough

        check_passthrough(self.trainer, set(type(self).model_fields) - {"trainer", "eval_n"})
        return self


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file written by the `data` stage (StageInputError on a malformed line)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StageInputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    if not rows:
        raise StageInputError(f"{path} has no rows; regenerate the data stage")
    return rows


def require_columns(rows: list[dict], path: Path, columns: tuple[str, ...]) -> None:
    """StageInputError naming the first row (path:line) that lacks one of `columns`."""
    for lineno, row in enumerate(rows, 1):
        for col in columns:
            if not isinstance(row.get(col), str):
                raise StageInputError(
                    f"{path}:{lineno}: missing string field {col!r}; produce this file with the "
                    "`data` stage or add the field"
                )


def init_ref(inputs: Inputs) -> ArtifactRef:
    """The `init` input (required)."""
    if inputs.init is None:
        raise StageInputError("this stage needs an `init` model input; set `from:` in the recipe")
    return inputs.init


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps, warm-up and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "warmup_steps": 0, "eval_n": 10})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Fine-tune `init` on the data input; save to `out_dir`; return eval/train/history."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tasks import models, snapshots
    from tasks import resume as resume_mod
    from tasks.data import data_file
    from tasks.evaluate import evaluate

    models.quiet()
    path = data_file(inputs)
    rows = read_jsonl(path)
    require_columns(rows, path, ("prompt", "completion", "domain"))
    dataset = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    )
    eval_domains = sorted({r["domain"] for r in rows})

    init = init_ref(inputs)
    tokenizer = models.load_tokenizer(init.path)
    model = models.load_model(init.path)
    history: list[dict] = []
    keys = {
        "loss": "loss",
        "learning_rate": "learning_rate",
        "grad_norm": "grad_norm",
        "mean_token_accuracy": "token_accuracy",
        "num_tokens": "num_tokens",
    }
    callback = models.progress_callback(progress, config.max_steps, history, keys)
    work = out_dir / ".trainer"
    resume = resume_mod.current()
    args = {
        **models.trainer_defaults(work),
        "completion_only_loss": True,
        "packing": False,
        "max_length": config.max_length,
        "use_cpu": not torch.cuda.is_available(),
        **config.trainer,
        **config.model_dump(
            include={
                "max_steps",
                "learning_rate",
                "per_device_train_batch_size",
                "warmup_steps",
                "lr_scheduler_type",
                "seed",
            }
        ),
        **resume_mod.trainer_args(resume),  # checkpoints into the resume dir (resume_every)
    }
    try:
        sft_args = SFTConfig(**args)
    except (TypeError, ValueError) as e:
        raise StageInputError(f"invalid SFTConfig from the stage's `trainer` fields: {e}") from e
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=snapshots.with_snapshots([callback], tokenizer, history,
                                           eval_domains,
                                           config.eval_n),
    )
    models.silence_printer(trainer)
    start = time.perf_counter()
    checkpoint = resume_mod.last_checkpoint(resume)  # None: start from `init`
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start

    model = trainer.model
    models.save_model(model, tokenizer, out_dir)
    _remove(work)
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0.0)
    train = {
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "steps": float(trainer.state.global_step),
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "rows": float(len(rows)),
    }
    scores = evaluate(model, tokenizer, eval_domains, config.eval_n) if config.eval_n else {}
    return {"eval": scores, "train": train, "history": models.subsample(history),
            "resumed_from_step": resume_mod.resumed_step(checkpoint)}


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    init_dir, data_dir, out = (Path(a) for a in sys.argv[1:4])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 750

    def _ref(p: Path, kind: str) -> ArtifactRef:
        return ArtifactRef(key="0" * 64, path=p, kind=kind, stage=kind, recipe="cli")

    ins = Inputs(init=_ref(init_dir, "base"), data={"train": _ref(data_dir, "data")})
    print(run(Config(max_steps=steps), ins, out, lambda s, t, m: print(s, t, dict(m))))
