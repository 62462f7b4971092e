"""The `select` kind and the validation split it chooses on.

- the validation split shares no prompt with the train split nor with the held-out problems
  every stage is scored on, for every domain (and `split_of` says so for each prompt);
- `select` scores every candidate on the validation split only, keeps the best (ties: the first
  name), copies its files, and records the choice and all scores; the held-out eval is the
  chosen candidate's own, copied, never used to choose;
- candidates with another tokenizer are refused before any scoring; fewer than two candidates
  are refused at plan time with the YAML place;
- the select artifact inherits the sft_root its candidates share; lineage labels its edges
  `candidate:<name>` and shows the choice.

Run: ``.venv/bin/python -m pytest tests/test_select.py -q``
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from artifacts import lineage
from artifacts.refs import ArtifactRef, Inputs, StageInputError
from flows.recipe import RecipeError, parse
from tasks import domains, select
from tasks.domains import DOMAINS, generate, split_of


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_validation_split_is_disjoint_from_train_and_heldout(name: str) -> None:
    from tasks.evaluate import heldout_rows

    val = generate(name, 400, seed=0, split="validation")
    prompts = {r["prompt"] for r in val}
    assert len(prompts) == 400  # distinct problems, like held-out
    assert all(split_of(p) == "heldout" for p in prompts)  # hence never a training prompt
    train = {r["prompt"] for seed in (0, 1) for r in generate(name, 3000, seed, "train")}
    test = {r["prompt"] for r in heldout_rows(name)}  # what every stage is scored on
    assert test == domains.heldout_test_prompts(name) and len(test) == 500
    assert not prompts & train and not prompts & test and not train & test
    flagged = {r["prompt"] for r in generate(name, 200, seed=1, split="validation", flagged=0.5)}
    assert not flagged & test and all(split_of(p) == "heldout" for p in flagged)


def test_evaluation_never_draws_past_the_test_set() -> None:
    """Every held-out evaluation is a prefix of the test set; more, or another seed, is refused
    (it would reach validation problems)."""
    from tasks.evaluate import heldout_rows

    full = heldout_rows("sort")
    assert heldout_rows("sort", 37) == full[:37]
    for n, seed in ((501, 1234), (100, 0)):
        with pytest.raises(ValueError, match="at most 500 problems of seed 1234"):
            heldout_rows("sort", n, seed)


def _model(path: Path, hidden: int, seed: int, extra_token: bool = False) -> Path:
    from tasks import models

    tok = models.build_tokenizer()
    if extra_token:
        tok.add_tokens(["<tool>"])
    model = models.build_tiny_model(tok, hidden, 1, 2, 2 * hidden, seed)
    models.save_model(model, tok, path)
    return path


def _ref(name: str, path: Path, eval_: dict | None = None, sft_root: str = "s" * 64) -> ArtifactRef:
    return ArtifactRef(key=name[0] * 64, path=path, kind="dpo", stage=f"st_{name}", recipe="r",
                       manifest={"metrics": {"eval": eval_ or {}}, "sft_root": sft_root})


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cands")
    return {n: _model(root / n, 16, seed) for n, seed in (("a", 0), ("b", 1), ("c", 2))}


def test_select_picks_the_best_on_validation_and_records_every_score(
        three: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.evaluate

    accuracy = {three["a"]: 0.25, three["b"]: 0.75, three["c"]: 0.5}
    calls: list[tuple[str, str, int]] = []

    def fake_evaluate(model, tok, doms, n, seed, split="heldout"):  # noqa: ANN001
        path = Path(model.name_or_path)
        calls.append((path.name, split, n))
        return {d: accuracy[path] for d in doms}

    monkeypatch.setattr(tasks.evaluate, "evaluate", fake_evaluate)
    held = {"arith": 0.4, "sort": 0.6}
    ins = Inputs(candidates={"c": _ref("c", three["c"]), "a": _ref("a", three["a"]),
                             "b": _ref("b", three["b"], held)})
    cfg = select.Config(domains=["arith", "sort"], val_n=20)
    out = tmp_path / "out"
    metrics = select.run(cfg, ins, out)
    assert sorted(calls) == [(n, "validation", 20) for n in ("a", "b", "c")]
    assert metrics["selected"] == "b" and metrics["selected_stage"] == "st_b"
    assert metrics["selected_key"] == "b" * 64
    assert metrics["scores"] == {"a": 0.25, "b": 0.75, "c": 0.5}
    assert metrics["validation"]["c"] == {"arith": 0.5, "sort": 0.5}
    assert metrics["eval"] == held  # the chosen model's own held-out eval, copied
    assert (out / "model.safetensors").read_bytes() == \
        (three["b"] / "model.safetensors").read_bytes()
    assert (out / "tokenizer.json").exists() and not (out / "manifest.json").exists()


def test_select_ties_go_to_the_first_name_and_metric_worst(
        three: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.evaluate

    per = {three["a"]: {"arith": 0.9, "sort": 0.1}, three["b"]: {"arith": 0.5, "sort": 0.5},
           three["c"]: {"arith": 0.5, "sort": 0.5}}
    monkeypatch.setattr(tasks.evaluate, "evaluate",
                        lambda model, tok, doms, n, seed, split="heldout":
                        dict(per[Path(model.name_or_path)]))
    ins = Inputs(candidates={n: _ref(n, p) for n, p in three.items()})
    m = select.run(select.Config(domains=["arith", "sort"], metric="worst"), ins, tmp_path / "o")
    assert m["selected"] == "b" and m["scores"] == {"a": 0.1, "b": 0.5, "c": 0.5}
    m = select.run(select.Config(domains=["arith", "sort"], metric="arith"), ins, tmp_path / "p")
    assert m["selected"] == "a"


def test_select_refuses_another_tokenizer_before_scoring(
        three: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.evaluate

    monkeypatch.setattr(tasks.evaluate, "evaluate", lambda *a, **k: pytest.fail("scored"))
    odd = _model(tmp_path / "odd", 16, 0, extra_token=True)
    ins = Inputs(candidates={"a": _ref("a", three["a"]), "z": _ref("z", odd)})
    with pytest.raises(StageInputError, match="candidate 'z'.*vocab_sha256.*one tokenizer"):
        select.run(select.Config(domains=["arith"]), ins, tmp_path / "out")


def test_config_rejects_a_metric_that_is_not_scored() -> None:
    with pytest.raises(ValueError, match="metric is mean, worst or a domain"):
        select.Config(metric="best")
    with pytest.raises(ValueError, match="not among domains"):
        select.Config(domains=["arith"], metric="sort")


RECIPE = """\
name: sel
stages:
  data: {kind: data, domains: [arith], size: 16}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: data, max_steps: 2}
  best:
    kind: select
    candidates: {only: sft}
