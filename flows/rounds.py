"""Rounds over a group of stages: a block of stages repeated N times (Llama 2 / 3, Nemotron 3).

A top-level entry of `stages:` that has `stages:` of its own is a *group*:

    rlhf:                                  # the group's name (no stage is called that)
      rounds: 3                            # required, >= 1
      first:                               # what `best_{prev}` names in round 1
        best_{round}: sft
      per_round:                           # optional overrides, by round number
        3:
          dpo_{round}: {beta: 0.05}        # deep-merged into that round's member
      stages:
        rm_{round}: {kind: reward_model, from: "best_{prev}", data: prefs}
        dpo_{round}: {kind: dpo, from: "best_{prev}", data: "pairs_{round}"}
        best_{round}: {kind: select, candidates: {dpo: "dpo_{round}", prev: "best_{prev}"}}

Every member name contains `{round}`; round r's copy has it replaced by r (`rm_1`, `rm_2` ...).
In every string of a member (names, inputs, config, map keys) `{round}` is r and `{prev}` is
r - 1, so `best_{prev}` is the previous round's `best`. In round 1 there is no previous round:
an input (`from`, `teachers`, `data`, ... ) that names `X_{prev}` is looked up in `first:` under
the member name it refers to (`best_{round}`), and must be found there (a stage outside the
group: round 1's "previous" model). `per_round: {r: {member: {field: value}}}` deep-merges into
round r's copy before the placeholders are filled (so it may use `{round}` and `{prev}` too);
a `null` removes a field or a map entry (a teacher route), and `foreach:` may be overridden
(refresh only some specialists in a round). Members may use `foreach:` and per-stage `rounds:`
as any stage; `--set rm_{round}.max_steps=5` reaches every round's copy, `--set rm_2...` one.
A stage outside the group names a round's stage by its expanded name (`best_3`).

Errors name the YAML place and the fix (flows/recipe.py turns them into exit 2).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

from artifacts.store import NAME_RE
from tasks.kind import ROLE_OF_FIELD

GROUP_FIELDS = ("rounds", "stages", "first", "per_round", "description")
ROUND, PREV = "{round}", "{prev}"
_WHERE = re.compile(r"^stages\.([A-Za-z0-9_-]+)\.stages\.(.+)$")

Entry = tuple[str, dict[str, Any], tuple[str, ...]]


def is_group(body: Any) -> bool:
    """Whether a top-level `stages:` entry is a group (it has `stages:` of its own)."""
    return isinstance(body, dict) and "stages" in body


def yaml_path(where: str) -> tuple[str, ...]:
    """The YAML path tuple of a StageSpec's `where` ("stages.G.stages.M" for a group member).

    >>> yaml_path("stages.rlhf.stages.rm_{round}"), yaml_path("stages.sft")
    (('stages', 'rlhf', 'stages', 'rm_{round}'), ('stages', 'sft'))
    """
    m = _WHERE.match(where)
    return ("stages", m.group(1), "stages", m.group(2)) if m else tuple(where.split(".", 1))


def expand(stages: dict[Any, Any], vars_: dict[str, list[Any]], ctx: Any,
           placeholders: Callable[[str], list[str]]) -> Iterator[Entry]:
    """(template name, body, YAML path) of every top-level stage and every round's copy of
    every group member, in recipe order (a group's rounds in order, members as written)."""
    for tname, body in stages.items():
        if is_group(body):
            yield from _group(str(tname), body, vars_, ctx, placeholders)
        else:
            yield tname, body, ("stages", str(tname))


def _group(gname: str, body: dict[str, Any], vars_: dict[str, list[Any]], ctx: Any,
           placeholders: Callable[[str], list[str]]) -> Iterator[Entry]:
    at = ("stages", gname)
    if not NAME_RE.match(gname) or "." in gname:
        raise ctx.error(at, "a group's name uses letters, digits, '_' and '-'")
    for k in body:
        if k not in GROUP_FIELDS:
            hint = " (a group holds its stages under `stages:`; kind and inputs go on them)" \
                if k in ("kind", "from", "foreach") else ""
            raise ctx.error(at + (str(k),), f"unknown group field {k!r}{hint}; a group has "
                            f"{', '.join(GROUP_FIELDS)}")
    n = body.get("rounds")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ctx.error(at + ("rounds",) if "rounds" in body else at, "a group needs `rounds: "
                        f"N` (an integer >= 1: how many times its stages repeat), got {n!r}")
    members = body["stages"]
    if not isinstance(members, dict) or not members:
        raise ctx.error(at + ("stages",), "a group's `stages:` is a mapping {name_{round}: "
                        "stage} of the stages each round repeats")
    for var in vars_:
        clash = {ROUND, PREV} & set(placeholders(var))
        if clash:
            raise ctx.error(("vars", var), f"var {var!r} gives the placeholder "
                            f"{sorted(clash)[0]}, which group {gname!r} uses for its round; "
                            "rename the var")
    for m, mbody in members.items():
        if not isinstance(m, str) or ROUND not in m or PREV in m:
            raise ctx.error(at + ("stages", str(m)), f"a group member's name contains "
                            f"{ROUND} (and not {PREV}) so that each round's copy gets its own "
                            f"name, e.g. {str(m).replace(PREV, '')}_{{round}}")
        if is_group(mbody):
            raise ctx.error(at + ("stages", m, "stages"), "groups do not nest; list the stages "
                            "of one round in one group")
    first = _first(body, members, ctx, at)
    per_round = _per_round(body, members, n, ctx, at)
    for r in range(1, n + 1):
        for m, mbody in members.items():
            where = at + ("stages", m)
            b = mbody if not isinstance(mbody, dict) else copy.deepcopy(mbody)
            if r in per_round and m in per_round[r]:
                if not isinstance(b, dict):
                    raise ctx.error(where, "a stage is a mapping with at least `kind:`")
                b = merge(b, per_round[r][m])
            if isinstance(b, dict):
                b = _fill_inputs(b, r, first, ctx, where, gname)
                b = _subst(b, {ROUND: str(r), PREV: str(r - 1)})
            yield m.replace(ROUND, str(r)), b, where


def _first(body: dict[str, Any], members: dict[str, Any], ctx: Any,
           at: tuple[str, ...]) -> dict[str, str]:
    first = body.get("first") or {}
    if not isinstance(first, dict) or not all(isinstance(v, str) for v in first.values()):
        raise ctx.error(at + ("first",), "first is a mapping {\"member_{round}\": STAGE}: the "
                        "stage that `member_{prev}` names in round 1")
    for k in first:
        if k not in members:
            raise ctx.error(at + ("first", str(k)), f"{k!r} is not a stage of the group"
                            f"{_closest(str(k), members)}; its stages: {', '.join(members)}")
    return dict(first)


def _per_round(body: dict[str, Any], members: dict[str, Any], n: int, ctx: Any,
               at: tuple[str, ...]) -> dict[int, dict[str, dict[str, Any]]]:
    raw = body.get("per_round") or {}
    shape = "per_round is {ROUND: {member_{round}: {field: value}}}, e.g. per_round: {2: " \
        "{\"mopd_{round}\": {max_steps: 300}}}"
    if not isinstance(raw, dict):
        raise ctx.error(at + ("per_round",), shape)
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for k, over in raw.items():
        r = int(k) if isinstance(k, int) or (isinstance(k, str) and k.isdigit()) else None
        if r is None or isinstance(k, bool) or not 1 <= r <= n:
            raise ctx.error(at + ("per_round", str(k)), f"round {k!r} is not in 1..{n} (the "
                            "group's rounds); name a round by its number")
        if not isinstance(over, dict):
            raise ctx.error(at + ("per_round", str(k)), shape)
        for m, fields in over.items():
            if m not in members:
                raise ctx.error(at + ("per_round", str(k), str(m)), f"{m!r} is not a stage of "
                                f"the group{_closest(str(m), members)}; its stages: "
                                f"{', '.join(members)}")
            if not isinstance(fields, dict):
                raise ctx.error(at + ("per_round", str(k), str(m)), shape)
        out[r] = over
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` deep-merged into `base`; a None value removes the key.

    >>> merge({"t": {"a": "x", "b": "y"}, "n": 1}, {"t": {"b": None, "g": "z"}, "n": 2})
    {'t': {'a': 'x', 'g': 'z'}, 'n': 2}
    """
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _fill_inputs(body: dict[str, Any], r: int, first: dict[str, str], ctx: Any,
                 where: tuple[str, ...], gname: str) -> dict[str, Any]:
    """In round 1, every input naming `X_{prev}` becomes `first[X_{round}]`."""
    if r > 1:
        return body

    def fill(v: Any, path: tuple[str, ...]) -> Any:
        if isinstance(v, dict):
            return {k: fill(x, path + (str(k),)) for k, x in v.items()}
        if isinstance(v, list):
            return [fill(x, path + (str(i),)) for i, x in enumerate(v)]
        if not isinstance(v, str) or PREV not in v:
            return v
        member = v.replace(PREV, ROUND)
        if member not in first:
            raise ctx.error(path, f"{v!r} names the previous round's stage, but round 1 has "
                            f"none; add `first: {{'{member}': STAGE}}` to group {gname!r} (the "
                            "stage it stands for in round 1)")
        return first[member]

    return {k: fill(v, where + (k,)) if k in ROLE_OF_FIELD else v for k, v in body.items()}


def _subst(obj: Any, table: dict[str, str]) -> Any:
    if isinstance(obj, str):
        for mark, value in table.items():
            obj = obj.replace(mark, value)
        return obj
    if isinstance(obj, dict):
        return {_subst(k, table): _subst(v, table) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_subst(v, table) for v in obj]
    return obj


def _closest(word: str, options: Any) -> str:
    import difflib

    hit = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{hit[0]}'?)" if hit else ""
