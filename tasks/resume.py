"""Resumable state of a training stage: where it lives, when it is written, how it is read back.

A stage with `resume_every: N` (a recipe stage field, outside the content key) saves its whole
training state every N optimizer steps into a stable per-key directory that flows/stage.py
chooses and removes once the stage is published (`<store>/tmp/<key>.resume/` for a local store,
`<state dir>/resume/<key>/` for a remote one). The kind learns of it through two environment
variables that flows/stage.py sets around `run(config, inputs, out_dir, progress)`, so the kind
signature stays as it is:

- ``POSTTRAIN_RESUME_DIR``: the directory (absent: resume is off, nothing is saved);
- ``POSTTRAIN_RESUME_EVERY``: N, steps between snapshots.

TRL kinds (sft, grpo, dpo, reward_model) hand the directory to the HF Trainer as its
`output_dir` with `save_steps: N`, `save_total_limit: 1`, and call
`train(resume_from_checkpoint=last_checkpoint(...))`: the Trainer saves and restores weights,
optimizer, scheduler, RNG states (`rng_state.pth`) and its step, and skips the batches already
seen (`ignore_data_skip` stays False), so the data order after a resume is the uninterrupted
run's. Our own loops (mopd, ppo) call `save` / `load` with their own state dict (weights,
optimizer, scheduler, step, every RNG and generator, data position): one `state.pt` replaced
atomically (written beside it, fsynced, `os.replace`), so a SIGKILL at any instant leaves the
previous snapshot or the new one whole.

A resumed stage prints ``resumed from step N (resume dir ...)`` to stderr (the stage log) and
reports `resumed_from_step` in its metrics; flows/stage.py moves it into the manifest.

Run: ``.venv/bin/python -m pytest tests/test_resume.py -x -q``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_DIR = "POSTTRAIN_RESUME_DIR"
ENV_EVERY = "POSTTRAIN_RESUME_EVERY"
STATE = "state.pt"  # our own loops' snapshot file
_CHECKPOINT = "checkpoint-"  # HF Trainer's checkpoint folder prefix (PREFIX_CHECKPOINT_DIR)


@dataclass(frozen=True)
class Resume:
    """Where this stage keeps its resumable state, and how often it writes it."""

    dir: Path
    every: int


def current() -> Resume | None:
    """The running stage's resume settings (None: off), from the variables flows/stage.py sets."""
    where, every = os.environ.get(ENV_DIR), os.environ.get(ENV_EVERY)
    if not where or not every:
        return None
    resume = Resume(Path(where), int(every))
    resume.dir.mkdir(parents=True, exist_ok=True)
    return resume


def announce(step: int, resume: Resume) -> None:
    """The stage log's line for a resumed stage (tests and people grep for it)."""
    print(f"resumed from step {step} (resume dir {resume.dir})", file=sys.stderr, flush=True)


# ---- TRL kinds: the HF Trainer's own checkpoints -------------------------------------------


def trainer_args(resume: Resume | None) -> dict[str, Any]:
    """TrainingArguments that make the HF Trainer checkpoint into the resume dir (none: off).

    Applied after the stage's `trainer:` passthrough, which may not set any of them
    (models.STAGE_OWNED)."""
    if resume is None:
        return {}
    return {"output_dir": str(resume.dir), "save_strategy": "steps", "save_steps": resume.every,
            "save_total_limit": 1, "save_only_model": False, "ignore_data_skip": False,
            "load_best_model_at_end": False}


def _step_of(path: Path) -> int:
    tail = path.name[len(_CHECKPOINT):]
    return int(tail) if tail.isdigit() else -1


def last_checkpoint(resume: Resume | None) -> str | None:
    """The newest complete HF checkpoint in the resume dir, or None (start from scratch).

    The Trainer writes a checkpoint in place and `trainer_state.json` last, so a folder whose
    trainer state is missing or unreadable was cut short by a kill: it is removed, and the
    older one (kept until the new one was whole, save_total_limit rotates after saving) used.
    """
    if resume is None:
        return None
    found = sorted((p for p in resume.dir.glob(f"{_CHECKPOINT}*") if _step_of(p) >= 0),
                   key=_step_of, reverse=True)
    for path in found:
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            step = int(state["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            print(f"resume: ignoring incomplete checkpoint {path}", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
            continue
        announce(step, resume)
        return str(path)
    return None


def resumed_step(checkpoint: str | None) -> int | None:
    """The step a TRL stage resumed from (None: it started from scratch)."""
    return _step_of(Path(checkpoint)) if checkpoint else None


# ---- our own loops (mopd, ppo): one atomic state file ---------------------------------------


def rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states (CUDA's too when present)."""
    import numpy as np
    import torch

    out = {"python": random.getstate(), "numpy": np.random.get_state(),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def due(resume: Resume | None, step: int, total: int) -> bool:
    """Whether to snapshot after `step` (never after the last one: the stage is publishing)."""
    return resume is not None and step < total and step % resume.every == 0


def save(resume: Resume, state: dict[str, Any]) -> None:
    """Write `state` (with `step`) as the one snapshot: beside it, fsync, then os.replace."""
    import torch

    path = resume.dir / STATE
    tmp = path.with_name(f".{STATE}.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({**state, "rng": rng_state()}, f)
        f.flush()
        os.fsync(f.fileno())  # preemption can take the page cache with the node
    os.replace(tmp, path)


def load(resume: Resume | None) -> dict[str, Any] | None:
    """The last snapshot, or None (off, or none written yet). Its global RNG states are under
    "rng": restore them with `set_rng_state` right before the next step, once nothing else
    that draws from them (model loading, set-up) is left."""
    if resume is None or not (resume.dir / STATE).is_file():
        return None
    import torch

    # Our own file in our own per-key directory: full unpickling (RNG states are tuples).
    state = torch.load(resume.dir / STATE, map_location="cpu", weights_only=False)
    announce(int(state["step"]), resume)
    return state


def restore(resume: Resume | None, trainer: Any, rng: Any) -> tuple[list[dict], int]:
    """For our own training loops (mopd, ppo): (history so far, first step to run). With a
    snapshot, the trainer's state, the prompt sampler `rng` (the data position) and the global
    RNGs are put back; call it right before the loop. Without one: ([], 1)."""
    snap = load(resume)
    if snap is None:
        return [], 1
    trainer.load_state_dict(snap["trainer"])
    rng.setstate(snap["prompts"])
    set_rng_state(snap["rng"])
    return snap["history"], int(snap["step"]) + 1


def checkpoint(resume: Resume | None, step: int, total: int, trainer: Any, rng: Any,
               history: list[dict]) -> None:
    """After `step` of our own loop: the snapshot `restore` reads, every `resume.every` steps."""
    if resume is not None and due(resume, step, total):
        save(resume, {"step": step, "trainer": trainer.state_dict(), "prompts": rng.getstate(),
                      "history": history})
