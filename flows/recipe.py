"""Recipe files -> a validated DAG of StageSpecs, before any compute.

A recipe (YAML) has `name`, `description`, `vars`, `defaults` (per kind) and `stages`. Each
stage has a `kind` (tasks/__init__.py), input roles (`from` = init, `teachers` {route: stage},
`data` {name: stage} or one stage name, `reference`, `reward_model`), its kind's config fields,
and stage-level fields: `foreach: <var>` (one stage per value) or `foreach: [<var>, ...]` (one
per combination: the product), where the name and every string in the stage may use, per var,
`{<var>}`, its singular (`singular()`: domains -> `{domain}`, specialties -> `{specialty}`) and,
for one var only, `{item}`; the name needs a placeholder of each var. `rounds: N` (N chained
stages `<name>_r1 .. <name>_r{N-1}`, then `<name>`, each starting from the previous one),
`use: <ref>`
(pin to an existing artifact: nothing is built), `resources` {cpus, gpus}, `retries`,
`verify_inputs` (`hash`, the default, or `size`: how inputs are checked against their
manifests before training; not in the key: it changes no trained byte), `resume_every: N`
(training kinds that declare RESUMABLE: save resumable state every N steps, so a killed stage
resumes instead of restarting; off when absent; not in the key either), and
`launch` {processes, accelerate}: run the stage as N data-parallel processes (torchrun), or
under `accelerate launch --config_file <accelerate>` (e.g. infra/deepspeed/zero2.yaml).
Snapshots (kinds that declare SNAPSHOTS, tasks/snapshots.py): `snapshots: [steps]` and/or
`snapshot_every: N` publish the stage's model at those steps as `NAME@STEP` while it trains,
`eval_snapshots: true` evaluates each (none of them in the key). `STAGE@STEP` is accepted
wherever a stage is named (`from`, `teachers`, `reference`, ...) and refused unless STAGE saves
that step; a role that takes schedules (mopd `teachers`) also takes a list per name,
`{arith: [rl_arith@125, rl_arith]}`, expanded to `{arith#1: .., arith#2: ..}`. `use:` also takes
`{recipe: path/to/their.yaml, stage: STAGE[@STEP]}`: another team's stage, keyed from their
recipe file, planned `waiting` until it is built.
A string that is exactly `${var}` is replaced by that var's value. `--set NAME.path=value`
names an expanded stage (a bare `rounds` name is its last round) or a foreach template as
written (`rl_{domain}`: every copy).

Rounds over a group of stages (flows/rounds.py): a `stages:` entry with `stages:` of its own
and `rounds: N` repeats its member stages N times; member names contain `{round}` (round r's
copy: `rm_{round}` -> `rm_2`), `{prev}` is r - 1 in every string (`from: best_{prev}`: the
previous round's `best`), `first: {"best_{round}": sft}` says what `best_{prev}` names in
round 1, and `per_round: {2: {"mopd_{round}": {teachers: {general: "rlvr_{prev}"}}}}` deep-merges
overrides into one round's copy (`null` removes a field or a map entry, e.g. a teacher route).
In YAML flow style (`{...}`) a name with `{round}` must be quoted; block style needs no quotes.

`parse(..., scale=F)` (`posttrain run|plan --scale F`, 0 < F <= 1) shrinks every stage through
its kind's `scale` hook (steps, data sizes, eval_n, prompts: tasks/kind.py) and names the recipe
`NAME-xF`, so its refs, lock file and MLflow experiment stay apart; the plan puts F in every key.

Every user error raises RecipeError naming the file, the line and the YAML path, with a fix.
This module imports neither prefect nor torch: `posttrain plan` must answer in < 1 s.

Run: ``python -m flows.recipe recipes/mimo_tiny.yaml`` prints the expanded DAG.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import tasks
from artifacts.store import NAME_RE  # one rule for recipe and stage names: refs/ paths use them
from flows import rounds as rounds_mod
from flows import scaling
from tasks import kind as kinds
from tasks.kind import FIELD_OF_ROLE, ROLE_OF_FIELD

STAGE_FIELDS = ("kind", "description", "from", "teachers", "generators", "data", "reference",
                "reward_model", "candidates", "foreach", "rounds", "use", "resources", "retries",
                "launch", "verify_inputs", "resume_every", "snapshots", "snapshot_every",
                "eval_snapshots")
VERIFY_MODES = ("hash", "size")  # artifacts/verify.py MODES (imported there without yaml)
TOP_FIELDS = ("name", "description", "vars", "defaults", "stages")


class RecipeError(ValueError):
    """A user error in a recipe or a --set override (exit code 2, no traceback)."""

    def __init__(self, file: str, where: str, message: str, line: int | None = None) -> None:
        self.file, self.where, self.message, self.line = file, where, message, line
        loc = f"{file}:{line}" if line else file
        super().__init__(f"{loc}: {where}: {message}" if where else f"{loc}: {message}")


@dataclass(frozen=True)
class Resources:
    """What a stage holds while it runs: CPU cores, GPUs, and `custom` Ray resources
    (`{node_a: 1}`: a `ray start --resources` name, which pins the stage to the nodes that
    offer it). Outside the key: where a stage runs does not change what it builds."""

    cpus: int = 1
    gpus: int = 0
    custom: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """How the stage's process starts: `processes` data-parallel ranks, optionally under
    `accelerate launch` with the config file `accelerate` (an absolute path)."""

    processes: int = 1
    accelerate: str | None = None

    @property
    def distributed(self) -> bool:
        return self.processes > 1 or self.accelerate is not None


@dataclass(frozen=True)
class StageSpec:
    """One stage after expansion: what to build and from which stages (by role)."""

    name: str
    kind: str  # "use" for a pinned artifact
    config: dict[str, Any]
    inputs: dict[str, Any]  # role -> stage name, or {route/name: stage name}
    resources: Resources = Resources()
    retries: int = 0
    use: str | None = None
    where: str = ""  # YAML path of the template it came from, for messages
    launch: Launch = Launch()
    warnings: tuple[str, ...] = ()  # from the kind's plan-time checks (route_checks: warn)
    verify_inputs: str = "hash"  # inputs checked by sha256 ("hash") or by size only ("size")
    resume_every: int | None = None  # steps between resumable snapshots (None: off)
    snapshots: tuple[int, ...] = ()  # steps whose model is published as `NAME@STEP`
    eval_snapshots: bool = False  # evaluate each snapshot per domain (its manifest's eval)
    use_recipe: str | None = None  # `use: {recipe: FILE, stage: ...}`: that file, absolute

    def refs(self) -> list[tuple[str, str | None, str]]:
        """(role, name within the role or None, ref as written: `STAGE` or `STAGE@STEP`)."""
        out: list[tuple[str, str | None, str]] = []
        for role, value in self.inputs.items():
            pairs = value.items() if isinstance(value, dict) else [(None, value)]
            out.extend((role, sub, ref) for sub, ref in pairs)
        return out

    def parents(self) -> list[str]:
        """Names of the stages this one reads from (a snapshot `X@N` counts as X)."""
        return sorted({kinds.split_ref(ref)[0] for _, _, ref in self.refs()})

    def deferred(self, sub: str | None) -> bool:
        """Whether the input named `sub` is needed only later in training: a scheduled
        phase after the first (`route#2`...), which the kind waits for when it switches."""
        return sub is not None and (kinds.split_phase(sub)[1] or 1) > 1

    def waits_for(self) -> tuple[list[str], list[tuple[str, int]]]:
        """(stages whose end this one waits for, snapshots `(stage, step)` it waits for
        instead): a stage read only through snapshots or deferred phases may still be
        training when this one starts (pipelining)."""
        whole: set[str] = set()
        snaps: set[tuple[str, int]] = set()
        for _, sub, ref in self.refs():
            if self.deferred(sub):
                continue
            stage, step = kinds.split_ref(ref)
            if step is None:
                whole.add(stage)
            else:
                snaps.add((stage, step))
        return sorted(whole), sorted(x for x in snaps if x[0] not in whole)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    path: Path
    vars: dict[str, list[Any]]
    stages: dict[str, StageSpec]  # topological order
    sets: tuple[str, ...] = field(default_factory=tuple)
    scale: float = 1.0  # `--scale`: every stage shrunk by its kind's `scale` hook; in the keys

    def children(self, name: str) -> list[str]:
        return [s.name for s in self.stages.values() if name in s.parents()]


def closest(word: str, options: list[str] | tuple[str, ...]) -> str:
    hit = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


# -- YAML with line numbers ----------------------------------------------------------------

def _line_map(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (str(i),), out)


class _Ctx:
    """File name + YAML line lookup for error messages."""

    def __init__(self, file: str, lines: dict[tuple[str, ...], int]) -> None:
        self.file, self.lines = file, lines

    def error(self, path: tuple[str, ...], message: str) -> RecipeError:
        line = None
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        return RecipeError(self.file, ".".join(path), message, line)


def load_yaml(path: str | Path) -> tuple[dict[str, Any], _Ctx]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise RecipeError(str(path), "", "no such file (give the path to a recipe .yaml)") from None
    except IsADirectoryError:
        raise RecipeError(str(path), "", "is a directory (give the path to a recipe .yaml "
                          "inside it)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(str(path), "", f"cannot read the file: {e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(str(path), "", f"not valid YAML: {problem}", line) from None
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        _line_map(node, (), lines)
    ctx = _Ctx(str(path), lines)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise RecipeError(str(path), "top level", f"got {got}, but a recipe is a YAML mapping "
                          "with name, vars, defaults and stages", 1)
    return doc, ctx


# -- parsing -------------------------------------------------------------------------------

def _kind_spec(kind: str, ctx: _Ctx, where: tuple[str, ...]) -> kinds.KindSpec:
    if not isinstance(kind, str) or kind not in tasks.KINDS:
        hint = closest(str(kind), tuple(tasks.KINDS))
        raise ctx.error(where + ("kind",), f"unknown kind {kind!r}{hint}; "
                        f"known kinds: {', '.join(tasks.KINDS)}")
    return kinds.spec(kind)


def singular(var: str) -> str | None:
    """The singular of a plural var name, for its `{placeholder}`; None when there is none.

    Small and predictable rather than complete English: `{<var>}` always works as well, so an
    odd plural never blocks a recipe.

    >>> [singular(v) for v in ("domains", "specialties", "boxes", "classes", "batches")]
    ['domain', 'specialty', 'box', 'class', 'batch']
    >>> [singular(v) for v in ("seeds", "sizes", "seed", "class", "corpus", "s", "ies")]
    ['seed', 'size', None, None, None, None, None]
    """
    if not var.endswith("s") or var.endswith(("ss", "us", "is")):
        return None  # not a plural (seed, class, corpus, analysis)
    for plural, one in (("ies", "y"), ("sses", "ss"), ("xes", "x"), ("ches", "ch"),
                        ("shes", "sh")):
        if var.endswith(plural):
            stem = var[:-len(plural)]
            return stem + one if stem else None
    return var[:-1] or None


def _placeholders(var: str, item: bool = True) -> list[str]:
    """The marks that stand for one value of `var`: `{<var>}`, its singular (domains ->
    `{domain}`) and, unless `item` is False (a foreach over several vars), `{item}`."""
    names = ["{" + var + "}"]
    one = singular(var)
    if one is not None:
        names.append("{" + one + "}")
    return list(dict.fromkeys((["{item}"] + names) if item else names))  # var `items`: once


def _subst(obj: Any, marks: list[str] | dict[str, Any], value: Any = None) -> Any:
    """Replace placeholders in every string (keys included) of `obj`: each of `marks` by
    `value`, or, when `marks` is a {mark: value} mapping (a foreach over several vars), each
    mark by its own value. One pass, so a value is never itself substituted again."""
    table = {m: str(v) for m, v in marks.items()} if isinstance(marks, dict) \
        else {m: str(value) for m in marks}
    if not table:
        return obj
    pattern = re.compile("|".join(re.escape(m) for m in sorted(table, key=len, reverse=True)))

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return pattern.sub(lambda hit: table[hit.group(0)], x)
        if isinstance(x, dict):
            return {walk(k): walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(obj)


def _vars_in(obj: Any, vars_: dict[str, list[Any]], ctx: _Ctx, where: tuple[str, ...]) -> Any:
    if isinstance(obj, str) and obj.startswith("${") and obj.endswith("}"):
        name = obj[2:-1]
        if name not in vars_:
            raise ctx.error(where, f"unknown var {name!r}{closest(name, tuple(vars_))}; "
                            f"declare it under vars:")
        return copy.deepcopy(vars_[name])
    if isinstance(obj, dict):
        return {k: _vars_in(v, vars_, ctx, where + (str(k),)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_vars_in(v, vars_, ctx, where + (str(i),)) for i, v in enumerate(obj)]
    return obj


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _foreach(tname: str, body: dict[str, Any], vars_: dict[str, list[Any]], ctx: _Ctx,
             where: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    """[(name, body)] for `foreach: var` (one per value) or `foreach: [var, ...]` (one per
    combination: the product, first var outermost), every placeholder filled by its own var."""
    raw = body["foreach"]
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ctx.error(where + ("foreach",), f"foreach names a var, or a list of vars for their "
                        f"product (e.g. foreach: [domains, seeds]), got {raw!r}")
    for i, var in enumerate(names):
        if var not in vars_:
            at = ("foreach",) if isinstance(raw, str) else ("foreach", str(i))
            raise ctx.error(where + at, f"foreach over missing var {var!r}"
                            f"{closest(var, tuple(vars_))}; declared vars: "
                            f"{', '.join(vars_) or 'none'}")
        if var in names[:i]:
            raise ctx.error(where + ("foreach", str(i)), f"foreach names var {var!r} twice")
    marks = {var: _placeholders(var, item=len(names) == 1) for var in names}
    owner: dict[str, str] = {}
    for var, ms in marks.items():
        for m in ms:
            if m in owner:  # e.g. vars `domain` and `domains` both give {domain}
                raise ctx.error(where + ("foreach",), f"placeholder {m} stands for both "
                                f"{owner[m]!r} and {var!r}; rename one of the vars")
            owner[m] = var
    if len(names) > 1 and "{item}" in tname:
        raise ctx.error(where, "{item} is only for a foreach over one var; name each value by "
                        f"its var: {', '.join(ms[-1] for ms in marks.values())}")
    for var, ms in marks.items():
        if not any(m in tname for m in ms):
            need = "one of " + ", ".join(ms) if len(ms) > 1 else ms[0]
            raise ctx.error(where, f"a foreach stage's name must contain {need} (for var "
                            f"{var!r}) so that every copy gets its own name")
    rest = {k: v for k, v in body.items() if k != "foreach"}
    items: list[tuple[str, dict[str, Any]]] = []
    for combo in itertools.product(*(vars_[var] for var in names)):
        table = {m: value for var, value in zip(names, combo, strict=True) for m in marks[var]}
        items.append((_subst(tname, table), _subst(rest, table)))
    return items


def _expand_templates(doc: dict[str, Any], ctx: _Ctx) -> list[tuple[str, dict[str, Any], tuple]]:
    """[(stage name, raw body, yaml path of its template)] after foreach and rounds."""
    vars_ = doc["vars"]
    out: list[tuple[str, dict[str, Any], tuple]] = []
    for tname, body, where in rounds_mod.expand(doc["stages"], vars_, ctx, _placeholders):
        if not isinstance(tname, str) or not NAME_RE.match(tname.replace("{", "").replace("}", "")):
            raise ctx.error(where, "stage names use letters, digits, '_', '-', '.' "
                            "(and {placeholders} with foreach)")
        if not isinstance(body, dict):
            raise ctx.error(where, "a stage is a mapping with at least `kind:` (or `use:`)")
        if "kind" not in body and "use" not in body:
            raise ctx.error(where, f"missing `kind:` (known kinds: {', '.join(tasks.KINDS)}) "
                            "or `use: <ref>`")
        body = _vars_in(body, vars_, ctx, where)
        items: list[tuple[str, dict[str, Any]]] = [(tname, body)]
        if "foreach" in body:
            items = _foreach(tname, body, vars_, ctx, where)
        for name, b in items:
            if ("{" in name or "}" in name) and "foreach" in body:
                raise ctx.error(where, f"stage name {name!r} keeps a placeholder that "
                                f"`foreach: {body['foreach']}` does not fill; placeholders are "
                                "{<var>} or its singular, for the vars foreach names")
            if "{" in name or "}" in name:
                raise ctx.error(where, f"stage name {name!r} has a placeholder but no `foreach:`")
            rounds = b.get("rounds", 1)
            if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
                raise ctx.error(where + ("rounds",), f"rounds must be an integer >= 1, got "
                                f"{rounds!r}")
            b = {k: v for k, v in b.items() if k != "rounds"}
            if rounds > 1:
                if "from" not in b:
                    raise ctx.error(where + ("rounds",), "rounds chain each round from the "
                                    "previous one: the stage needs `from:`")
                prev = b["from"]
                for r in range(1, rounds + 1):
                    rname = name if r == rounds else f"{name}_r{r}"
                    # deep copies: a --set on one round must not reach the others
                    out.append((rname, copy.deepcopy(dict(b, **{"from": prev})), where))
                    prev = rname
            else:
                out.append((name, b, where))
    return out


def _parse_inputs(name: str, kind: str, roles: Mapping[str, kinds.Role], body: dict[str, Any],
                  vars_: dict[str, list[Any]], ctx: _Ctx,
                  where: tuple[str, ...]) -> dict[str, Any]:
    """role -> stage | {name: stage}, shaped and named as the kind's ROLES declare."""
    inputs: dict[str, Any] = {}
    accepted = ", ".join(f"`{FIELD_OF_ROLE[r]}`" for r in roles) or "no inputs"
    for fld, role in ROLE_OF_FIELD.items():
        if fld not in body:
            continue
        value, decl = body[fld], roles.get(role)
        if decl is None:
            raise ctx.error(where + (fld,), f"kind {kind} takes no `{fld}` input (it accepts "
                            f"{accepted})")
        if not decl.many:
            if not isinstance(value, str):
                raise ctx.error(where + (fld,), f"`{fld}` names one stage, got {value!r}")
            inputs[role] = value
            continue
        if isinstance(value, str) and decl.default_name:
            value = {decl.default_name: value}
        if decl.schedule and isinstance(value, dict):
            value = _schedules(value, fld, ctx, where)
        if not isinstance(value, dict) or not value or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise ctx.error(where + (fld,), f"`{fld}` is a mapping {{name: stage}} (write "
                            f"{decl.shape(fld)}), got {value!r}")
        expanded: dict[str, str] = {}
        for k, v in value.items():
            var = next((n for n in vars_ if any(m in k for m in _placeholders(n))), None)
            if var is None:
                expanded[k] = v
            else:
                for item in vars_[var]:
                    marks = _placeholders(var)
                    expanded[_subst(k, marks, item)] = _subst(v, marks, item)
        if decl.names is not None:
            for k in expanded:
                if k not in decl.names:
                    raise ctx.error(where + (fld, k), f"kind {kind} reads `{fld}` named "
                                    f"{', '.join(decl.names)} only: {k!r} would be ignored "
                                    f"(yet change the key); write {decl.shape(fld)}")
            missing = [n for n in decl.names if n not in expanded]
            if missing:
                raise ctx.error(where + (fld,), f"kind {kind} needs `{fld}` named "
                                f"{', '.join(missing)}; write {decl.shape(fld)}")
        inputs[role] = expanded
    for role, decl in roles.items():
        if decl.required and role not in inputs:
            raise ctx.error(where, f"stage {name!r} (kind {kind}) needs `{FIELD_OF_ROLE[role]}:` "
                            f"({decl.description or decl.accepts})")
    return inputs


