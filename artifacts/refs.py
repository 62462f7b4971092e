"""Typed edges between stages: what a stage's `run` receives for each input role.

Every edge of the lineage graph has a role (init, teachers, reference, reward_model, data); a
stage module receives its inputs already resolved to local directories, so it never looks up
"the latest directory" and never needs the store.

Run: imported by tasks and the stage runner; nothing to run on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("init", "teachers", "generators", "reference", "reward_model", "data",
         "candidates")


@dataclass(frozen=True)
class ArtifactRef:
    """One stored artifact, as seen by a consuming stage."""

    key: str  # content key (64 hex)
    path: Path  # local directory with the payload (an HF model dir or a data set dir)
    kind: str  # stage kind that produced it (data, base, sft, grpo, mopd, ...)
    stage: str  # stage name in the producing recipe
    recipe: str  # producing recipe name
    manifest: Mapping[str, Any] = field(default_factory=dict)

    @property
    def sft_root(self) -> str | None:
        """Key of the nearest `sft` ancestor along init edges (itself when kind == sft)."""
        return self.manifest.get("sft_root")


@dataclass(frozen=True)
class Inputs:
    """All inputs of one stage, by role."""

    init: ArtifactRef | None = None
    teachers: Mapping[str, ArtifactRef] = field(default_factory=dict)
    reference: ArtifactRef | None = None
    reward_model: Mapping[str, ArtifactRef] = field(default_factory=dict)  # name -> RM
    generators: Mapping[str, ArtifactRef] = field(default_factory=dict)  # route -> sampler
    data: Mapping[str, ArtifactRef] = field(default_factory=dict)
    candidates: Mapping[str, ArtifactRef] = field(default_factory=dict)  # name -> model (select)


# progress(step, total, metrics): called by training loops; the stage runner turns it into the
# live table / progress bars of `posttrain run` and into MLflow curves.
Progress = Callable[[int, int, Mapping[str, float]], None]


def no_progress(step: int, total: int, metrics: Mapping[str, float]) -> None:
    """A Progress that drops everything (for direct calls from tests and notebooks)."""


class StageInputError(ValueError):
    """A bad input artifact (incompatible teacher, wrong data format...): exit code 2, no traceback.

    The message must name the stage/input and the fix.
    """
