"""Stage kind `dpo`: direct preference optimisation with TRL's DPOTrainer.

Starts from the `init` policy and trains on the `data` input's ``prompt``/``chosen``/``rejected``
rows (TRL appends eos to both answers; the loss reads the answer tokens only). The reference
model of the DPO loss is the `init` model, frozen, unless `reference:` names another model; a
reference must share the policy's tokenizer (checked before training, like every model a stage
consumes). After training, greedy held-out accuracy on `eval_domains` (default: every known
domain of the pairs) as for every model stage, and the final model is saved.

`beta` is DPO's KL coefficient (TRL default 0.1: higher stays closer to the reference);
`loss_type` any of TRL's DPO losses (sigmoid, ipo, hinge, robust, apo_zero, ...). `sft_weight`
adds TRL's NLL loss on the chosen answer (RPO; Llama 3 adds it to DPO): pure DPO lowers the
likelihood of the chosen answers too ("likelihood displacement"), and with near-miss pairs that
cost held-out accuracy here (measured in the issue note).

Departures from TRL defaults (why): fp32, no gradient checkpointing (tiny model, CPU), logging
every step (the curve is the `history` metric), learning rate 1e-4 (TRL's 1e-6 is for billion
parameter models; it does not move a 0.7M one in a few hundred steps). Other DPOConfig fields go
in `trainer: {...}`.

Run: ``python -m tasks.dpo INIT_DIR DATA_DIR OUT_DIR [max_steps]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.kind import Role, train_rows

PRODUCES = "model"
RESUMABLE = True  # `resume_every` works here: the HF Trainer checkpoints (tasks/resume.py)
SNAPSHOTS = True  # `snapshots` / `snapshot_every`: published while it trains
ROLES = {
    "init": Role("model", description="The policy trained (also the reference by default)."),
    "data": train_rows("prompt", "chosen", "rejected",
                       description="Preference pairs: chosen should become likelier than "
                       "rejected."),
    "reference": Role("model", required=False,
                      description="The DPO reference model (default: the init model)."),
}

_TRL_FIELDS = ("max_steps", "learning_rate", "per_device_train_batch_size", "warmup_steps",
               "lr_scheduler_type", "beta", "loss_type", "max_length", "seed")


class Config(BaseModel):
    """DPO hyper-parameters; `trainer` passes any other DPOConfig field through to TRL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    per_device_train_batch_size: int = Field(32, ge=1, description="Pairs per step.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    lr_scheduler_type: str = Field(
        "linear", description="transformers scheduler name (linear, cosine, constant, ...).")
    beta: float = Field(0.1, gt=0, description="DPO KL coefficient (higher: closer to the "
                        "reference).")
    loss_type: str = Field("sigmoid", description="TRL DPO loss (sigmoid, ipo, hinge, robust, "
                           "apo_zero, ...).")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an NLL loss on the chosen "
                              "answer beside the DPO loss (RPO); 0: pure DPO.")
    max_length: int = Field(128, ge=8, description="Truncate prompt+answer to this many tokens.")
    seed: int = Field(0, description="Seed of data order and dropout.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain for evaluation.")
    eval_domains: list[str] | None = Field(
        None, description="Domains to evaluate (None: every known domain in the pairs).")
    trainer: dict[str, Any] = Field(
        default_factory=dict, description="Extra TRL DPOConfig fields, passed through as is.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        from tasks.models import check_passthrough

        check_passthrough(self.trainer, set(type(self).model_fields)
                          - {"trainer", "eval_n", "eval_domains"})
        for name in self.eval_domains or []:
            if name not in _domains.DOMAINS:
                raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")
        return self


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks steps, warm-up and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "warmup_steps": 0, "eval_n": 10})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """DPO-train `init` on the pairs; save to `out_dir`; return eval/train/history."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tasks import models, snapshots
    from tasks import resume as resume_mod
    from tasks.data import data_file
    from tasks.evaluate import evaluate
    from tasks.rm_scoring import check_compatible
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
    model = models.load_model(init.path)
    ref_model = None
    if inputs.reference is not None:
        check_compatible(f"reference {inputs.reference.stage!r}", inputs.reference, tokenizer,
                         model.config)
        ref_model = models.load_model(inputs.reference.path)
    # TRL builds the default reference from config._name_or_path: the init's directory.
    model.config._name_or_path = str(init.path)

    history: list[dict] = []
    keys = {"loss": "loss", "rewards/accuracies": "pair_accuracy", "rewards/margins": "margin",
            "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
            "logps/chosen": "logp_chosen", "logps/rejected": "logp_rejected",
            "learning_rate": "learning_rate", "grad_norm": "grad_norm",
            "num_tokens": "num_tokens"}
    callback = models.progress_callback(progress, config.max_steps, history, keys)
    work = out_dir / ".trainer"
    resume = resume_mod.current()
    args = {
        **models.trainer_defaults(work),
        "use_cpu": not torch.cuda.is_available(),
        **config.trainer,
        **config.model_dump(include=set(_TRL_FIELDS)),
        **({"loss_type": [config.loss_type, "sft"], "loss_weights": [1.0, config.sft_weight]}
           if config.sft_weight else {}),
        **resume_mod.trainer_args(resume),  # checkpoints into the resume dir (resume_every)
    }
    try:
        dpo_args = DPOConfig(**args)
    except (TypeError, ValueError) as e:
        raise StageInputError(f"invalid DPOConfig from the stage's fields: {e}") from e
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=dpo_args, train_dataset=dataset,
                         processing_class=tokenizer,
                         callbacks=snapshots.with_snapshots([callback], tokenizer, history,
                                                            eval_domains, config.eval_n))
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
    accs = [h["pair_accuracy"] for h in history if "pair_accuracy" in h]
    tokens = next((h["num_tokens"] for h in reversed(history) if "num_tokens" in h), 0.0)
    train = {
        "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
        "first_loss": losses[0] if losses else float("nan"),
        "final_pair_accuracy": sum(accs[-10:]) / len(accs[-10:]) if accs else float("nan"),
        "steps": float(trainer.state.global_step),
        "seconds": seconds,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "rows": float(len(rows)),
    }
    scores = evaluate(model, tokenizer, eval_domains, config.eval_n) if config.eval_n else {}
    return {"eval": scores, "train": train, "history": models.subsample(history),
            "resumed_from_step": resume_mod.resumed_step(checkpoint)}


if __name__ == "__main__":
    init_dir, data_dir, out = (Path(a) for a in sys.argv[1:4])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 200

    def _ref(p: Path, kind: str) -> ArtifactRef:
        return ArtifactRef(key="0" * 64, path=p, kind=kind, stage=kind, recipe="cli")

    ins = Inputs(init=_ref(init_dir, "sft"), data={"train": _ref(data_dir, "data")})
    print(run(Config(max_steps=steps), ins, out, lambda s, t, m: print(s, t, dict(m))))