def _schedules(value: dict[Any, Any], fld: str, ctx: _Ctx,
               where: tuple[str, ...]) -> dict[str, Any]:
    """`{route: [s1, s2, ..]}` (a schedule: phase k trains against s_k) -> `{route#1: s1,
    route#2: s2, ..}`; a plain `{route: stage}` or a one-item list stays `{route: stage}`."""
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(k, str) and kinds.PHASE_SEP in k:
            raise ctx.error(where + (fld, k), f"a name under `{fld}` may not contain "
                            f"{kinds.PHASE_SEP!r} (it numbers the phases of a schedule); "
                            "rename it")
        if not isinstance(v, list):
            out[k] = v
            continue
        if not v or not all(isinstance(x, str) for x in v):
            raise ctx.error(where + (fld, str(k)), f"a schedule is a non-empty list of stages "
                            f"or snapshots, e.g. [rl_{k}@125, rl_{k}@250, rl_{k}], got {v!r}")
        if len(v) == 1:
            out[k] = v[0]
            continue
        for i, x in enumerate(v, 1):
            out[f"{k}{kinds.PHASE_SEP}{i}"] = x
    return out


def _parse_snapshots(body: dict[str, Any], kind: str, kspec: kinds.KindSpec,
                     config: dict[str, Any], launch: Launch, ctx: _Ctx,
                     where: tuple[str, ...]) -> tuple[tuple[int, ...], bool]:
    """(`snapshots` steps, `eval_snapshots`): the union of `snapshots: [steps]` and every
    multiple of `snapshot_every: N` below max_steps (the last step is the stage itself)."""
    fields_ = [f for f in ("snapshots", "snapshot_every", "eval_snapshots") if f in body]
    if not fields_:
        return (), False
    if not kspec.snapshots:
        able = ", ".join(k for k in tasks.KINDS if kinds.spec(k).snapshots)
        raise ctx.error(where + (fields_[0],), f"kind {kind} publishes no snapshots (only "
                        f"training kinds that declare SNAPSHOTS do: {able}); remove "
                        f"{fields_[0]}")
    if launch.distributed:
        raise ctx.error(where + (fields_[0],), "snapshots are not supported with `launch:` "
                        "(data-parallel ranks) yet; remove one of them")
    total = config.get("max_steps")
    raw = body.get("snapshots", [])
    if not isinstance(raw, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                            for x in raw):
        raise ctx.error(where + ("snapshots",), "snapshots is a list of steps, e.g. "
                        f"snapshots: [250, 500], got {raw!r}")
    steps = set(raw)
    for i, x in enumerate(raw):
        if not 1 <= x < total:
            raise ctx.error(where + ("snapshots", str(i)), f"snapshot step {x} is not in 1.."
                            f"{total - 1} (max_steps is {total}; the last step is the stage "
                            "itself: name the stage, not a snapshot)")
    if "snapshot_every" in body:
        n = body["snapshot_every"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < total:
            raise ctx.error(where + ("snapshot_every",), f"snapshot_every is a step interval "
                            f"in 1..{total - 1} (max_steps is {total}), got {n!r}")
        steps.update(range(n, total, n))
    ev = body.get("eval_snapshots", False)
    if not isinstance(ev, bool):
        raise ctx.error(where + ("eval_snapshots",), f"eval_snapshots is true or false, got "
                        f"{ev!r}")
    if not steps:
        raise ctx.error(where + (fields_[0],), "no snapshot step: give `snapshots: [steps]` "
                        "or `snapshot_every: N`")
    return tuple(sorted(steps)), ev


def _check_snapshot_refs(specs: dict[str, StageSpec], ctx: _Ctx, syntax: bool = False) -> None:
    """Every `STAGE@STEP` is well formed (`syntax`), names a step that STAGE saves (its
    `snapshots`), and no `use:`."""
    for s in specs.values():
        for role, sub, ref in s.refs():
            at = _path(s) + (FIELD_OF_ROLE[role],) + ((kinds.split_phase(sub)[0],) if sub
                                                      else ())
            if "@" in ref and not kinds.SNAPSHOT_REF_RE.match(ref):
                raise ctx.error(at, f"{ref!r}: a snapshot is named STAGE@STEP with an integer "
                                "step, e.g. rl_arith@250")
            stage, step = kinds.split_ref(ref)
            if step is None or syntax:
                continue
            p = specs[stage]
            if p.kind == "use":
                raise ctx.error(at, f"{stage!r} is a `use:` pin of one artifact; name the "
                                f"snapshot in its use: instead (use: RECIPE:STAGE@{step})")
            if step not in p.snapshots:
                saved = ", ".join(map(str, p.snapshots)) or "none"
                raise ctx.error(at, f"stage {stage!r} saves no snapshot at step {step} (it "
                                f"saves: {saved}); add {step} to its `snapshots:` or name a "
                                "saved step")


def _validate_config(spec: kinds.KindSpec, cfg: dict[str, Any], ctx: _Ctx,
                     where: tuple[str, ...], recipe_dir: Path,
                     set_by: dict[tuple[str, ...], str] | None = None) -> dict[str, Any]:
    fields = tuple(spec.config.model_fields)
    for key in cfg:
        if key not in fields:
            raise ctx.error(where + (str(key),), f"unknown field {key!r} for kind {spec.name}"
                            f"{closest(str(key), fields + STAGE_FIELDS)}")
    if "prepare" in spec.hooks:  # e.g. a data file's path, relative to the recipe
        try:
            cfg = spec.hooks["prepare"](cfg, recipe_dir)
        except kinds.KindCheckError as e:
            raise ctx.error(where + e.where, e.message) from None
    try:
        return spec.config(**cfg).model_dump(mode="json")
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err["loc"])
        got = err.get("input")
        got_s = "" if isinstance(got, dict) and not loc else f" (got {got!r})"
        blame = [item for p, item in (set_by or {}).items() if loc[:len(p)] == p or not loc]
        from_s = f" (from {', '.join(blame)})" if blame else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise ctx.error(where + loc, f"{msg}{got_s}{from_s}") from None


