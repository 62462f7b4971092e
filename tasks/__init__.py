"""Stage kinds: one module per kind, and the one explicit table that maps kind name -> module.

Every kind module exports, and nothing else is looked up by name:

- ``Config``: a frozen pydantic model (``extra="forbid"``), every field with a description.
  Training kinds have a top-level ``max_steps``.
- ``PRODUCES``: ``"model"`` (a plain Hugging Face directory) or ``"dataset"`` (JSONL).
- ``ROLES``: ``{role: "required" | "optional"}`` for the input roles the kind accepts
  (``init``, ``teachers``, ``reference``, ``reward_model``, ``data``); any other role is refused
  when the recipe is validated.
- ``run(config, inputs, out_dir, progress) -> metrics``: writes the payload into ``out_dir``
  and returns a JSON-able dict (``eval``: {domain: accuracy}, ``train``: summary numbers,
  ``history``: [{step, ...}], optionally ``warnings``: [str]).

Kind modules import torch / transformers / trl inside functions only: `posttrain plan` imports
every Config and must answer in well under a second.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# kind -> module. The only registry; add a kind by adding a module and a line here.
KINDS: dict[str, str] = {
    "data": "tasks.data",
    "base": "tasks.base",
    "sft": "tasks.sft",
    "grpo": "tasks.grpo",
    "mopd": "tasks.mopd",
}


def module_for(kind: str) -> ModuleType:
    """The module implementing `kind` (KeyError for an unknown kind; callers validate first)."""
    return importlib.import_module(KINDS[kind])
