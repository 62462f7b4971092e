"""Which rows a prompt's K scored samples give (`generate`'s modes), and the per-domain rates.

Pure functions over text, verifier outcomes and reward-model scores: no torch, no models, so
the selection rules are checked by the doctests below and tests/test_generate.py without
sampling anything.

Run: ``python -m pytest --doctest-modules tasks/generate_select.py -q``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks import domains as _domains


@dataclass(frozen=True)
class Judged:
    """One prompt's K samples and their scores (`rm` None without reward models)."""

    texts: list[str]
    verified: list[bool]
    rm: list[float] | None = None  # weighted sum over the reward models, per sample
    rm_each: list[dict[str, float]] | None = None  # {reward model name: score}, per sample


def rank_keys(rank_by: str, j: Judged) -> list[tuple[float, ...]]:
    """Sort keys of the samples, higher is better: the verifier, then the reward models
    (rank_by verifier), or the reward models alone (auto or reward_model, when given).

    >>> rank_keys("auto", Judged(["1", "2"], [False, True]))
    [(0.0,), (1.0,)]
    >>> rank_keys("verifier", Judged(["1", "2"], [False, True], [0.5, -1.0]))
    [(0.0, 0.5), (1.0, -1.0)]
    >>> rank_keys("auto", Judged(["1", "2"], [False, True], [0.5, -1.0]))
    [(0.5,), (-1.0,)]
    """
    if j.rm is None:
        return [(float(v),) for v in j.verified]
    if rank_by == "verifier":
        return [(float(v), s) for v, s in zip(j.verified, j.rm, strict=True)]
    return [(s,) for s in j.rm]


def top_and_bottom(rank_by: str, j: Judged) -> tuple[int, int]:
    """Indices of the best and the worst sample (the first one on ties)."""
    keys = rank_keys(rank_by, j)
    idx = range(len(j.texts))
    return max(idx, key=lambda i: (keys[i], -i)), min(idx, key=lambda i: (keys[i], i))


def select(mode: str, rank_by: str, unique: bool, row: dict, generator: str,
           j: Judged) -> list[dict]:
    """The rows one prompt gives (tasks/generate.py's docstring has the rules).

    >>> row = {"prompt": "1+1=", "answer": "2", "domain": "arith", "completion": "2"}
    >>> j = Judged(["3", "2", "2 ", "5"], [False, True, True, False])
    >>> [(r["completion"], r["sample"]) for r in select("best", "auto", True, row, "g", j)]
    [('2', 1)]
    >>> [r["sample"] for r in select("correct", "auto", True, row, "g", j)]
    [1]
    >>> [r["sample"] for r in select("correct", "auto", False, row, "g", j)]
    [1, 2]
    >>> [(r["chosen"], r["rejected"]) for r in select("pairs", "auto", True, row, "g", j)]
    [('2', '3')]
    >>> select("pairs", "auto", True, row, "g", Judged(["3", "4"], [False, False]))
    []
    >>> select("best", "auto", True, row, "g", Judged(["3", "4"], [False, False]))
    []
    """
    top, low = top_and_bottom(rank_by, j)
    base = {k: v for k, v in row.items() if k not in ("completion", "chosen", "rejected")}
    base["generator"] = generator

    def one(i: int) -> dict:
        scores = ({"rm_score": j.rm[i], "rm_scores": j.rm_each[i]}
                  if j.rm is not None and j.rm_each is not None else {})
        return {**base, "completion": j.texts[i], "sample": i, "verified": j.verified[i],
                **scores}

    if mode == "best":  # ranked with the verifier, an unverified best is no answer to keep
        by_verifier = j.rm is None or rank_by == "verifier"
        return [] if by_verifier and not j.verified[top] else [one(top)]
    if mode == "correct":
        kept, seen = [], set()
        for i, text in enumerate(j.texts):
            if j.verified[i] and not (unique and text.strip() in seen):
                seen.add(text.strip())
                kept.append(one(i))
        return kept
    keys = rank_keys(rank_by, j)
    if keys[top] == keys[low]:
        return []
    pair = {**base, "chosen": j.texts[top], "rejected": j.texts[low], "sample": top,
            "rejected_sample": low, "chosen_verified": j.verified[top],
            "rejected_verified": j.verified[low]}
    if j.rm is not None:
        pair |= {"chosen_rm_score": j.rm[top], "rejected_rm_score": j.rm[low]}
    return [pair]


class Tally:
    """Running sums of one domain's samples, turned into its `generate.<domain>` metrics."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def add(self, rank_by: str, prompt: str, j: Judged, kept: int) -> None:
        """Count one prompt: its K samples and the `kept` rows they gave."""
        top, _ = top_and_bottom(rank_by, j)
        by_rm = j.rm is not None and rank_by != "verifier"
        add = {"prompts": 1, "samples": len(j.texts), "rows": kept,
               "verified": sum(j.verified), "best_verified": j.verified[top],
               "any_verified": any(j.verified), "accepted": kept > 0,
               "score_sum": sum(j.rm) if by_rm and j.rm else sum(j.verified),
               "safe": sum(_domains.safe(prompt, t) for t in j.texts),
               "flagged": _domains.is_flagged(prompt)}
        for each in j.rm_each or []:
            for name, score in each.items():
                add[f"rm/{name}"] = add.get(f"rm/{name}", 0.0) + score
        for k, v in add.items():
            self.s[k] = self.s.get(k, 0.0) + float(v)

    def rates(self) -> dict[str, float]:
        """prompts, samples, rows, accuracy, best_accuracy, pass_at_k, acceptance,
        mean_score, rm/<name> and (where prompts are flagged) safe.

        >>> t = Tally()
        >>> t.add("auto", "1+1=", Judged(["2", "3"], [True, False]), kept=1)
        >>> t.add("auto", "1+2=", Judged(["4", "5"], [False, False]), kept=0)
        >>> r = t.rates(); r["accuracy"], r["best_accuracy"], r["acceptance"], "safe" in r
        (0.25, 0.5, 0.5, False)
        """
        s = self.s
        p, n = max(s["prompts"], 1.0), max(s["samples"], 1.0)
        out = {"prompts": int(s["prompts"]), "samples": int(s["samples"]),
               "rows": int(s["rows"]), "accuracy": s["verified"] / n,
               "best_accuracy": s["best_verified"] / p, "pass_at_k": s["any_verified"] / p,
               "acceptance": s["accepted"] / p, "mean_score": s["score_sum"] / n}
        out |= {k: v / n for k, v in s.items() if k.startswith("rm/")}
        if s["flagged"]:
            out["safe"] = s["safe"] / n
        return out
