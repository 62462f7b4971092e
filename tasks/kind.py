"""The kind contract: what every stage kind module declares, checked in one place.

A kind module (listed in `tasks.KINDS`) exports:

- ``Config``: a frozen pydantic model (``extra="forbid"``), every field with a description;
  training kinds (``PRODUCES == "model"`` and any input role) have a top-level ``max_steps``.
- ``PRODUCES``: the artifact type it writes, ``"model"`` (a plain Hugging Face directory) or
  ``"dataset"`` (``train.jsonl``).
- ``ROLES``: ``{role: Role(...)}``: each input role it takes (``init``, ``teachers``,
  ``reference``, ``reward_model``, ``data``), whether it is required, its arity (one stage, or a
  named map ``{name: stage}`` with the names it allows), the artifact type it accepts and the
  dataset columns it reads. The recipe loader refuses anything else, with the place and the fix.
- ``run(config, inputs, out_dir, progress) -> metrics``.

and, where the kind has rules of its own, any of these optional hooks (looked up by exactly
these names through `hooks`; nothing else is discovered):

- ``STARTS_LINEAGE = True``: the kind's output is an SFT-lineage root (``sft``).
- ``RESUMABLE = True``: the kind honours the stage field ``resume_every: N`` (a recipe setting
  on another kind is refused at plan time). While such a stage builds, flows/stage.py sets
  ``POSTTRAIN_RESUME_DIR`` (a stable per-key directory, not an artifact, removed once the stage
  is published) and ``POSTTRAIN_RESUME_EVERY`` (N) in the environment; the kind reads them with
  ``tasks.resume.current()``, saves its whole training state there every N steps, resumes from
  it when present, and returns ``resumed_from_step`` (None or the step) in its metrics
  (tasks/resume.py).
- ``SNAPSHOTS = True``: the kind honours the stage fields ``snapshots: [steps]`` /
  ``snapshot_every: N`` (and ``eval_snapshots``): while it trains it calls
  ``tasks.snapshots.current()`` and hands the model to it at each of those steps; the stage
  runner publishes it as the artifact ``STAGE@STEP`` (tasks/snapshots.py).
- ``prepare(config: dict, recipe_dir: Path) -> dict``: resolve recipe-relative paths before the
  config is validated (raises ``KindCheckError``).
- ``data_files(config) -> {name: path}``: user files whose content enters the key.
- ``columns(config) -> set[str] | None``: the columns of the rows a dataset kind writes.
- ``route_values(config, column) -> set[str] | None``: the values of one column, when the recipe
  alone tells them (synthetic domains) or a small user file does.
- ``trained_domains(config) -> set[str] | None``: the domains a model kind restricts training to.
- ``tokenizer(config) -> dict | None``: for a kind whose model starts a chain of ``from:``
  (``base``), the fingerprint of the tokenizer it carries (tasks.models.tokenizer_fingerprint),
  when the recipe alone tells it. Plan refuses a stage that reads models (``from``, reward
  models, teachers, a reference, ...) carrying different tokenizers (`tokenizer_root`).
- ``check(node, nodes) -> list[str]``: recipe-level rules (route coverage, idle teachers ...);
  raises ``KindCheckError`` for an error, returns warnings that plan prints and the manifest
  keeps.
- ``scale(config: dict, factor: float) -> dict``: the config at ``posttrain run --scale
  FACTOR`` (0 < FACTOR <= 1): the kind's steps and sizes shrunk (`scaled` below does the
  arithmetic), so CI runs a recipe end to end. A kind without it keeps its config.
- ``TRAINS = False``: a kind that produces a model from model inputs without training
  (``select`` copies the best candidate), so the contract does not ask it for ``max_steps``.

This module imports neither torch nor prefect: `posttrain plan` calls every hook.

Run: ``python -m tasks.kind`` prints every kind's contract.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

# model: a causal LM directory; reward_model: a sequence-classification directory (one score per
# sequence); dataset: train.jsonl rows. A policy can never start from a reward model, nor score
# with a policy, because the roles say which type they accept.
ArtifactType = Literal["model", "reward_model", "dataset"]
ARTIFACT_TYPES: tuple[str, ...] = ("model", "reward_model", "dataset")
# recipe field -> role, and back: the recipe says `from:`, the lineage says `init`.
ROLE_OF_FIELD = {"from": "init", "reference": "reference", "reward_model": "reward_model",
                 "teachers": "teachers", "generators": "generators", "data": "data",
                 "candidates": "candidates"}
FIELD_OF_ROLE = {v: k for k, v in ROLE_OF_FIELD.items()}
# `STAGE@STEP`: the snapshot of a training stage at that step, wherever a stage is named.
SNAPSHOT_REF_RE = re.compile(r"^(?P<stage>[^@]+)@(?P<step>[0-9]+)$")
# A route of a role that takes schedules is expanded to `<route>#<phase>` (1-based) per phase.
PHASE_SEP = "#"
OPTIONAL_HOOKS = ("prepare", "data_files", "columns", "route_values", "trained_domains", "check",
                  "scale", "tokenizer")


class KindCheckError(ValueError):
    """A recipe breaks a kind's rule. `where` is the YAML path below the stage, e.g.
    ("teachers", "arith"); the recipe loader turns it into `FILE:LINE: yaml.path: message`."""

    def __init__(self, where: tuple[str, ...], message: str) -> None:
        self.where, self.message = where, message
        super().__init__(message)


@dataclass(frozen=True)
class Role:
    """One input role of a kind.

    >>> Role("dataset", many=True, names=("train",), default_name="train").shape()
    '`data: STAGE` or `data: {train: STAGE}`'
    """

    accepts: ArtifactType
    required: bool = True
    many: bool = False  # a named map {name: stage} (teachers, data) instead of one stage
    names: tuple[str, ...] | None = None  # allowed names of a map (None: any name)
    default_name: str | None = None  # a map written as one stage gets this name (data: train)
    columns: tuple[str, ...] = ()  # dataset columns this kind reads from every row
    description: str = ""
    # a name may map to a list of stages, one per phase of training (progressive teachers):
    # the recipe expands `{arith: [a@125, a]}` to `{arith#1: a@125, arith#2: a}`
    schedule: bool = False

    def shape(self, fld: str = "data") -> str:
        if not self.many:
            return f"`{fld}: STAGE`"
        if self.default_name:
            return f"`{fld}: STAGE` or `{fld}: {{{self.default_name}: STAGE}}`"
        if self.names:
            return f"`{fld}: {{{', '.join(f'{n}: STAGE' for n in self.names)}}}`"
        return f"`{fld}: {{NAME: STAGE, ...}}`"


def train_rows(*columns: str, description: str) -> Role:
    """The usual `data` role: one dataset named `train` (`data: STAGE` is short for it) whose
    rows carry `columns`."""
    return Role("dataset", many=True, names=("train",), default_name="train", columns=columns,
                description=description)


@dataclass(frozen=True)
class Node:
    """A stage as a kind's hooks see it: no flows types, so tasks never import flows.

    `kind` is None for a `use:` pin (its artifact is only known once the store is read)."""

    name: str
    kind: str | None
    config: Mapping[str, Any]
    inputs: Mapping[str, Any]  # role -> stage name | {name: stage name}
    where: tuple[str, ...] = ()  # YAML path of its template

    def parents(self, role: str) -> dict[str | None, str]:
        """{name (None for a single input): parent stage name}; a `STAGE@STEP` snapshot ref
        gives its stage's name (the node that says what it produces)."""
        v = self.inputs.get(role)
        if v is None:
            return {}
        pairs = dict(v) if isinstance(v, dict) else {None: v}
        return {k: split_ref(s)[0] for k, s in pairs.items()}