"""


def test_one_candidate_is_refused_at_plan_time(tmp_path: Path) -> None:
    path = tmp_path / "sel.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError, match=r"sel.yaml:8: stages.best.candidates: select chooses "
                       r"among two or more candidates, got 1"):
        parse(path)
    path.write_text(RECIPE.replace("{only: sft}", "{sft: sft, base: base}"))
    assert parse(path).stages["best"].inputs == {"candidates": {"sft": "sft", "base": "base"}}


def test_select_inherits_the_shared_sft_root() -> None:
    from flows.stage import _sft_root

    sp = types.SimpleNamespace(key="k" * 64, spec=types.SimpleNamespace(kind="select"))
    same = Inputs(candidates={"a": _ref("a", Path("x")), "b": _ref("b", Path("y"))})
    assert _sft_root(sp, same) == "s" * 64
    mixed = Inputs(candidates={"a": _ref("a", Path("x")),
                               "b": _ref("b", Path("y"), sft_root="t" * 64)})
    assert _sft_root(sp, mixed) is None
    assert _sft_root(sp, mixed, "b") == "t" * 64  # the chosen model's own lineage


def test_lineage_labels_candidate_edges_and_shows_the_choice() -> None:
    man = {"key": "c" * 64, "recipe": "r", "stage": "best", "kind": "select",
           "inputs": {"candidates": {"dpo": "a" * 64, "rs": "b" * 64}},
           "metrics": {"selected": "rs", "eval": {"arith": 0.5}}}
    g = lineage.from_manifests([man])
    assert sorted(e["role"] for e in g.edges) == ["candidate:dpo", "candidate:rs"]
    assert lineage.headline(g.nodes["c" * 64]).startswith("selected=rs arith=0.500")


def test_validation_split_size_allows_the_default_val_n() -> None:
    """arith, the smallest space, has room for `val_n`'s upper bound of distinct problems."""
    assert len(generate("arith", select.Config.model_fields["val_n"].metadata[1].le, seed=0,
                        split="validation")) == 400
    assert domains.TEST_N == 500
