"""One typed plan per stage in, one typed result out: what crosses the process boundary.

The flow plans the whole recipe once; each stage task writes its stage's `StagePlan` to
`<run dir>/<stage>.plan.json` and starts ``posttrain stage --plan-file F --result-file R``. The
child builds exactly that planned stage: it never re-parses or re-plans the recipe, so what
runs is what `plan` showed. It always writes a `StageResult` to R (status ``failed`` and its
own error message included), and the flow reads that file, not stdout and not the log. A child
that could not write it (killed by a signal) is known by its return code instead.

Both files carry a ``format`` number; a file with another format, or with a field missing or
unknown, is refused with a message that names the file and the field, never half-read.

Run: written and read by ``posttrain run`` and ``posttrain stage``; nothing to run on its own.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from artifacts.store import atomic_write

if TYPE_CHECKING:
    from flows.plan import PlannedStage
    from flows.recipe import Recipe, StageSpec

FORMAT = 1
STATUSES = ("trained", "reused", "failed", "follower")


class StageFileError(ValueError):
    """A plan or result file that cannot be used (wrong format, missing or unknown field)."""


def _check(cls: type, doc: Any, source: str, types: dict[str, tuple[type, ...]]) -> None:
    """Refuse anything but exactly the fields of `cls`, each of its JSON type, at FORMAT."""
    what = cls.__name__
    if not isinstance(doc, dict):
        raise StageFileError(f"{source}: a {what} file is a JSON object, got "
                             f"{type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise StageFileError(f"{source}: {what} format {doc.get('format')!r}, this posttrain "
                             f"reads format {FORMAT}: plan and run with the same version")
    names = [f.name for f in fields(cls)]
    # A field added later with a default (verify_inputs, resume_every, user_error) may be
    # absent: a file written just before an upgrade still reads, as the default. Every other
    # field must be.
    optional = {f.name for f in fields(cls) if f.default is not MISSING
                or f.default_factory is not MISSING}
    missing = [n for n in names if n not in doc and n not in optional]
    unknown = sorted(set(doc) - set(names) - {"format"})
    if missing or unknown:
        raise StageFileError(f"{source}: not a {what}: "
                             + "; ".join(([f"missing field(s) {', '.join(missing)}"]
                                          if missing else [])
                                         + ([f"unknown field(s) {', '.join(unknown)}"]
                                            if unknown else [])))
    for n in names:
        if n not in doc:  # an optional field left out: its default
            continue
        want = types[n]
        v = doc[n]
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in want):
            names_ = " or ".join("null" if t is type(None) else t.__name__ for t in want)
            raise StageFileError(f"{source}: {what}.{n} must be {names_}, got {v!r}")


def _single(parent: dict[str, Any]) -> bool:
    """{stage, key} (one parent) rather than {name: {stage, key}} (a named map of them)."""
    return isinstance(parent.get("stage"), str)


def _read(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageFileError(f"{path}: no such file") from None
    except ValueError as e:
        raise StageFileError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class StagePlan:
    """Everything `posttrain stage` needs to build one planned stage, and nothing else.

    It answers to the same attributes as a `PlannedStage` (`name`, `key`, `spec`, `input_keys`,
    `code_digest`, `code_files`, `data_digests`), so the build code takes either.
    """

    recipe: str  # recipe name (refs/<recipe>/<stage>)
    recipe_file: str  # absolute path, for messages
    stage: str
    kind: str  # "use" for a pinned artifact
    key: str
    config: dict[str, Any]  # fully resolved (defaults and --set applied)
    input_keys: dict[str, Any]  # role -> key | {name: key}
    parents: dict[str, Any]  # role -> {stage, key} | {name: {stage, key}}
    code_digest: str
    code_files: dict[str, str]  # relative path -> sha256
    data_digests: dict[str, str]
    launch: dict[str, Any]  # {processes: N, accelerate: absolute path | None}
    resources: dict[str, Any]  # {cpus: N, gpus: N, custom: {ray resource: amount}}
    retries: int
    status: str  # "fresh" | "run"
    reasons: tuple[str, ...]
    warnings: tuple[str, ...] = ()  # plan-time warnings, stored in the manifest
    sets: tuple[str, ...] = ()  # the run's --set overrides (for people reading the file)
    use: str | None = None  # the pinned ref of a `use:` stage
    # How the stage checks its inputs against their manifests before training: "hash" (sha256
    # of every file) or "size". Not in the key: it changes no trained byte (flows/recipe.py).
    verify_inputs: str = "hash"
    # Steps between resumable snapshots (None: off). Not in the key either (tasks/resume.py).
    resume_every: int | None = None
    # Steps whose model is published as `<stage>@<step>` while it trains (tasks/snapshots.py),
    # and whether each is evaluated per domain. Not in the key.
    snapshots: tuple[int, ...] = ()
    eval_snapshots: bool = False

    TYPES = {"recipe": (str,), "recipe_file": (str,), "stage": (str,), "kind": (str,),
             "key": (str,), "config": (dict,), "input_keys": (dict,), "parents": (dict,),
             "code_digest": (str,), "code_files": (dict,), "data_digests": (dict,),
             "launch": (dict,), "resources": (dict,), "retries": (int,), "status": (str,),
             "reasons": (list,), "warnings": (list,), "sets": (list,),
             "use": (str, type(None)), "verify_inputs": (str,),
             "resume_every": (int, type(None)), "snapshots": (list,),
             "eval_snapshots": (bool,)}

    @property
    def name(self) -> str:
        return self.stage

    @property
    def spec(self) -> StageSpec:
        """The stage as the recipe had it (inputs by stage name), rebuilt from the plan."""
        from flows.recipe import Launch, Resources, StageSpec

        inputs = {role: (v["stage"] if _single(v) else {n: e["stage"] for n, e in v.items()})
                  for role, v in self.parents.items()}
        return StageSpec(self.stage, self.kind, self.config, inputs,
                         Resources(**self.resources), self.retries, self.use,
                         launch=Launch(**self.launch), warnings=self.warnings,
                         verify_inputs=self.verify_inputs, resume_every=self.resume_every,
                         snapshots=tuple(self.snapshots), eval_snapshots=self.eval_snapshots)

    def parent_stages(self) -> list[str]:
        """Names of the stages this one waits for."""
        return self.spec.parents()

    @classmethod
    def from_planned(cls, ps: PlannedStage, recipe: Recipe) -> StagePlan:
        """The plan of one stage of `recipe`, as `flows.plan.plan` computed it."""
        spec = ps.spec
        parents: dict[str, Any] = {}
        for role, value in spec.inputs.items():
            keys = ps.input_keys.get(role)
            parents[role] = ({n: {"stage": s, "key": keys[n]} for n, s in value.items()}
                             if isinstance(value, dict) else {"stage": value, "key": keys})
        return cls(recipe=recipe.name, recipe_file=str(Path(recipe.path).absolute()),
                   stage=ps.name, kind=spec.kind, key=ps.key, config=spec.config,
                   input_keys=ps.input_keys, parents=parents, code_digest=ps.code_digest,
                   code_files=dict(ps.code_files), data_digests=dict(ps.data_digests),
                   launch=asdict(spec.launch), resources=asdict(spec.resources),
                   retries=spec.retries, status=ps.status, reasons=tuple(ps.reasons),
                   warnings=tuple(getattr(spec, "warnings", ()) or ()),
                   sets=tuple(recipe.sets), use=spec.use, verify_inputs=spec.verify_inputs,
                   resume_every=spec.resume_every, snapshots=tuple(spec.snapshots),
                   eval_snapshots=spec.eval_snapshots)

    def to_json(self) -> str:
        doc = {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | dict[str, Any], source: str = "plan") -> StagePlan:
        doc = json.loads(text) if isinstance(text, str) else text
        _check(cls, doc, source, cls.TYPES)
        if doc["status"] not in ("fresh", "run", "waiting"):
            raise StageFileError(f"{source}: StagePlan.status is fresh, run or waiting, got "
                                 f"{doc['status']!r}")
        if doc.get("verify_inputs", "hash") not in ("hash", "size"):
            raise StageFileError(f"{source}: StagePlan.verify_inputs is hash or size, got "
                                 f"{doc['verify_inputs']!r}")
        if doc.get("resume_every") is not None and doc["resume_every"] < 1:
            raise StageFileError(f"{source}: StagePlan.resume_every is null or an integer >= 1,"
                                 f" got {doc['resume_every']!r}")
        args = {k: v for k, v in doc.items() if k != "format"}
        if not all(isinstance(x, int) and x >= 1 for x in doc.get("snapshots", [])):
            raise StageFileError(f"{source}: StagePlan.snapshots is a list of steps >= 1, got "
                                 f"{doc['snapshots']!r}")
        for k in ("reasons", "warnings", "sets", "snapshots"):
            if k in args:
                args[k] = tuple(args[k])
        return cls(**args)

    def write(self, path: str | Path) -> Path:
        atomic_write(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> StagePlan:
        return cls.from_json(_read(path), str(path))


@dataclass(frozen=True)
class StageResult:
    """How one stage ended: trained, reused, failed (with its own message), or follower (a
    rank > 0 of a data-parallel stage, which keeps nothing)."""

    stage: str
    key: str
    status: str
    seconds: float = 0.0
    error: str | None = field(default=None)
    # The failure is the user's to fix (a bad input, recipe or ref: what `posttrain stage`
    # exits 2 for), so `posttrain run` exits 2 when every failure is one.
    user_error: bool = False

    TYPES = {"stage": (str,), "key": (str,), "status": (str,), "seconds": (float, int),
             "error": (str, type(None)), "user_error": (bool,)}

    @property
    def ok(self) -> bool:
        return self.status in ("trained", "reused")

    def row(self) -> dict[str, Any]:
        """The JSON row `posttrain run --json` prints (no `error` unless it failed)."""
        out: dict[str, Any] = {"stage": self.stage, "key": self.key, "status": self.status,
                               "seconds": self.seconds}
        if self.error is not None:
            out["error"] = self.error
        return out

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | dict[str, Any], source: str = "result") -> StageResult:
        doc = json.loads(text) if isinstance(text, str) else text
        _check(cls, doc, source, cls.TYPES)
        if doc["status"] not in STATUSES:
            raise StageFileError(f"{source}: StageResult.status is one of "
                                 f"{', '.join(STATUSES)}, got {doc['status']!r}")
        return cls(**{k: v for k, v in doc.items() if k != "format"})

    def write(self, path: str | Path) -> Path:
        atomic_write(Path(path), self.to_json())
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> StageResult:
        return cls.from_json(_read(path), str(path))
