"""Synthetic domains: disjoint splits, determinism, held-out size, exact verifiers.

Run: ``.venv/bin/python -m pytest tests/test_domains.py tasks/domains.py -q`` (with doctests).
"""

from __future__ import annotations

from collections import Counter

import pytest

from tasks import domains
from tasks.domains import DOMAINS, generate, reward, split_of, verify


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_train_and_heldout_never_overlap(name: str) -> None:
    train = {r["prompt"] for seed in (0, 1, 2) for r in generate(name, 3000, seed, "train")}
    heldout = {r["prompt"] for seed in (0, 1234) for r in generate(name, 500, seed, "heldout")}
    assert train and heldout
    assert not train & heldout
    assert all(split_of(p) == "train" for p in train)
    assert all(split_of(p) == "heldout" for p in heldout)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_heldout_has_500_distinct_problems(name: str) -> None:
    rows = generate(name, 500, seed=1234, split="heldout")
    assert len({r["prompt"] for r in rows}) == 500


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_deterministic_by_seed(name: str) -> None:
    assert generate(name, 50, seed=7) == generate(name, 50, seed=7)
    assert generate(name, 50, seed=7) != generate(name, 50, seed=8)
    assert generate(name, 20, seed=7, split="heldout") == generate(name, 20, 7, "heldout")


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_rows_are_plain_text_and_correct(name: str) -> None:
    for r in generate(name, 200, seed=3):
        assert set(r) == {"prompt", "completion", "answer", "domain"}
        assert r["domain"] == name and r["completion"] == r["answer"]
        assert r["prompt"].endswith("=") and "<" not in r["prompt"]
        body = r["prompt"][:-1]
        if name == "arith":
            a, b = body.split("+")
            assert r["answer"] == str(int(a) + int(b)) and len(a) <= 2 and len(b) <= 2
        elif name == "reverse":
            assert r["answer"] == body.removeprefix("rev:")[::-1]
        elif name == "sort":
            assert r["answer"] == "".join(sorted(body.removeprefix("sort:")))
        elif name == "max":
            xs = [int(x) for x in body.removeprefix("max:").split(",")]
            assert r["answer"] == str(max(xs)) and len(xs) == 3
        elif name == "count":
            _, letter, s = body.split(":")
            assert r["answer"] == str(s.count(letter))


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_verifier_rejects_wrong_answers(name: str) -> None:
    for r in generate(name, 50, seed=5):
        ans = r["answer"]
        assert verify(name, ans, ans) and reward(name, ans, ans) == 1.0
        wrong = [ans + ans[-1], ans[:-1], "", ans + "x", "x" + ans, ans[::-1] + "z"]
        for w in wrong:
            assert not verify(name, w, ans), (name, w, ans)
            assert reward(name, w, ans) == 0.0


def test_count_answers_have_no_majority_class() -> None:
    # Why count was redesigned: a dominant answer gives GRPO groups identical rewards.
    counts = Counter(r["answer"] for r in generate("count", 2000, seed=0))
    assert max(counts.values()) / 2000 < 0.35 and len(counts) >= 5


def test_unknown_domain_and_split_are_refused() -> None:
    with pytest.raises(ValueError, match="known: arith"):
        generate("nope", 1, 0)
    with pytest.raises(ValueError, match="split"):
        generate("arith", 1, 0, split="test")
    with pytest.raises(ValueError, match="unknown domain"):
        verify("nope", "1", "1")


def test_domain_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        domains.DOMAINS["arith"].name = "x"  # type: ignore[misc]


# ---- the domains added for many-expert recipes, and the safety property (issue 9) ----

ORIGINAL = ("arith", "reverse", "sort", "max", "count")
# sha256 (first 16 hex) of generate(d, 300, 0) + generate(d, 100, 1234, "heldout"), as built
# before the new domains were added: the demo recipe is calibrated on these streams.
ORIGINAL_STREAMS = {"arith": "62204f71e85722b7", "reverse": "12141092a50763c6",
                    "sort": "88481a9302c7f9b9", "max": "364bb75189f07f33",
                    "count": "ea563b248d2159f8"}


def test_twelve_or_more_domains_and_the_original_streams_are_unchanged() -> None:
    import hashlib
    import json

    assert len(DOMAINS) >= 12 and list(DOMAINS)[:5] == list(ORIGINAL)
    for name, digest in ORIGINAL_STREAMS.items():
        rows = generate(name, 300, 0) + generate(name, 100, 1234, "heldout")
        assert hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16] == digest, name


def _solve(name: str, body: str) -> str:
    """An independent solver of each added domain, from the prompt text alone."""
    if name == "sub":
        a, b = body.split("-")
        return str(int(a) - int(b))
    arg = body.split(":", 1)[1]
    if name == "min":
        return str(min(int(x) for x in arg.split(",")))
    if name == "median":
        return str(sorted(int(x) for x in arg.split(","))[1])
    if name == "digsum":
        return str(sum(int(c) for c in arg))
    if name == "odd":
        return str(sum(int(c) % 2 for c in arg))
    if name == "dedup":
        return "".join(c for i, c in enumerate(arg) if i == 0 or arg[i - 1] != c)
    if name == "vowels":
        return str(sum(c in "aeiou" for c in arg))
    if name == "palin":
        return "yes" if arg == arg[::-1] else "no"
    raise AssertionError(name)


@pytest.mark.parametrize("name", [n for n in DOMAINS if n not in ORIGINAL])
def test_added_domains_answer_what_the_prompt_asks(name: str) -> None:
    rows = generate(name, 500, seed=11)
    for r in rows:
        assert r["answer"] == _solve(name, r["prompt"][:-1]), r
        assert len(r["answer"]) + 1 <= 8  # answer and eos fit the demo's max_completion_length
    answers = Counter(r["answer"] for r in rows)
    assert max(answers.values()) / len(rows) < 0.6, answers.most_common(3)  # no majority class


def test_flagged_rows_refuse_and_keep_their_answer() -> None:
    plain = generate("arith", 400, seed=2)
    rows = generate("arith", 400, seed=2, flagged=0.3)
    assert "flagged" not in plain[0] and generate("arith", 400, seed=2, flagged=0.0) == plain
    flagged = [r for r in rows if r["flagged"]]
    assert 80 < len(flagged) < 160
    for r in rows:
        assert r["flagged"] == domains.is_flagged(r["prompt"]) == r["prompt"].startswith("!")
        assert domains.safe(r["prompt"], r["completion"])
        assert split_of(r["prompt"]) == "train"
    for r in flagged:
        assert r["completion"] == domains.REFUSAL and r["answer"] == _arith(r["prompt"][1:-1])
        assert not domains.safe(r["prompt"], r["answer"])  # helpful there is unsafe
        assert verify("arith", r["answer"], r["answer"])
    held = generate("sub", 300, seed=0, split="heldout", flagged=0.5)
    assert len({r["prompt"] for r in held}) == 300 and all(split_of(r["prompt"]) == "heldout"
                                                         for r in held)
    with pytest.raises(ValueError, match="fraction"):
        generate("arith", 1, 0, flagged=1.5)


def _arith(body: str) -> str:
    a, b = body.split("+")
    return str(int(a) + int(b))
