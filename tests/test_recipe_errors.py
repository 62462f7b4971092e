"""Malformed recipes and CLI arguments: each one is refused before any compute.

Every case (one test id each) breaks a small valid recipe in one place and checks, for both
`posttrain plan` and `posttrain run` (in-process through flows.cli.main):

- exit code 2, and stderr is exactly one `error:` line naming the file, the YAML path (or the
  CLI option) and the fix or suggestion, with no traceback;
- nothing is written: a pre-seeded store stays byte-identical, a store that did not exist is
  not created, there is no lock file and no state dir;
- `run` fails in parse/plan, before Prefect is set up (flows.cli._quiet_env is never reached).

Two cases go through the installed `posttrain` console script as well, to show that no
traceback reaches a user's terminal.

Run: ``.venv/bin/python -m pytest tests/test_recipe_errors.py -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from artifacts.store import Store
from flows import cli

REPO = Path(__file__).resolve().parent.parent
POSTTRAIN = Path(sys.executable).parent / "posttrain"

# A valid recipe in the shape of tests/recipes/spine_tiny.yaml; every case edits one place.
BASE = """\
name: errs
description: a small valid recipe that each case breaks in one place
vars:
  domains: [arith, reverse]
defaults:
  grpo: {max_steps: 1, num_generations: 2}
stages:
  data:
    kind: data
    domains: ${domains}
    size: 16
  base:
    kind: base
    hidden_size: 16
    num_layers: 1
    num_heads: 2
    intermediate_size: 32
  sft:
    kind: sft
    from: base
    data: data
    max_steps: 2
  rl_{domain}:
    foreach: domains
    kind: grpo
    from: sft
    data: data
    domains: ["{domain}"]
  mopd:
    kind: mopd
    from: sft
    teachers: {"{domain}": "rl_{domain}"}
    data: data
    max_steps: 1
    unmapped: error
    rounds: 2
