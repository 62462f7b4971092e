"""Progressive teachers for `mopd`: a route trained against a schedule of one teacher's snapshots.

A recipe writes `teachers: {arith: [rl_arith@125, rl_arith@250, rl_arith]}`; the recipe loader
expands it into the inputs `arith#1`, `arith#2`, `arith#3` (tasks/kind.py PHASE_SEP), phase k
scored by the k-th teacher (Panigrahi et al., arXiv 2410.05464: a student taught by a teacher's
successive checkpoints learns what the final one alone does not teach). Phases switch at equal
fractions of `max_steps` (n phases: phase k starts at step floor((k-1) * max_steps / n) + 1) or
at the mopd config's `switch_at`: a list of n-1 first steps of phases 2..n for every scheduled
route, or a mapping `{route: [steps]}`. A phase's teacher is loaded when its phase starts (only
one teacher per route is resident), and, when it is a snapshot still being trained, waited for
(tasks/snapshots.py `await_input`): a MOPD stage can start on a teacher's first snapshot while
the teacher keeps training.

The stage's manifest (metrics.train.teacher_schedule) records which teacher scored which steps;
the lineage has one edge per phase (`teacher:arith#2`).

Run: ``.venv/bin/python -m pytest tests/test_snapshots.py -q -k schedule``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from artifacts.refs import ArtifactRef, Inputs, StageInputError
from tasks.kind import KindCheckError, split_phase


def phases(names: Iterable[str]) -> dict[str, list[str]]:
    """route -> its input names in phase order (one name for a route without a schedule).

    >>> phases(["arith#2", "arith#1", "sort"])
    {'arith': ['arith#1', 'arith#2'], 'sort': ['sort']}
    """
    out: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        route, k = split_phase(name)
        out.setdefault(route, []).append((k or 1, name))
    return {r: [n for _, n in sorted(v)] for r, v in sorted(out.items())}


def starts(route: str, n: int, max_steps: int, switch_at: Any) -> list[int]:
    """First step of each of the `n` phases of `route`.

    >>> starts("arith", 3, 300, None), starts("arith", 2, 300, [50]), starts("a", 1, 9, [4])
    ([1, 101, 201], [1, 50], [1])
    """
    if n == 1:
        return [1]
    given = switch_at.get(route) if isinstance(switch_at, Mapping) else switch_at
    if given is None:
        return [(k * max_steps) // n + 1 for k in range(n)]
    return [1, *given]


def check(teachers: Mapping[str, str], switch_at: Any, max_steps: int) -> None:
    """Plan-time check of `switch_at` against the schedules (KindCheckError with the place)."""
    table = phases(teachers)
    scheduled = {r: len(v) for r, v in table.items() if len(v) > 1}
    if switch_at is None:
        for route, n in scheduled.items():
            if max_steps < n:
                raise KindCheckError(("max_steps",), f"route {route!r} has {n} teacher phases "
                                     f"but max_steps is {max_steps}: give each phase a step")
        return
    if not scheduled:
        raise KindCheckError(("switch_at",), "switch_at needs a teacher schedule (a route "
                             "with a list of teachers, e.g. arith: [rl_arith@125, rl_arith])")
    if isinstance(switch_at, Mapping):
        for route in switch_at:
            if route not in scheduled:
                raise KindCheckError(("switch_at", str(route)), f"route {route!r} has no "
                                     f"teacher schedule (scheduled: {', '.join(scheduled)})")
    for route, n in scheduled.items():
        given = switch_at.get(route) if isinstance(switch_at, Mapping) else switch_at
        if given is None:
            continue
        at = ("switch_at", route) if isinstance(switch_at, Mapping) else ("switch_at",)
        if len(given) != n - 1:
            raise KindCheckError(at, f"route {route!r} has {n} teacher phases: switch_at "
                                 f"needs {n - 1} steps (where phases 2..{n} start), got "
                                 f"{list(given)}")
        prev = 1
        for x in given:
            if not prev < x <= max_steps:
                raise KindCheckError(at, f"switch_at steps must increase within 2..{max_steps} "
                                     f"(max_steps), got {list(given)}")
            prev = x


class Schedule:
    """Which teacher scores each route at each step; loads (and waits for) it at its switch.

    `load(name) -> model` returns the teacher model of input `name` (checked and on device);
    `keys` maps input name -> (key, stage) for the record."""

    def __init__(self, names: Iterable[str], max_steps: int, switch_at: Any,
                 load: Callable[[str], Any], refs: Mapping[str, tuple[str, str]]) -> None:
        self.table = phases(names)
        self.max_steps, self.load, self.refs = max_steps, load, refs
        self.starts = {r: starts(r, len(v), max_steps, switch_at) for r, v in self.table.items()}
        self.current: dict[str, str] = {}

    def active(self, step: int) -> dict[str, str]:
        """route -> input name that scores it at `step`."""
        out = {}
        for route, names in self.table.items():
            k = max(i for i, s in enumerate(self.starts[route]) if s <= step)
            out[route] = names[k]
        return out

    def apply(self, step: int, teachers: dict[str, Any], used: Iterable[str]) -> list[str]:
        """Put the teachers of `step` into `teachers` (route -> model) for the `used` routes;
        returns the input names switched to (loaded) at this step."""
        switched = []
        for route, name in self.active(step).items():
            if route in used and self.current.get(route) != name:
                teachers[route] = None  # the previous phase's model goes before the next loads
                teachers[route] = self.load(name)
                self.current[route] = name
                switched.append(name)
        return switched

    def record(self) -> dict[str, list[dict[str, Any]]]:
        """route -> [{teacher, key, stage, steps: [first, last]}]: who scored which steps."""
        out = {}
        for route, names in self.table.items():
            bounds = [*self.starts[route], self.max_steps + 1]
            out[route] = [{"teacher": n, "key": self.refs[n][0], "stage": self.refs[n][1],
                           "steps": [bounds[k], bounds[k + 1] - 1]}
                          for k, n in enumerate(names)]
        return out


def ready(teachers: Mapping[str, ArtifactRef]) -> dict[str, ArtifactRef]:
    """The teachers to check before training: every first phase, and a later phase whose model
    is already published (one still training is checked when its phase starts)."""
    return {n: t for n, t in teachers.items()
            if (split_phase(n)[1] or 1) == 1 or (t.manifest and (Path(t.path) / "config.json")
                                                  .exists())}


def build(config: Any, inputs: Inputs, device: Any, warnings: list[str],
          check_teachers: Callable[[Any, Inputs, Mapping[str, ArtifactRef]], list[str]]
          ) -> Schedule:
    """The Schedule of `inputs.teachers` for a mopd `config`: a phase's teacher is waited for
    (a snapshot still being trained), checked like the first ones (`check_teachers`, whose
    warnings join `warnings`), and loaded on `device` when its phase starts."""
    from tasks import models, snapshots

    def load(name: str) -> Any:
        ref = inputs.teachers[name]
        if not ref.manifest or not (Path(ref.path) / "config.json").exists():
            ref = snapshots.await_input(ref)  # a later phase: published by now, or waited for
            if not (Path(ref.path) / "config.json").exists():
                raise StageInputError(f"teacher {name!r} ({ref.stage}) has no model at "
                                      f"{ref.path}")
            warnings.extend(w for w in check_teachers(config, inputs, {name: ref})
                            if w not in warnings)
        model = models.load_model(ref.path).to(device)
        return model.eval().requires_grad_(False)

    refs = {n: (t.key, t.stage) for n, t in inputs.teachers.items()}
    return Schedule(inputs.teachers, config.max_steps, config.switch_at, load, refs)
