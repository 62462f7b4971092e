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
