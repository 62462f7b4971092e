"""Helpers for stage tests: tiny models, data sets and input refs, all under a given directory.

Plain functions (tests/conftest.py belongs to the spine), imported by file path from the test
modules (tests/ is not a package); every artifact is written under the path the caller passes
(a pytest tmp_path).
"""

from __future__ import annotations

import json
from pathlib import Path

from artifacts.refs import ArtifactRef, Inputs

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def ref(path: Path, kind: str, stage: str | None = None) -> ArtifactRef:
    """An input ref as the stage runner would pass it."""
    return ArtifactRef(key="0" * 64, path=Path(path), kind=kind, stage=stage or kind, recipe="t")


def tiny_base(out: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny model directory (no evaluation)."""
    from tasks import base

    base.run(base.Config(**TINY, seed=seed, eval_n=0), Inputs(), out)
    return out


def gen_data(out: Path, domains: list[str], size: int = 256, seed: int = 0) -> Path:
    """A `data` stage output generated from synthetic domains."""
    from tasks import data

    data.run(data.Config(domains=domains, size=size, seed=seed), Inputs(), out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """A user JSONL file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stage_inputs(init: Path, data_dir: Path, init_kind: str = "base") -> Inputs:
    """Inputs with an `init` model and a `train` data set."""
    return Inputs(init=ref(init, init_kind), data={"train": ref(data_dir, "data")})


def state(path: Path) -> dict:
    """The parameter tensors of a saved model directory, by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def changed(before: dict, after: dict) -> list[str]:
    """Names of tensors that differ between two state dicts."""
    import torch

    return [k for k in before if not torch.equal(before[k], after[k])]