def _nodes(specs: Mapping[str, StageSpec]) -> dict[str, kinds.Node]:
    return {n: kinds.Node(n, None if s.kind == "use" else s.kind, s.config, s.inputs,
                          _path(s)) for n, s in specs.items()}


def _check_edges(specs: dict[str, StageSpec], ctx: _Ctx) -> dict[str, StageSpec]:
    """Every edge against the kind contract: the parent produces the artifact type the role
    accepts and the dataset columns it reads; then each kind's own `check` hook (route
    coverage, idle teachers, ...). Returns the specs with the hooks' warnings attached.
    A `use:` parent is checked by plan, once its manifest is read."""
    nodes = _nodes(specs)
    out: dict[str, StageSpec] = {}
    fingerprints: dict[str, dict | None] = {}  # root stage -> its tokenizer, read once
    for s in specs.values():
        if s.kind == "use":
            out[s.name] = s
            continue
        spec = kinds.spec(s.kind)
        for role, decl in spec.roles.items():
            for sub, parent in nodes[s.name].parents(role).items():
                p = specs[parent]
                at = _path(s) + (FIELD_OF_ROLE[role],) + ((sub,) if sub else ())
                if p.kind == "use":
                    continue
                made = kinds.spec(p.kind).produces
                if made != decl.accepts:
                    raise ctx.error(at, f"`{FIELD_OF_ROLE[role]}` takes a {decl.accepts}, but "
                                    f"stage {parent!r} (kind {p.kind}) produces a {made}; name "
                                    f"a {decl.accepts} stage here")
                cols = kinds.columns_of(nodes[parent]) if decl.columns else None
                lack = sorted(set(decl.columns) - cols) if cols is not None else []
                if lack:
                    raise ctx.error(at, f"kind {s.kind} reads {', '.join(decl.columns)} from "
                                    f"every row, but the rows of stage {parent!r} lack "
                                    f"{', '.join(lack)}; add the column(s) to its data")
        _check_tokenizers(s, spec, nodes, ctx, fingerprints)
        warnings: list[str] = []
        if "check" in spec.hooks:
            try:
                warnings = list(spec.hooks["check"](nodes[s.name], nodes) or [])
            except kinds.KindCheckError as e:
                raise ctx.error(_path(s) + e.where, e.message) from None
        out[s.name] = dataclasses.replace(s, warnings=tuple(warnings)) if warnings else s
    return out


