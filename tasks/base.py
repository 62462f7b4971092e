"""Stage kind `base`: the starting model, as a plain Hugging Face directory.

With `model` set, loads that path or hub id with ``from_pretrained`` (``trust_remote_code`` only
when asked) and re-saves it, so every later stage reads a local, content-keyed copy. Otherwise
builds the demo's tiny Llama and char-level tokenizer in-process from `seed` and the size fields
(REFERENCE.md: hidden 128, 4 layers, 4 heads, intermediate 256, ~0.66M parameters).

Optional pretraining (`max_steps` > 0): plain next-token loss on whole ``prompt+completion<eos>``
texts of the train split of `domains`, with a minimal AdamW loop (not a TRL trainer: this is a
warm start, not a post-training algorithm). Metrics: held-out accuracy on `domains`.

Run: ``python -m tasks.base /tmp/base`` builds the demo-sized model and evaluates it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import Inputs, Progress, no_progress
from tasks import domains as _domains
from tasks.kind import Role

PRODUCES = "model"
ROLES: dict[str, Role] = {}


class Config(BaseModel):
    """A pretrained checkpoint (`model`) or a fresh tiny Llama (size fields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="Local path or hub id for from_pretrained; None builds the tiny model."
    )
    trust_remote_code: bool = Field(
        False, description="Allow custom modeling code from `model` (only for trusted sources)."
    )
    hidden_size: int = Field(128, ge=8, description="Tiny model width.")
    num_layers: int = Field(4, ge=1, description="Tiny model decoder layers.")
    num_heads: int = Field(4, ge=1, description="Tiny model attention heads (divides hidden_size).")
    intermediate_size: int = Field(256, ge=8, description="Tiny model MLP width.")
    seed: int = Field(0, description="Initialisation seed (and pretraining data seed).")
    domains: list[str] = Field(
        default_factory=lambda: list(_domains.DOMAINS),
        description="Domains to evaluate on (and to pretrain on when max_steps > 0).",
    )
    max_steps: int = Field(0, ge=0, description="Optional LM pretraining steps (0: none).")
    learning_rate: float = Field(1e-3, gt=0, description="Pretraining AdamW learning rate.")
    batch_size: int = Field(64, ge=1, description="Pretraining sequences per step.")
    eval_n: int = Field(500, ge=0, description="Held-out problems per domain for evaluation.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        unknown = [d for d in self.domains if d not in _domains.DOMAINS]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; known: {', '.join(_domains.DOMAINS)}")
        if self.model is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must divide hidden_size {self.hidden_size}"
            )
        if self.max_steps and not self.domains:
            raise ValueError("pretraining (max_steps > 0) needs `domains`")
        return self


def _pretrain(model, tokenizer, config: Config, progress: Progress, history: list[dict]) -> dict:  # noqa: ANN001
    import torch

    per = max(1, config.max_steps * config.batch_size // len(config.domains))
    texts = [
        r["prompt"] + r["completion"] + tokenizer.eos_token
        for d in config.domains
        for r in _domains.generate(d, per, config.seed, "train")
    ]
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    model.train()
    start, n_tokens, loss = time.perf_counter(), 0, torch.tensor(0.0)
    try:
        for step in range(1, config.max_steps + 1):
            idx = torch.randint(len(texts), (config.batch_size,), generator=gen).tolist()
            batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_tokens += int(batch["attention_mask"].sum())
            value = loss.item()
            history.append({"step": step, "loss": value})
            progress(step, config.max_steps, {"loss": value})
    finally:
        tokenizer.padding_side = side
    seconds = time.perf_counter() - start
    return {
        "final_loss": loss.item(),
        "steps": config.max_steps,
        "seconds": seconds,
        "tokens_per_s": n_tokens / max(seconds, 1e-9),
    }


def tokenizer(config: dict) -> dict | None:
    """Kind hook: the tokenizer fingerprint (tasks.models.tokenizer_fingerprint) this base's model
    carries, read at plan time: the built-in char tokenizer, or a local `model` directory's. None
    for a hub id (plan never downloads; the run checks the built artifacts again)."""
    from tasks import models

    name, trust = config.get("model"), bool(config.get("trust_remote_code"))
    if name is None:
        tok = models.build_tokenizer()
        return models.tokenizer_fingerprint(tok, SimpleNamespace(vocab_size=len(tok)))
    if not Path(name).is_dir():
        return None
    try:
        return models.fingerprint_of(name, trust)
    except (OSError, ValueError):  # not a model directory: the stage itself reports it
        return None


def scale(config: dict, factor: float) -> dict:
    """Kind hook: `posttrain run --scale FACTOR` shrinks pretraining steps and evaluation."""
    from tasks.kind import scaled

    return scaled(config, factor, {"max_steps": 1, "eval_n": 10})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Build or load the base model, optionally pretrain it, save it to `out_dir`, evaluate."""
    from tasks import models
    from tasks.evaluate import evaluate

    models.quiet()
    if config.model is not None:
        tokenizer = models.load_tokenizer(config.model, config.trust_remote_code)
        model = models.load_model(config.model, config.trust_remote_code)
    else:
        tokenizer = models.build_tokenizer()
        model = models.build_tiny_model(
            tokenizer,
            config.hidden_size,
            config.num_layers,
            config.num_heads,
            config.intermediate_size,
            config.seed,
        )
    history: list[dict] = []
    train = {"parameters": float(models.n_parameters(model))}
    if config.max_steps:
        train.update(_pretrain(model, tokenizer, config, progress, history))
    models.save_model(model, tokenizer, out_dir)
    scores = evaluate(model, tokenizer, config.domains, config.eval_n) if config.eval_n else {}
    return {"eval": scores, "train": train, "history": models.subsample(history)}


if __name__ == "__main__":
    print(run(Config(), Inputs(), Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/base")))