"""


@dataclass
class Case:
    id: str
    expect: list[str]  # substrings of the error line besides "error: <file>"
    edits: list[tuple[str, str]] = field(default_factory=list)  # (old, new) on BASE, each once
    text: str | None = None  # the whole file instead of BASE (+ edits)
    args: list[str] = field(default_factory=list)  # extra CLI arguments
    recipe: str | None = None  # "dir": the recipe path is a directory; "missing": no file
    line: int | None = None  # the 1-based line the message must point at

    def body(self) -> str:
        text = BASE if self.text is None else self.text
        for old, new in self.edits:
            assert text.count(old) == 1, f"case {self.id}: {old!r} must occur once in BASE"
            text = text.replace(old, new)
        return text


CASES = [
    # -- kinds and fields ------------------------------------------------------------------
    Case("unknown-kind", ["stages.rl_{domain}.kind", "unknown kind 'grpoo'",
                          "did you mean 'grpo'", "known kinds: data, base, sft, grpo, mopd"],
         edits=[("    kind: grpo\n", "    kind: grpoo\n")], line=25),
    Case("missing-kind", ["stages.sft", "missing `kind:`", "known kinds:", "use: <ref>"],
         edits=[("    kind: sft\n", "")]),
    Case("unknown-field", ["stages.sft.max_stpes", "unknown field 'max_stpes' for kind sft",
                           "did you mean 'max_steps'"],
         edits=[("max_steps: 2", "max_stpes: 2")], line=22),
    Case("unknown-field-in-defaults", ["stages.rl_{domain}.num_generatons",
                                       "did you mean 'num_generations'"],
         edits=[("num_generations: 2", "num_generatons: 2")]),
    Case("wrong-type", ["stages.sft.max_steps", "valid integer", "'lots'"],
         edits=[("max_steps: 2", "max_steps: lots")], line=22),
    Case("out-of-range", ["stages.sft.max_steps", "greater than or equal to 1", "got -1"],
         edits=[("max_steps: 2", "max_steps: -1")], line=22),
    Case("bad-literal", ["stages.mopd.unmapped", "should match pattern", "'sometimes'"],
         edits=[("unmapped: error", "unmapped: sometimes")]),
    Case("unknown-domain-in-data", ["stages.data: unknown domain 'revrse'",
                                    "known: arith"],
         edits=[("domains: ${domains}", "domains: [arith, revrse]")]),
    # -- references between stages ---------------------------------------------------------
    Case("missing-from", ["stages.sft.from", "missing stage 'bsae'", "did you mean 'base'"],
         edits=[("from: base", "from: bsae")], line=20),
    Case("missing-teacher", ["stages.mopd.teachers", "missing stage 'rlx_arith'",
                             "did you mean 'rl_arith'"],
         edits=[('"rl_{domain}"}', '"rlx_{domain}"}')]),
    Case("missing-data", ["stages.sft.data", "missing stage 'dat'", "did you mean 'data'"],
         edits=[("    from: base\n    data: data\n", "    from: base\n    data: dat\n")]),
    Case("cycle", ["stages.sft", "cycle: sft -> rl_arith -> sft",
                   "cannot depend on itself"],
         edits=[("    from: base\n    data: data\n", "    from: rl_arith\n    data: data\n")]),
    Case("self-cycle", ["stages.sft", "cycle: sft -> sft"],
         edits=[("    from: base\n    data: data\n", "    from: sft\n    data: data\n")]),
    Case("role-not-accepted", ["stages.sft.teachers", "kind sft takes no `teachers` input",
                               "it accepts `from`, `data`"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    teachers: {arith: base}\n")]),
    Case("missing-required-role", ["stages.sft", "needs `from:`"],
         edits=[("    from: base\n    data: data\n", "    data: data\n")]),
    Case("role-not-a-name", ["stages.sft.from", "`from` names one stage", "['base']"],
         edits=[("from: base", "from: [base]")]),
    # -- foreach, rounds, routes, expansion --------------------------------------------------
    Case("foreach-missing-var", ["stages.rl_{domain}.foreach", "missing var 'domain'",
                                 "did you mean 'domains'", "declared vars: domains"],
         edits=[("foreach: domains", "foreach: domain")], line=24),
    Case("foreach-name-without-placeholder", ["stages.rl", "must contain one of",
                                              "{domain}"],
         edits=[("  rl_{domain}:\n", "  rl:\n")]),
    Case("placeholder-without-foreach", ["stages.rl_{domain}", "no `foreach:`"],
         edits=[("    foreach: domains\n", "")]),
    Case("unknown-var", ["stages.data.domains", "unknown var 'domain'",
                         "did you mean 'domains'", "declare it under vars:"],
         edits=[("domains: ${domains}", "domains: ${domain}")]),
    Case("teachers-miss-a-route", ["stages.mopd.teachers", "no teacher for route(s) reverse",
                                   "unmapped: default:<route>"],
         edits=[('teachers: {"{domain}": "rl_{domain}"}', "teachers: {arith: rl_arith}")]),
    Case("unmapped-default-not-a-route", ["stages.mopd.unmapped", "'sort'",
                                          "not a teacher route (arith, reverse)"],
         edits=[("unmapped: error", "unmapped: default:sort")]),
    Case("duplicate-after-expansion", ["stages.rl_arith", "duplicate stage name 'rl_arith'",
                                       "stages.rl_{domain}", "rename one"],
         text=BASE + "  rl_arith:\n    kind: grpo\n    from: sft\n    data: data\n"),
    Case("rounds-zero", ["stages.mopd.rounds", "integer >= 1", "got 0"],
         edits=[("rounds: 2", "rounds: 0")]),
    Case("rounds-without-from", ["stages.mopd.rounds", "needs `from:`"],
         edits=[("    from: sft\n    teachers", "    teachers")]),
    # -- use, resources, retries ------------------------------------------------------------
    Case("use-with-extra-fields", ["stages.pinned.kind", "`use:` stage", "no other fields",
                                   "remove"],
         text=BASE + "  pinned:\n    use: errs:sft\n    kind: sft\n"),
    Case("use-missing-ref", ["stages.pinned.use", "no ref 'nope:sft'"],
         text=BASE + "  pinned:\n    use: nope:sft\n"),
    Case("bad-resources-value", ["stages.sft.resources.cpus", "integer >= 1", "got 0"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    resources: {cpus: 0}\n")]),
    Case("bad-resources-field", ["stages.sft.resources", "cpus: N, gpus: N",
                                 "did you mean 'gpus'"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    resources: {gpu: 1}\n")]),
    Case("bad-retries", ["stages.sft.retries", "integer >= 0", "got -1"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    retries: -1\n")]),
    Case("bad-launch-processes", ["stages.sft.launch.processes", "integer >= 1", "got 0"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    launch: {processes: 0}\n")]),
    Case("bad-launch-field", ["stages.sft.launch.nodes", "unknown launch field 'nodes'",
                              "processes: N, accelerate:"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    launch: {nodes: 2}\n")]),
    Case("missing-accelerate-config", ["stages.sft.launch.accelerate", "no accelerate config",
                                       "zero9.yaml", "relative to the recipe file"],
         edits=[("    max_steps: 2\n",
                 "    max_steps: 2\n    launch: {processes: 2, accelerate: zero9.yaml}\n")]),
    Case("bad-resume-every", ["stages.sft.resume_every", "integer >= 1", "got 0",
                              "remove it"],
         edits=[("    max_steps: 2\n", "    max_steps: 2\n    resume_every: 0\n")]),
    Case("resume-every-on-a-kind-that-cannot", ["stages.data.resume_every",
                                                "kind data cannot resume", "sft, grpo",
                                                "remove resume_every"],
         edits=[("    size: 16\n", "    size: 16\n    resume_every: 5\n")]),
    Case("resume-every-with-launch", ["stages.sft.resume_every", "not supported with `launch:`"],
         edits=[("    max_steps: 2\n",
                 "    max_steps: 2\n    resume_every: 5\n    launch: {processes: 2}\n")]),
    # -- top level ----------------------------------------------------------------------------
    Case("unknown-top-level-field", ["stage", "unknown top-level field 'stage'",
                                     "did you mean 'stages'"],
         edits=[("\nstages:\n", "\nstage:\n")]),
    Case("missing-stages", ["stages", "needs `stages:`"],
         text=BASE.split("stages:")[0]),
    Case("bad-recipe-name", ["name", "recipe `name:`", "letters, digits", "'my recipe!'"],
         edits=[("name: errs", "name: my recipe!")], line=1),
    Case("bad-vars", ["vars.domains", "non-empty list"],
         edits=[("domains: [arith, reverse]", "domains: arith")]),
    Case("vars-repeat-a-value", ["vars.domains", "distinct"],
         edits=[("domains: [arith, reverse]", "domains: [arith, arith]")]),
    Case("defaults-unknown-kind", ["defaults.grop", "unknown kind 'grop'",
                                   "did you mean 'grpo'"],
         edits=[("  grpo: {max_steps", "  grop: {max_steps")]),
    # -- the file itself ----------------------------------------------------------------------
    Case("missing-file", ["no such file", "recipe .yaml"], recipe="missing"),
    Case("recipe-is-a-directory", ["is a directory", "recipe .yaml"], recipe="dir"),
    Case("not-yaml", ["not valid YAML", "expected ',' or ']'"],
         text="name: errs\nstages: [data\n", line=3),
    Case("yaml-is-a-list", ["top level", "got a list", "YAML mapping"], line=1,
         text="- name: errs\n- stages: {}\n"),
    Case("empty-file", ["top level", "got an empty file", "YAML mapping"], text=""),
    # -- CLI overrides ------------------------------------------------------------------------
    Case("set-unknown-stage", ["--set rl_arth.max_steps", "no stage 'rl_arth'",
                               "did you mean 'rl_arith'"],
         args=["--set", "rl_arth.max_steps=3"]),
    Case("set-unknown-field", ["--set rl_arith.max_stpes", "no field 'max_stpes'",
                               "did you mean 'max_steps'"],
         args=["--set", "rl_arith.max_stpes=3"]),
    Case("set-without-equals", ["--set rl_arith.max_steps", "expected stage.path=value",
                                "--set rl_arith.max_steps=120"],
         args=["--set", "rl_arith.max_steps"]),
    Case("set-without-field", ["--set sft", "stage.path=value"], args=["--set", "sft=3"]),
    Case("set-out-of-range", ["stages.rl_{domain}.max_steps", "greater than or equal to 1",
                            "(from --set rl_arith.max_steps=0)"],
         args=["--set", "rl_arith.max_steps=0"]),
    Case("set-rounds", ["--set mopd.rounds", "edit the recipe"], args=["--set", "mopd.rounds=3"]),
    Case("set-into-a-scalar", ["--set sft.max_steps.x", "'max_steps' is not a mapping"],
         args=["--set", "sft.max_steps.x=1"]),
    Case("force-unknown-stage", ["--force", "no stage 'sfft'", "did you mean 'sft'"],
         args=["--force", "sfft"]),
    # -- the kind contract (tasks/kind.py): mistakes that used to fail only at run time --------
    Case("dataset-as-from", ["stages.sft.from", "`from` takes a model",
                             "stage 'data' (kind data) produces a dataset"],
         edits=[("    from: base\n    data: data\n", "    from: data\n    data: data\n")],
         line=20),
    Case("model-as-data", ["stages.sft.data.train", "`data` takes a dataset",
                           "stage 'base' (kind base) produces a model"],
         edits=[("    from: base\n    data: data\n", "    from: base\n    data: base\n")]),
    Case("data-name-ignored", ["stages.sft.data.extra", "named train only", "'extra' would be "
                               "ignored", "`data: STAGE` or `data: {train: STAGE}`"],
         edits=[("    from: base\n    data: data\n",
                 "    from: base\n    data: {train: data, extra: data}\n")]),
    Case("data-without-train", ["stages.sft.data.mine", "named train only",
                                "`data: STAGE` or `data: {train: STAGE}`"],
         edits=[("    from: base\n    data: data\n", "    from: base\n    data: {mine: data}\n")]),
    Case("route-key-not-a-column", ["stages.mopd.route_key", "no column 'source'",
                                    "prompt", "fix `route_key`"],
         edits=[("    unmapped: error\n", "    unmapped: error\n    route_key: source\n")]),
    Case("idle-teacher", ["stages.mopd.teachers.sort", "teachers ['sort'] get no rows",
                          "arith, reverse", "route_checks: warn"],
         edits=[('teachers: {"{domain}": "rl_{domain}"}',
                 'teachers: {"{domain}": "rl_{domain}", sort: rl_arith}')]),
    Case("trainer-saves-checkpoints", ["stages.sft", "trainer.save_strategy",
                                       "deleted when the stage ends", "chain the next one"],
         edits=[("    max_steps: 2\n",
                 "    max_steps: 2\n    trainer: {save_strategy: steps, save_steps: 250}\n")]),
    Case("teacher-off-route", ["stages.mopd.teachers.arith", "teacher 'rl_arith' for route "
                               "'arith' trains only on domains ['reverse']",
                               "route_checks: warn"],
         args=["--set", "rl_arith.domains=[reverse]"]),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path below `root` with its bytes (None for directories)."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _seed_store(root: Path) -> None:
    """A store that already holds one artifact and one ref (it must stay byte-identical)."""
    store = Store(root)
    key = "ab" * 32
    staged = store.staging_dir(key)
    (staged / "weights.bin").write_bytes(b"\0" * 64)
    store.publish(key, staged, {"recipe": "errs", "stage": "sft", "kind": "sft"})
    store.set_ref("errs", "sft", key)


def _recipe_path(case: Case, tmp_path: Path) -> Path:
    if case.recipe == "missing":
        return tmp_path / "no_such_recipe.yaml"
    if case.recipe == "dir":
        d = tmp_path / "recipes.yaml"
        d.mkdir()
        return d
    path = tmp_path / "errs.yaml"
    path.write_text(case.body())
    return path


def test_base_recipe_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The recipe every case edits plans cleanly, so each failure comes from its one edit."""
    path = tmp_path / "errs.yaml"
    path.write_text(BASE)
    assert cli.main(["plan", str(path), "--store", str(tmp_path / "store"), "--json"]) == 0
    assert '"stage": "mopd_r1"' in capsys.readouterr().out


