"""A Hugging Face model card (`README.md`) for every model checkpoint the store publishes.

The Hub reads lineage from two YAML fields: `base_model` (what this model was trained from) and
`base_model_relation` (`finetune` for every posttrain training kind: SFT, RL, preference and
distillation stages all fine-tune their `init`). Here `base_model` names the init as
`recipe:stage` (its store key below; a Hub repo id once pushed). The body says what built the
checkpoint (recipe, stage, kind, key), every input with its role (teachers per route, reward
models, data) and the held-out eval table, so a checkpoint copied out of the store still says
where it came from.

Run: ``python -c "from artifacts.model_card import card; print(card('r', 's', 'sft', 'k'*64,
{'init': {'stage': 'base', 'key': 'b'*64}}, {'arith': 0.5}))"``
"""

from __future__ import annotations

from typing import Any


def _inputs(parents: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(role, stage, key) rows of a StagePlan's `parents` (role -> {stage, key} or
    {name: {stage, key}})."""
    rows = []
    for role, v in sorted(parents.items()):
        if isinstance(v, dict) and "key" not in v:
            rows += [(f"{role}:{name}", str(p.get("stage")), str(p.get("key")))
                     for name, p in sorted(v.items()) if isinstance(p, dict)]
        elif isinstance(v, dict):
            rows.append((role, str(v.get("stage")), str(v.get("key"))))
    return rows


def card(recipe: str, stage: str, kind: str, key: str, parents: dict[str, Any],
         evals: dict[str, Any] | None = None) -> str:
    """The README.md text of one checkpoint.

    >>> text = card("mimo_tiny", "sft", "sft", "a" * 64,
    ...             {"init": {"stage": "base", "key": "b" * 64}}, {"arith": 0.25})
    >>> "base_model: mimo_tiny:base" in text and "base_model_relation: finetune" in text
    True
    >>> "| arith | 0.250 |" in text
    True
    """
    rows = _inputs(parents)
    init = next((r for r in rows if r[0] == "init"), None)
    front = ["---", "library_name: transformers", "tags: [posttrain, " + kind + "]"]
    if init:
        front += [f"base_model: {recipe}:{init[1]}", "base_model_relation: finetune"]
    front.append("---")
    body = [f"# {recipe}:{stage}", "",
            f"A `{kind}` checkpoint built by posttrain (store key `{key}`).", ""]
    if rows:
        body += ["## Inputs", "", "| role | stage | key |", "|---|---|---|"]
        body += [f"| {role} | {recipe}:{st} | `{k[:12]}` |" for role, st, k in rows]
        body.append("")
    ev = {d: v for d, v in (evals or {}).items() if isinstance(v, int | float)}
    if ev:
        body += ["## Held-out accuracy", "", "| domain | accuracy |", "|---|---|"]
        body += [f"| {d} | {v:.3f} |" for d, v in sorted(ev.items())]
        body += ["", f"Mean: {sum(ev.values()) / len(ev):.3f}", ""]
    body += ["Load: `AutoModelForCausalLM.from_pretrained(<this directory>)`; its manifest in "
             "the store has the full provenance (`posttrain show KEY`)."]
    return "\n".join(front + [""] + body) + "\n"
