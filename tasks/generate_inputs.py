"""The checks of stage kind `generate` (tasks/generate.py) before any weight is loaded.

Holds the prompt rows drawn from the data input (`_prompt_rows`: distinct, seeded, each with a
known domain and an answer), their routing to generators (`_routes`, `default_route`) and the
tokenizer check of every generator and reward model against the first generator, all run by
`preflight`. It is apart from tasks/generate.py so the kind module stays its config, plan-time
hooks and the sampling loop, and so everything that can refuse a run before sampling reads as
one piece. Like the kind module it imports transformers inside functions only.

Run: ``.venv/bin/python -m pytest tests/test_generate.py -q -k "refused or route"``.
"""

from __future__ import annotations

import json
import random
from typing import Any

from artifacts.refs import ArtifactRef, Inputs, StageInputError


def default_route(unmapped: str) -> str | None:
    """The route of `unmapped: default:<route>` (None for `error`).

    >>> default_route("default:arith"), default_route("error")
    ('arith', None)
    """
    return unmapped.removeprefix("default:") if unmapped.startswith("default:") else None


def _prompt_rows(config: Any, inputs: Inputs) -> list[dict]:
    """`prompts` distinct prompt rows, seeded; each with a known domain and an answer."""
    from tasks import domains as _domains
    from tasks.data import data_file

    path, rows, seen = data_file(inputs), [], set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            row = json.loads(line) if line.strip() else None
            if not isinstance(row, dict) or row.get("prompt") in seen:
                continue
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str) \
                    or row.get("domain") not in _domains.DOMAINS:
                raise StageInputError(f"{path}:{lineno}: generate needs a string `prompt`, an "
                                      "`answer` and a known `domain` in every row (the verifier "
                                      "scores each sample); fix the data stage")
            seen.add(row["prompt"])
            rows.append(row)
    random.Random(config.seed).shuffle(rows)
    return rows[: config.prompts]


def _routes(config: Any, inputs: Inputs, rows: list[dict]) -> dict[str, list[dict]]:
    """Generator route -> its prompt rows (one route, the `from:` stage, without generators)."""
    if inputs.init is not None:
        return {inputs.init.stage: rows}
    default = default_route(config.unmapped)
    out: dict[str, list[dict]] = {}
    missing: set[str] = set()
    for r in rows:
        value = str(r.get(config.route_key))
        route = value if value in inputs.generators else default
        if route is None or route not in inputs.generators:
            missing.add(value)
            continue
        out.setdefault(route, []).append(r)
    if missing:
        raise StageInputError(f"rows with {config.route_key!r} values {sorted(missing)} have no "
                              f"generator (routes {sorted(inputs.generators)}); add them, or set "
                              "unmapped: default:<route>")
    return out


def preflight(config: Any,
              inputs: Inputs) -> tuple[dict[str, list[dict]], dict[str, ArtifactRef]]:
    """Every check before a weight is loaded: (prompt rows by route, sampler by route).
    `config` is a tasks.generate.Config."""
    from tasks.compat import FINGERPRINT_FIELDS
    from tasks.models import fingerprint_of

    if (inputs.init is None) == (not inputs.generators):
        raise StageInputError("generate needs exactly one of `from:` or `generators:`")
    if config.rank_by == "reward_model" and not inputs.reward_model:
        raise StageInputError("rank_by: reward_model needs `reward_model:` stages")
    by_route = _routes(config, inputs, _prompt_rows(config, inputs))
    samplers = {inputs.init.stage: inputs.init} if inputs.init else dict(inputs.generators)
    first, *_ = sorted(samplers)
    mine = fingerprint_of(samplers[first].path)
    judged = [(f"generator {r!r}", a) for r, a in sorted(samplers.items()) if r != first]
    judged += [(f"reward model {n!r}", a) for n, a in sorted(inputs.reward_model.items())]
    problems = []
    for who, ref in judged:
        theirs = fingerprint_of(ref.path)
        diff = [f"{f} {theirs.get(f)!r} vs {mine.get(f)!r}" for f in FINGERPRINT_FIELDS
                if theirs.get(f) != mine.get(f)]
        if diff:
            problems.append(f"{who} (stage {ref.stage!r}) has another tokenizer than generator "
                            f"{first!r}: {'; '.join(diff)}")
    if problems:
        raise StageInputError("\n".join(problems) + "\nEvery generator and reward model must "
                              "share one tokenizer and config.vocab_size: the rows train one "
                              "student, and a reward model reads text through its own vocabulary."
                              " Fix: use models of one lineage (same tokenizer files).")
    return by_route, samplers