@pytest.fixture
def no_prefect(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` must fail in parse/plan: setting up Prefect's environment is the first step after."""

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("run got past parse/plan into the Prefect set-up")

    monkeypatch.setattr(cli, "_quiet_env", boom)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_recipe_exits_2_and_writes_nothing(
        case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_prefect: None) -> None:
    recipe = _recipe_path(case, tmp_path)
    seeded = tmp_path / "store"
    _seed_store(seeded)
    before = _snapshot(seeded)
    state = tmp_path / "state"
    fresh = tmp_path / "fresh-store"
    invocations = [
        ["plan", str(recipe), "--store", str(seeded)],
        ["plan", str(recipe), "--store", str(fresh), "--json"],
        ["run", str(recipe), "--store", str(seeded), "--no-tracking"],
        ["run", str(recipe), "--store", str(fresh), "--max-parallel", "2"],
    ]
    messages: dict[str, set[str]] = {}
    for argv in invocations:
        code = cli.main(argv + ["--state-dir", str(state), *case.args])
        out, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert out == "", (argv, out)
        lines = err.splitlines()
        assert len(lines) == 1, (argv, err)
        msg = lines[0]
        assert "Traceback" not in msg
        loc = f"{recipe}:{case.line}: " if case.line else f"{recipe}"
        assert msg.startswith(f"error: {loc}"), msg
        for part in case.expect:
            assert part in msg, f"{part!r} not in {msg!r}"
        messages.setdefault(argv[3], set()).add(msg)
    # plan and run say the same thing (a missing ref may list the store's refs, so per store)
    assert all(len(m) == 1 for m in messages.values()), messages
    assert _snapshot(seeded) == before
    assert not fresh.exists()
    assert not state.exists()
    assert not list(tmp_path.glob("*.lock"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"store", recipe.name} if case.recipe != "missing" else {"store"})


@pytest.mark.parametrize("command,case_id", [("plan", "unknown-field"),
                                             ("run", "cycle"), ("run", "not-yaml")])
def test_console_script_shows_no_traceback(command: str, case_id: str, tmp_path: Path) -> None:
    """The installed `posttrain` prints one error line and exits 2: no Python traceback."""
    case = next(c for c in CASES if c.id == case_id)
    recipe = _recipe_path(case, tmp_path)
    store, state = tmp_path / "store", tmp_path / "state"
    cmd = [str(POSTTRAIN)] if POSTTRAIN.exists() else [sys.executable, "-m", "flows.cli"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd + [command, str(recipe), "--store", str(store),
                                 "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}"), proc.stderr
    assert all(part in lines[0] for part in case.expect), lines[0]
    assert not store.exists() and not state.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [recipe.name]


@pytest.mark.parametrize("argv, expect", [
    (["--runner", "dask"], "--runner 'dask': use threads or ray"),
    (["--runner", "ray"], "pip install 'posttrain[ray]'"),
    (["--max-parallel", "0"], "--max-parallel must be >= 1"),
])
def test_bad_run_arguments_exit_2_before_anything_is_written(
        argv: list[str], expect: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, no_prefect: None) -> None:
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as where the ray extra is absent
    recipe = tmp_path / "errs.yaml"
    recipe.write_text(BASE)
    store, state = tmp_path / "store", tmp_path / "state"
    code = cli.main(["run", str(recipe), "--store", str(store), "--state-dir", str(state), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and expect in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not store.exists() and not state.exists()