def _check_tokenizers(s: StageSpec, spec: kinds.KindSpec, nodes: Mapping[str, kinds.Node],
                      ctx: _Ctx, cache: dict[str, dict | None]) -> None:
    """Every model stage `s` reads (its `from:`, reward models, teachers, reference, ...) carries
    the tokenizer of its `from:` (or of the first such input), as far as the recipe tells: an RM
    or teacher built on another vocabulary would read other token ids than the policy writes.
    Inputs that share their root stage share it; others are compared by their roots' `tokenizer`
    hook (tasks/kind.py), so only a recipe with two differing roots reads any tokenizer."""
    roots = [(role, sub, parent, root) for role, decl in spec.roles.items()
             if decl.accepts != "dataset"
             for sub, parent in nodes[s.name].parents(role).items()
             if (root := kinds.tokenizer_root(parent, nodes)) is not None]
    if len({root.name for *_, root in roots}) < 2:
        return
    from tasks.compat import fingerprint_diff

    for root in {root.name: root for *_, root in roots}.values():
        if root.name not in cache:
            cache[root.name] = kinds.hook(root, "tokenizer")
    known = [(role, sub, parent, root) for role, sub, parent, root in roots
             if cache[root.name] is not None]
    if len(known) < 2:
        return
    _, _, first, first_root = known[0]
    for role, sub, parent, root in known[1:]:
        diff = fingerprint_diff(cache[first_root.name], cache[root.name], (parent, first))
        if diff:
            at = _path(s) + (FIELD_OF_ROLE[role],) + ((sub,) if sub else ())
            raise ctx.error(at, f"stage {parent!r} carries the tokenizer of {root.name!r}, "
                            f"stage {first!r} that of {first_root.name!r}, and they differ "
                            f"({'; '.join(diff)}); build both from bases with one tokenizer")