def split_ref(ref: str) -> tuple[str, int | None]:
    """(stage, step) of `STAGE@STEP`, (stage, None) of a plain stage name.

    >>> split_ref("rl_arith@250"), split_ref("sft")
    (('rl_arith', 250), ('sft', None))
    """
    m = SNAPSHOT_REF_RE.match(ref)
    return (m.group("stage"), int(m.group("step"))) if m else (ref, None)


def split_phase(name: str) -> tuple[str, int | None]:
    """(route, phase) of a scheduled input name `route#phase`, (name, None) otherwise.

    >>> split_phase("arith#2"), split_phase("arith")
    (('arith', 2), ('arith', None))
    """
    route, sep, phase = name.rpartition(PHASE_SEP)
    return (route, int(phase)) if sep and route and phase.isdigit() else (name, None)


@dataclass(frozen=True)
class KindSpec:
    """A kind module read once through the contract (see the module docstring)."""

    name: str
    module: ModuleType
    config: type
    produces: ArtifactType
    roles: Mapping[str, Role]
    starts_lineage: bool = False
    resumable: bool = False  # honours `resume_every` (tasks/resume.py)
    snapshots: bool = False  # honours `snapshots` / `snapshot_every` (tasks/snapshots.py)
    hooks: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    declares_training: bool = True  # False: the module says TRAINS = False (select)

    @property
    def trains(self) -> bool:
        return self.produces == "model" and bool(self.roles) and self.declares_training


