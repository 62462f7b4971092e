"""Stage kind `select`: the best of several candidate models, chosen on a validation split.

Llama 3 ("the best models from each round seed the next"): ``candidates: {name: stage}`` names
two or more models; each is scored by greedy accuracy on `val_n` distinct problems per domain of
the *validation* split of tasks/domains.py (``sha256(prompt) % 20 == 1``), which shares no prompt
with any training row (split "train") nor with the held-out problems every stage reports (split
"heldout", ``% 10 == 0``): the choice never sees the test set it is then reported on. The score
is `metric` over `domains`: ``mean`` (default), ``worst`` (the lowest domain; ``min`` is a
domain's name), or one domain's accuracy. A tie goes to the first name in sorted order, so the
choice is a function of the key (which sorts the names), never of the order the recipe lists
them in.

The artifact is a copy of the chosen model's directory (weights, config, tokenizer): a later
stage starts ``from:`` it like from any model, and its sft_root is the one its candidates share.
Metrics: ``selected`` (name), ``selected_stage``, ``selected_key``, ``scores`` {name: score},
``validation`` {name: {domain: accuracy}}, ``metric``, ``domains``, ``val_n``, and ``eval``: the
chosen candidate's held-out accuracy copied from its manifest (it is the same model; never used
to choose). The manifest keeps all of them and its inputs list every candidate (lineage edges
``candidate:<name>``). Before any weight is loaded, every candidate must share the first one's
tokenizer and vocab size (tasks/compat.py): a later stage reads the winner, whichever it is.

Run: ``python -m tasks.select OUT NAME=MODEL_DIR NAME=MODEL_DIR [key=value ...]``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks import domains as _domains
from tasks.kind import KindCheckError, Node, Role, scaled

PRODUCES = "model"
TRAINS = False  # copies the best candidate; the contract asks it for no max_steps
ROLES = {
    "candidates": Role("model", many=True, description="name -> candidate model; the best on "
                       "the validation split is the output."),
}
METRICS = ("mean", "worst")  # not "min": that is a domain of tasks/domains.py
SKIP = ("manifest.json", "README.md")  # the store's and the model card: written for this stage


class Config(BaseModel):
    """Score every candidate on the validation split; keep the best."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    domains: list[str] | None = Field(
        None, description="Domains scored (None: every domain in the candidates' held-out "
        "eval, from their manifests).")
    val_n: int = Field(200, ge=1, le=400, description="Distinct validation problems per domain "
                       "(arith, the smallest domain, has ~500).")
    metric: str = Field("mean", description="The score: `mean` or `worst` accuracy over the "
                        "domains, or one domain's name (its accuracy).")
    seed: int = Field(0, description="Seed of the validation draw.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        for name in self.domains or []:
            if name not in _domains.DOMAINS:
                raise ValueError(f"unknown domain {name!r}; known: {', '.join(_domains.DOMAINS)}")
        if self.metric not in METRICS and self.metric not in _domains.DOMAINS:
            raise ValueError(f"metric is mean, worst or a domain name, got {self.metric!r}")
        if self.domains is not None and self.metric in _domains.DOMAINS \
                and self.metric not in self.domains:
            raise ValueError(f"metric {self.metric!r} is not among domains {self.domains}")
        return self


def check(node: Node, nodes: Mapping[str, Node]) -> list[str]:
    """Kind hook, at plan time: a choice needs two candidates at least."""
    cands = node.parents("candidates")
    if len(cands) < 2:
        raise KindCheckError(("candidates",), f"select chooses among two or more candidates, "
                             f"got {len(cands)}; add candidates, or use the model directly")
    return []


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `--scale` shrinks the validation draw (10 problems per domain at least)."""
    return scaled(config, factor, {"val_n": 10})


def score(accuracy: Mapping[str, float], metric: str) -> float:
    """One number from per-domain accuracies.

    >>> acc = {"arith": 0.5, "sort": 0.25}
    >>> score(acc, "mean"), score(acc, "worst"), score(acc, "sort")
    (0.375, 0.25, 0.25)
    """
    if metric == "mean":
        return sum(accuracy.values()) / max(1, len(accuracy))
    if metric == "worst":
        return min(accuracy.values(), default=0.0)
    return accuracy[metric]


def choose(scores: Mapping[str, float]) -> str:
    """The best name; a tie goes to the first in sorted order.

    >>> choose({"b": 0.5, "a": 0.5, "c": 0.25})
    'a'
    """
    return min(scores, key=lambda n: (-scores[n], n))


def _domains_of(config: Config, cands: Mapping[str, ArtifactRef]) -> list[str]:
    if config.domains is not None:
        return list(config.domains)
    found = sorted({d for ref in cands.values()
                    for d in ((ref.manifest.get("metrics") or {}).get("eval") or {})})
    if not found:
        raise StageInputError("select: no candidate's manifest has a held-out eval to take the "
                              "domains from; set `domains:` on the select stage")
    return found


def preflight(config: Config, inputs: Inputs) -> list[str]:
    """Checks before any weight is loaded; returns the domains to score."""
    from tasks.compat import fingerprint_diff
    from tasks.models import fingerprint_of

    cands = inputs.candidates
    if len(cands) < 2:
        raise StageInputError(f"select needs two or more candidates, got {sorted(cands)}")
    names = sorted(cands)
    fps = {n: fingerprint_of(cands[n].path) for n in names}
    problems = [f"candidate {n!r} (stage {cands[n].stage!r}): {'; '.join(diff)}"
                for n in names[1:] if (diff := fingerprint_diff(fps[names[0]], fps[n]))]
    if problems:
        raise StageInputError("select: candidates have another tokenizer than candidate "
                              f"{names[0]!r} ('teacher' = the candidate, 'student' = "
                              f"{names[0]!r}): " + " | ".join(problems) + ". Fix: choose among "
                              "models of one tokenizer (a later stage reads the winner).")
    return _domains_of(config, cands)


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Score each candidate on the validation split, copy the best into `out_dir`."""
    from tasks import models
    from tasks.evaluate import evaluate

    domains = preflight(config, inputs)
    models.quiet()
    cands = inputs.candidates
    names = sorted(cands)
    validation: dict[str, dict[str, float]] = {}
    scores: dict[str, float] = {}
    for i, name in enumerate(names, 1):
        path = cands[name].path
        model, tok = models.load_model(path), models.load_tokenizer(path)
        validation[name] = evaluate(model, tok, domains, config.val_n, config.seed,
                                    split="validation")
        scores[name] = score(validation[name], config.metric)
        progress(i, len(names), {"score": scores[name]})
    best = choose(scores)
    src = Path(cands[best].path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in SKIP or f.name.startswith("."):
            continue
        if f.is_dir():
            shutil.copytree(f, out_dir / f.name)
        else:
            shutil.copy2(f, out_dir / f.name)
    chosen = cands[best]
    return {"selected": best, "selected_stage": chosen.stage, "selected_key": chosen.key,
            "metric": config.metric, "domains": domains, "val_n": config.val_n,
            "scores": scores, "validation": validation,
            "eval": dict((chosen.manifest.get("metrics") or {}).get("eval") or {})}


def _ref(name: str, path: str) -> ArtifactRef:
    return ArtifactRef(key=f"local:{path}", path=Path(path), kind="?", stage=name, recipe="cli")


if __name__ == "__main__":
    out_arg, *rest = sys.argv[1:]
    pairs = dict(a.split("=", 1) for a in rest)
    import yaml

    # YAML values, as in a recipe: `domains=[arith, sort]`, `val_n=200`
    fields = {k: yaml.safe_load(v) for k, v in pairs.items() if k in Config.model_fields}
    cfg = Config(**fields)
    ins = Inputs(candidates={k: _ref(k, v) for k, v in pairs.items() if k not in fields})
    print(run(cfg, ins, Path(out_arg), lambda s, t, m: print(s, t, m, flush=True)))