def _path(spec: StageSpec) -> tuple[str, ...]:
    """The YAML path of the template a stage came from: ("stages", <name as written>), or
    ("stages", <group>, "stages", <member>) for a member of a group of rounds."""
    return rounds_mod.yaml_path(spec.where)


def _toposort(specs: dict[str, StageSpec], ctx: _Ctx) -> dict[str, StageSpec]:
    order: list[str] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = stack[stack.index(n):] + [n]
            raise ctx.error(_path(specs[n]), f"cycle: {' -> '.join(cycle)}; a stage cannot "
                            "depend on itself, directly or through others")
        state[n] = 1
        stack.append(n)
        for p in specs[n].parents():
            visit(p)
        stack.pop()
        state[n] = 2
        order.append(n)

    for n in specs:
        visit(n)
    return {n: specs[n] for n in order}





def _set_targets(stages: list[tuple[str, dict[str, Any], tuple]]) -> dict[str, list[str]]:
    """The stages a --set NAME reaches. A stage name: that stage (under `rounds`, the bare
    name is the last round and `NAME_rK` round K). A foreach template as written
    (`rl_{domain}`): the same as one --set per value, i.e. every copy's stage of that name."""
    names = {n for n, _, _ in stages}
    targets: dict[str, list[str]] = {n: [n] for n in names}
    for i, (name, _, where) in enumerate(stages):
        tname = str(where[-1])
        if tname in names:
            continue  # no foreach: the template's name is its (last round's) stage name
        nxt = stages[i + 1] if i + 1 < len(stages) else None
        m = re.fullmatch(r"(.+)_r(\d+)", name)
        if m and nxt and nxt[2] == where and nxt[1].get("from") == name \
                and nxt[0] in (m.group(1), f"{m.group(1)}_r{int(m.group(2)) + 1}"):
            continue  # an earlier round of one copy: `rounds` chains it into the next
        targets.setdefault(tname, []).append(name)
    return targets