def spec(kind: str) -> KindSpec:
    """The contract of `kind` (KeyError for an unknown kind; the recipe loader checks first)."""
    return _spec(kind)


_CACHE: dict[str, KindSpec] = {}


def _spec(kind: str) -> KindSpec:
    if kind not in _CACHE:
        from tasks import KINDS

        module = importlib.import_module(KINDS[kind])
        _CACHE[kind] = KindSpec(
            name=kind, module=module, config=module.Config, produces=module.PRODUCES,
            roles=dict(module.ROLES), starts_lineage=bool(getattr(module, "STARTS_LINEAGE", False)),
            resumable=bool(getattr(module, "RESUMABLE", False)),
            declares_training=bool(getattr(module, "TRAINS", True)),
            snapshots=bool(getattr(module, "SNAPSHOTS", False)),
            hooks={h: getattr(module, h) for h in OPTIONAL_HOOKS if hasattr(module, h)})
    return _CACHE[kind]


def hook(node: Node | None, name: str, *args: Any) -> Any:
    """Call `name` on `node`'s kind if it declares it; None when it does not (or a pin)."""
    if node is None or node.kind is None:
        return None
    fn = spec(node.kind).hooks.get(name)
    return fn(node.config, *args) if fn else None


def scaled(config: Mapping[str, Any], factor: float,
           fields: Mapping[str, int]) -> dict[str, Any]:
    """`config` with each int field of `fields` times `factor`, rounded, at least its floor
    (`fields`: name -> floor); a 0 stays 0 (e.g. eval_n 0: no evaluation). For `scale` hooks.

    >>> scaled({"max_steps": 1200, "eval_n": 0, "lr": 0.1}, 0.1, {"max_steps": 1, "eval_n": 1})
    {'max_steps': 120, 'eval_n': 0, 'lr': 0.1}
    >>> scaled({"max_steps": 5, "warmup_steps": 3}, 0.01, {"max_steps": 1, "warmup_steps": 0})
    {'max_steps': 1, 'warmup_steps': 0}
    """
    out = dict(config)
    for name, floor in fields.items():
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[name] = max(floor, round(value * factor))
    return out


def columns_of(node: Node | None) -> set[str] | None:
    """Columns of the rows a dataset stage writes (None: not known from the recipe)."""
    return hook(node, "columns")


def route_values_of(node: Node | None, column: str) -> set[str] | None:
    """Values of `column` in a dataset stage's rows (None: not known from the recipe)."""
    return hook(node, "route_values", column)


def trained_domains_of(node: Node | None) -> set[str] | None:
    """Domains a model stage restricts its training to (None: all of its data)."""
    return hook(node, "trained_domains")


def tokenizer_root(name: str, nodes: Mapping[str, Node]) -> Node | None:
    """The stage whose `tokenizer` hook tells which tokenizer stage `name`'s model carries: up
    its `from:` chain to the first kind that has the hook. None when the chain reaches a pin
    (`use:`) or a stage without `from:` (select's candidates: known only once built)."""
    seen: set[str] = set()
    node = nodes.get(name)
    while node is not None and node.kind is not None and node.name not in seen:
        seen.add(node.name)
        if "tokenizer" in spec(node.kind).hooks:
            return node
        parent = node.parents("init").get(None)
        node = nodes.get(parent) if parent else None
    return None


if __name__ == "__main__":
    from tasks import KINDS

    for k in KINDS:
        s = spec(k)
        roles = ", ".join(f"{r}:{v.accepts}{'*' if v.many else ''}{'' if v.required else '?'}"
                          for r, v in s.roles.items()) or "-"
        print(f"{k:<8} -> {s.produces:<8} roles [{roles}] hooks {sorted(s.hooks)}")
