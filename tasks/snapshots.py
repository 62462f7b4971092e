"""Snapshots: a training stage's model at given steps, published while the stage runs.

A stage with `snapshots: [250, 500]` and/or `snapshot_every: N` (recipe stage fields, outside
the content key) publishes, at each of those steps, a plain Hugging Face model directory as the
artifact `STAGE@STEP` under key H(stage key, step) (artifacts/keys.py `snapshot_key`), with its
own manifest: the step, the stage it belongs to, the training metrics at that step and, with
`eval_snapshots: true`, eval per domain. Consumers name it wherever a stage is named
(`from: rl_arith@250`, `teachers: {arith: [rl_arith@125, rl_arith]}`), and may start as soon
as it is published while the stage keeps training (flows/run.py).

The kind (one that declares ``SNAPSHOTS = True``) asks `current()` for the running stage's
snapshot settings (None: none asked) and calls `take(step, model, tokenizer, point)` after each
optimizer step (our own loops), or adds `trainer_callback(...)` to a TRL trainer. flows/stage.py
sets them around `run` with `active(...)`: they carry the steps, whether to evaluate, and the
`publish(step, staged_dir, metrics)` callable that writes the manifest and publishes, so kinds
never see the store. Taking a snapshot draws no random number (evaluation forks the RNG, and
the global RNG states are put back), so a stage's final weights are the same with or without
snapshots, as its key says.

Also the waiting side of pipelining inside a stage: a scheduled input needed only later in
training (a progressive teacher's later phase) may not be published when the stage starts;
`await_input(ref)` blocks until it is, through the waiter flows/stage.py registers.

Run: ``.venv/bin/python -m pytest tests/test_snapshots.py -q``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.refs import ArtifactRef


@dataclass(frozen=True)
class Snapshots:
    """The running stage's snapshot settings and its publisher."""

    steps: frozenset[int]  # optimizer steps whose model is published
    evaluate: bool  # evaluate each snapshot per domain (eval_snapshots)
    # publish(step, staged model dir, metrics): manifest + store (flows/snapshot.py)
    publish: Callable[[int, Path, dict[str, Any]], None]
    done: set[int] = field(default_factory=set)  # steps published by this process

    def due(self, step: int) -> bool:
        """Whether `step` is a snapshot step not taken yet."""
        return step in self.steps and step not in self.done


_ACTIVE: list[Snapshots] = []
_WAITER: list[Callable[[ArtifactRef], ArtifactRef]] = []


def current() -> Snapshots | None:
    """The running stage's snapshots (None: the stage publishes none)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def active(snaps: Snapshots | None,
           waiter: Callable[[ArtifactRef], ArtifactRef] | None = None) -> Iterator[None]:
    """Make `snaps` (and the input `waiter`) current while the kind's `run` runs."""
    if snaps is not None:
        _ACTIVE.append(snaps)
    if waiter is not None:
        _WAITER.append(waiter)
    try:
        yield
    finally:
        if snaps is not None:
            _ACTIVE.remove(snaps)
        if waiter is not None:
            _WAITER.remove(waiter)


def await_input(ref: ArtifactRef) -> ArtifactRef:
    """`ref` once its artifact is published (the ref the stage runner completes with its
    manifest); `ref` itself when its payload is already there or no waiter is registered."""
    if ref.manifest or not _WAITER:  # resolved already, or not under the stage runner
        return ref
    return _WAITER[-1](ref)


def take(snaps: Snapshots | None, step: int, model: Any, tokenizer: Any,
         point: dict[str, Any] | None = None,
         evaluate: Callable[[Any], dict[str, float]] | None = None) -> None:
    """Publish `model` as the snapshot at `step` if it is one (else nothing). `evaluate`
    (model -> {domain: accuracy}) runs only with eval_snapshots; the global RNG states and the
    model's train/eval mode are put back afterwards."""
    if snaps is None or not snaps.due(step):
        return
    from tasks import models
    from tasks import resume as resume_mod

    rng = resume_mod.rng_state()
    training = bool(getattr(model, "training", False))
    metrics: dict[str, Any] = {"step": step, "train": dict(point or {})}
    with tempfile.TemporaryDirectory(prefix=f"posttrain-snapshot-{step}-") as tmp:
        staged = Path(tmp) / "model"
        models.save_model(model, tokenizer, staged)
        if snaps.evaluate and evaluate is not None:
            metrics["eval"] = evaluate(model)
        resume_mod.set_rng_state(rng)
        model.train(training)
        snaps.publish(step, staged, metrics)
    snaps.done.add(step)


def trainer_callback(snaps: Snapshots | None, tokenizer: Any, history: list[dict],
                     evaluate: Callable[[Any], dict[str, float]] | None = None) -> Any:
    """A TrainerCallback that takes the snapshots of a TRL stage (None when there are none).

    The model at step N is taken once that step's logs are in `history` (the Trainer logs right
    after the step, before it saves or evaluates), or at the end of step N when the Trainer
    does not log at N. The model saved is the one the Trainer hands its callbacks.
    """
    if snaps is None:
        return None
    from transformers import TrainerCallback

    class _Snapshots(TrainerCallback):
        pending: int | None = None

        def _take(self, step: int, point: dict[str, Any], model: Any) -> None:
            take(snaps, step, model, tokenizer, point, evaluate)

        def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            step = int(state.global_step)
            if not snaps.due(step):
                return
            logs = args.logging_strategy == "steps" and step % max(1, int(args.logging_steps)) == 0
            if logs:
                self.pending = step  # taken in on_log, with this step's metrics
            else:
                last = history[-1] if history else {}
                self._take(step, {k: v for k, v in last.items() if k != "step"}, model)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):  # noqa: ANN001
            step = int(state.global_step)
            if self.pending != step or "train_runtime" in (logs or {}):
                return
            self.pending = None
            point = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
            self._take(step, point, model)

    return _Snapshots()


def evaluator(tokenizer: Any, domains: list[str], n: int
              ) -> Callable[[Any], dict[str, float]] | None:
    """model -> {domain: greedy held-out accuracy} on `n` problems per domain (None: n == 0)."""
    if not n or not domains:
        return None

    def run(model: Any) -> dict[str, float]:
        from tasks.evaluate import evaluate

        return evaluate(model, tokenizer, list(domains), n)

    return run


def with_snapshots(callbacks: list[Any], tokenizer: Any, history: list[dict],
                   domains: list[str], eval_n: int) -> list[Any]:
    """A TRL kind's `callbacks`, plus the snapshot taker when the stage publishes snapshots
    (added last: the progress callback has recorded step N's logs by then)."""
    cb = trainer_callback(current(), tokenizer, history, evaluator(tokenizer, domains, eval_n))
    return [*callbacks, cb] if cb is not None else list(callbacks)


def announce(step: int, key: str) -> None:
    """The stage log's line for a published snapshot (tests and people grep for it)."""
    print(f"snapshot @{step} published: {key}", file=sys.stderr, flush=True)
