"""Stage kinds: one module per kind, and the one explicit table that maps kind name -> module.

What a kind module exports (``Config``, ``PRODUCES``, ``ROLES`` of typed ``Role``s, ``run``, and
optional hooks for the kind's own recipe rules) is the kind contract, written down and read in
one place: `tasks/kind.py`. flows/ and artifacts/ hold no per-kind rules; adding a kind touches
its module, the line below, its tests and a README row (tests/test_kind_contract.py checks
every entry).

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
    "generate": "tasks.generate",
    "reward_model": "tasks.reward_model",
    "dpo": "tasks.dpo",
    "ppo": "tasks.ppo",
    "select": "tasks.select",
}


def module_for(kind: str) -> ModuleType:
    """The module implementing `kind` (KeyError for an unknown kind; callers validate first)."""
    return importlib.import_module(KINDS[kind])