def _apply_sets(stages: list[tuple[str, dict[str, Any], tuple]], sets: tuple[str, ...],
                file: str) -> list[tuple[str, dict[str, Any], tuple]]:
    """Apply each `--set NAME.dotted.path=value` (value read as YAML) to the expanded bodies;
    NAME is a stage or a foreach template (_set_targets), its longest prefix that names one."""
    by_name = {n: b for n, b, _ in stages}
    targets = _set_targets(stages)
    templates = [t for t in targets if t not in by_name]
    for item in sets:
        if "=" not in item:
            raise RecipeError(file, f"--set {item}", "expected stage.path=value, e.g. "
                              "--set rl_arith.max_steps=120")
        path, raw = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) < 2 or not all(parts):
            raise RecipeError(file, f"--set {path}", "expected stage.path=value with a field "
                              "after the stage, e.g. --set rl_arith.max_steps=120")
        cut = next((k for k in range(len(parts) - 1, 0, -1)
                    if ".".join(parts[:k]) in targets), 1)  # stage names may contain '.'
        sname, fpath = ".".join(parts[:cut]), parts[cut:]
        if sname not in targets:
            listed = f"; foreach templates: {', '.join(templates)}" if templates else ""
            raise RecipeError(file, f"--set {path}", f"no stage {sname!r}"
                              f"{closest(sname, tuple(targets))}; stages: "
                              f"{', '.join(by_name)}{listed}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        for stage in targets[sname]:
            body = by_name[stage]
            kind = body.get("kind")
            fields: tuple[str, ...] = STAGE_FIELDS
            if kind in tasks.KINDS:
                fields = fields + tuple(tasks.module_for(kind).Config.model_fields)
            if fpath[0] not in fields:
                raise RecipeError(file, f"--set {path}", f"stage {sname!r} has no field "
                                  f"{fpath[0]!r}{closest(fpath[0], fields)}")
            if fpath[0] in ("foreach", "rounds"):
                raise RecipeError(file, f"--set {path}", f"`{fpath[0]}` is expanded before "
                                  "--set applies (stage names depend on it); edit the recipe "
                                  "instead")
            target = body
            for p in fpath[:-1]:
                nxt = target.get(p)
                if nxt is None:
                    nxt = target[p] = {}
                if not isinstance(nxt, dict):
                    raise RecipeError(file, f"--set {path}", f"{p!r} is not a mapping")
                target = nxt
            target[fpath[-1]] = copy.deepcopy(value)  # copies: a later --set on one stays there
    return stages


def _parse_launch(raw: Any, recipe_dir: Path, ctx: Any, where: tuple[str, ...]) -> Launch:
    if raw is None:
        return Launch()
    shape = "launch is {processes: N, accelerate: path/to/accelerate_config.yaml}"
    if not isinstance(raw, dict):
        raise ctx.error(where + ("launch",), f"{shape}, got {raw!r}")
    for k in raw:
        if k not in ("processes", "accelerate"):
            raise ctx.error(where + ("launch", str(k)), f"unknown launch field {k!r}"
                            f"{closest(str(k), ('processes', 'accelerate'))}; {shape}")
    n = raw.get("processes", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ctx.error(where + ("launch", "processes"), f"processes must be an integer >= 1, "
                        f"got {n!r}")
    cfg = raw.get("accelerate")
    if cfg is None:
        return Launch(n)
    if not isinstance(cfg, str) or not cfg.strip():
        raise ctx.error(where + ("launch", "accelerate"), "accelerate is the path of an "
                        "accelerate config file, e.g. ../infra/deepspeed/zero2.yaml")
    path = Path(cfg).expanduser()
    path = path if path.is_absolute() else recipe_dir / path
    if not path.is_file():
        raise ctx.error(where + ("launch", "accelerate"), f"no accelerate config at {path} "
                        "(paths are relative to the recipe file); fix the path")
    return Launch(n, str(path.resolve()))


def _parse_resume_every(body: dict[str, Any], kind: str, resumable: bool, launch: Launch,
                        ctx: Any, where: tuple) -> int | None:
    """`resume_every: N`, N >= 1 steps between resumable snapshots (absent: off).

    Off by default: a snapshot is the weights plus the optimizer's moments (about 3x the
    model) written every N steps, a disk cost to choose per stage, not to find."""
    if "resume_every" not in body:
        return None
    n = body["resume_every"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ctx.error(where + ("resume_every",), "resume_every is the number of steps "
                        f"between resumable snapshots, an integer >= 1, got {n!r}; remove it "
                        "to train without them")
    if not resumable:
        raise ctx.error(where + ("resume_every",), f"kind {kind} cannot resume (only training "
                        f"kinds that declare RESUMABLE do: {', '.join(_resumable_kinds())}); "
                        "remove resume_every")
    if launch.distributed:
        raise ctx.error(where + ("resume_every",), "resume_every is not supported with "
                        "`launch:` (data-parallel ranks) yet; remove one of them")
    return n


def _parse_use_recipe(raw: dict[str, Any], recipe_dir: Path, ctx: _Ctx,
                      where: tuple[str, ...]) -> tuple[str, str]:
    """`use: {recipe: path/to/their.yaml, stage: STAGE[@STEP]}` -> (stage ref, absolute
    recipe path): another team's stage, keyed from their recipe file even before it is built."""
    shape = "use: {recipe: path/to/their.yaml, stage: rl_arith@250}"
    extra = sorted(set(raw) - {"recipe", "stage"})
    if extra:
        raise ctx.error(where + ("use", str(extra[0])), f"unknown field {extra[0]!r}; {shape}")
    file, stage = raw.get("recipe"), raw.get("stage")
    if not isinstance(file, str) or not file.strip():
        raise ctx.error(where + ("use", "recipe"), f"recipe is the path of the other team's "
                        f"recipe file (relative to this one); {shape}")
    if not isinstance(stage, str) or not NAME_RE.match(kinds.split_ref(stage)[0]) or (
            "@" in stage and not kinds.SNAPSHOT_REF_RE.match(stage)):
        raise ctx.error(where + ("use", "stage"), f"stage is a stage name of that recipe, or "
                        f"STAGE@STEP for one of its snapshots, got {stage!r}; {shape}")
    path = Path(file).expanduser()
    path = path if path.is_absolute() else recipe_dir / path
    if not path.is_file():
        raise ctx.error(where + ("use", "recipe"), f"no recipe file at {path} (paths are "
                        "relative to this recipe); fix the path")
    return stage, str(path.resolve())


def _resumable_kinds() -> list[str]:
    return [k for k in tasks.KINDS if kinds.spec(k).resumable]


def parse(path: str | Path, sets: list[str] | tuple[str, ...] = (),
          scale: float = 1.0) -> Recipe:
    """Read, validate and expand a recipe file (at `scale`, module docstring). Raises
    RecipeError on any user error."""
    scale = check_scale(scale, str(path))
    doc, ctx = load_yaml(path)
    for key in doc:
        if key not in TOP_FIELDS:
            raise ctx.error((str(key),), f"unknown top-level field {key!r}"
                            f"{closest(str(key), TOP_FIELDS)}; a recipe has "
                            f"{', '.join(TOP_FIELDS)}")
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ctx.error(("name",), f"recipe `name:` must be a word (letters, digits, _ - .), got "
                        f"{name!r}")
    vars_ = doc.get("vars") or {}
    if not isinstance(vars_, dict):
        raise ctx.error(("vars",), "vars is a mapping {name: [values]}")
    for k, v in vars_.items():
        if not isinstance(v, list) or not v or not all(isinstance(x, str | int) for x in v):
            raise ctx.error(("vars", str(k)), "a var is a non-empty list of names or numbers")
        if len(set(v)) != len(v):
            raise ctx.error(("vars", str(k)), "a var's values must be distinct")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ctx.error(("defaults",), "defaults is a mapping {kind: {field: value}}")
    for k, v in defaults.items():
        if k not in tasks.KINDS:
            hint = closest(str(k), tuple(tasks.KINDS))
            raise ctx.error(("defaults", str(k)), f"unknown kind {k!r}{hint}; known kinds: "
                            f"{', '.join(tasks.KINDS)}")
        if not isinstance(v, dict):
            raise ctx.error(("defaults", str(k)), "defaults for a kind are a mapping of fields")
    stages_doc = doc.get("stages")
    if not isinstance(stages_doc, dict) or not stages_doc:
        raise ctx.error(("stages",), "a recipe needs `stages:`, a mapping {name: stage}")
    doc = dict(doc, vars=vars_)
    expanded = _expand_templates(doc, ctx)
    seen: dict[str, tuple] = {}
    for sname, _, where in expanded:
        if sname in seen:
            raise ctx.error(where, f"duplicate stage name {sname!r} after expansion (also from "
                            f"{'.'.join(seen[sname])}); rename one of them")
        seen[sname] = where
    expanded = _apply_sets(expanded, tuple(sets), ctx.file)

    recipe_dir = Path(path).resolve().parent
    specs: dict[str, StageSpec] = {}
    step_maps: dict[str, tuple[int, int]] = {}  # --scale: stage -> (full, scaled) max_steps
    for sname, body, where in expanded:
        if "use" in body:
            extra = sorted(set(body) - {"use", "description", "resources"})
            if extra:
                raise ctx.error(where + (extra[0],), "a `use:` stage pins an existing artifact "
                                f"and takes no other fields: remove `{extra[0]}` (or `use:` to "
                                "build the stage)")
            if isinstance(body["use"], dict):
                stage, their = _parse_use_recipe(body["use"], recipe_dir, ctx, where)
                specs[sname] = StageSpec(sname, "use", {}, {}, use=stage, use_recipe=their,
                                         where=".".join(where))
                continue
            if not isinstance(body["use"], str) or not body["use"].strip():
                raise ctx.error(where + ("use",), "use: takes a key, recipe:stage, "
                                "recipe:stage@STEP, models:/name@alias, or {recipe: "
                                "path/to/their.yaml, stage: STAGE[@STEP]}")
            specs[sname] = StageSpec(sname, "use", {}, {}, use=body["use"].strip(),
                                     where=".".join(where))
            continue
        if "kind" not in body:
            raise ctx.error(where, f"missing `kind:` (known kinds: {', '.join(tasks.KINDS)}) "
                            "or `use: <ref>`")
        kind = body["kind"]
        kspec = _kind_spec(kind, ctx, where)
        cfg = {k: v for k, v in body.items() if k not in STAGE_FIELDS}
        cfg = _deep_merge(defaults.get(kind, {}), cfg)
        set_by = {tuple(i.split("=", 1)[0].strip().split(".")[1:]): f"--set {i}"
                  for i in sets if i.split(".", 1)[0] in (sname, where[-1])}
        config = _validate_config(kspec, cfg, ctx, where, recipe_dir, set_by)
        if scale != 1 and "scale" in kspec.hooks:
            full = config.get("max_steps")
            config = _scaled(kspec, config, scale, ctx, where)
            if isinstance(full, int) and any(f in body for f in scaling.SNAPSHOT_FIELDS):
                step_maps[sname] = (full, config["max_steps"])  # snapshots move with the run
                body = scaling.snapshot_fields(body, full, config["max_steps"])
        inputs = _parse_inputs(sname, kind, kspec.roles, body, vars_, ctx, where)
        res = body.get("resources") or {}
        shape = "{cpus: N, gpus: N, custom: {RAY_RESOURCE: N}}"
        if not isinstance(res, dict):
            raise ctx.error(where + ("resources",), f"resources is {shape}, got {res!r}")
        for k in res:
            if k not in ("cpus", "gpus", "custom"):
                raise ctx.error(where + ("resources", str(k)), f"unknown resource {k!r}"
                                f"{closest(str(k), ('cpus', 'gpus', 'custom'))}; resources is "
                                f"{shape} (a Ray node's own resource goes under custom)")
        custom = res.get("custom") or {}
        if not isinstance(custom, dict):
            raise ctx.error(where + ("resources", "custom"), "custom is a map of Ray resource "
                            f"names to amounts, e.g. {{node_a: 1}}, got {custom!r}")
        for k, v in custom.items():
            if not isinstance(k, str) or k in ("CPU", "GPU", "memory") or not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise ctx.error(where + ("resources", "custom", str(k)), "a custom resource is "
                                "a Ray resource name (not CPU/GPU/memory: use cpus/gpus) with "
                                f"an amount > 0, got {k!r}: {v!r}")
        for k, v in res.items():
            if k == "custom":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if k == "cpus" else 0):
                raise ctx.error(where + ("resources", k), f"{k} must be an integer >= "
                                f"{1 if k == 'cpus' else 0}, got {v!r}")
        retries = body.get("retries", 0)
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ctx.error(where + ("retries",), f"retries must be an integer >= 0, got "
                            f"{retries!r}")
        verify = body.get("verify_inputs", "hash")
        if verify not in VERIFY_MODES:
            raise ctx.error(where + ("verify_inputs",), f"verify_inputs is `hash` (sha256 of "
                            f"every input file, the default) or `size` (sizes only), got "
                            f"{verify!r}")
        launch = _parse_launch(body.get("launch"), recipe_dir, ctx, where)
        resume_every = _parse_resume_every(body, kind, kspec.resumable, launch, ctx, where)
        snaps, eval_snaps = _parse_snapshots(body, kind, kspec, config, launch, ctx, where)
        specs[sname] = StageSpec(sname, kind, config, inputs, Resources(**res), retries,
                                 where=".".join(where), launch=launch, verify_inputs=verify,
                                 resume_every=resume_every, snapshots=snaps,
                                 eval_snapshots=eval_snaps)

    if step_maps:  # `STAGE@STEP` refs follow their snapshots into the scaled run
        specs = {n: scaling.rescale_refs(s, step_maps) for n, s in specs.items()}
    _check_snapshot_refs(specs, ctx, syntax=True)
    for s in specs.values():
        for p in s.parents():
            if p not in specs:
                role = next(r for r, _, ref in s.refs() if kinds.split_ref(ref)[0] == p)
                fld = FIELD_OF_ROLE[role]
                raise ctx.error(_path(s) + (fld,), f"stage {s.name!r} refers "
                                f"to missing stage {p!r}{closest(p, tuple(specs))}")
    _check_snapshot_refs(specs, ctx)
    ordered = _check_edges(_toposort(specs, ctx), ctx)
    return Recipe(scaled_name(name, scale), str(doc.get("description") or ""), Path(path),
                  vars_, ordered, tuple(sets), scale)


def check_scale(scale: Any, file: str) -> float:
    """`--scale` as a float in (0, 1], or RecipeError naming the value and the fix."""
    ok = isinstance(scale, int | float) and not isinstance(scale, bool) and 0 < scale <= 1
    if not ok:
        raise RecipeError(file, "--scale", f"the scale is a number in (0, 1] (0.1 shrinks every "
                          f"stage's steps and sizes tenfold; 1 is the recipe as written), got "
                          f"{scale!r}")
    return float(scale)


def scaled_name(name: str, scale: float) -> str:
    """The recipe name at `scale`: itself at 1, `NAME-xF` otherwise (refs, lock, MLflow).

    >>> scaled_name("llama3", 1.0), scaled_name("llama3", 0.1), scaled_name("r1", 0.25)
    ('llama3', 'llama3-x0.1', 'r1-x0.25')
    """
    return name if scale == 1 else f"{name}-x{scale:g}"


def _scaled(kspec: kinds.KindSpec, config: dict[str, Any], scale: float, ctx: _Ctx,
            where: tuple[str, ...]) -> dict[str, Any]:
    """The kind's `scale` hook on a validated config, validated again."""
    try:
        return kspec.config(**kspec.hooks["scale"](dict(config), scale)).model_dump(mode="json")
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err["loc"])
        raise ctx.error(where + loc, f"at --scale {scale:g}: {err['msg']}; use a larger scale "
                        "or set the field explicitly") from None


if __name__ == "__main__":
    try:
        r = parse(sys.argv[1], sys.argv[2:])
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for s in r.stages.values():
        print(f"{s.name:<16} {s.kind:<6} <- {s.inputs}")
