"""Helpers for stage tests: tiny models, data sets and input refs, all under a given directory.

Plain functions (tests/conftest.py belongs to the spine), loaded by test modules with
`load()`; every artifact is written under the path the caller passes (a pytest tmp_path).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from artifacts.refs import ArtifactRef, Inputs

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


def load() -> ModuleType:
    """This module, imported by file path (tests/ is not a package)."""
    if "stage_fixtures" in sys.modules:
        return sys.modules["stage_fixtures"]
    spec = importlib.util.spec_from_file_location("stage_fixtures", Path(__file__))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["stage_fixtures"] = module
    spec.loader.exec_module(module)
    return module


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
