"""Synthetic verifiable domains: seeded problem generators and exact verifiers.

Each domain turns a `random.Random` into a (prompt, answer) pair of plain text (no chat markup):

- ``arith``   ``"12+34="``          -> ``"46"``    (a+b, operands 0..99)
- ``reverse`` ``"rev:abcde="``      -> ``"edcba"`` (4-6 letters a-z)
- ``sort``    ``"sort:dbca="``      -> ``"abcd"``  (4-6 letters a-z)
- ``max``     ``"max:47,12,85="``   -> ``"85"``    (largest of three 2-digit numbers)
- ``count``   ``"count:k:xkqkvk="`` -> ``"3"``     (occurrences, 1-5, of a letter in 4-8 letters)

The demo's fourth domain is ``max``, not ``count`` (why, measured with bench/calibrate_stages.py):
GRPO raises greedy accuracy only where the SFT model's wrong answers are near misses that it
sometimes samples right. With letters uniform over a-z, ``count`` answers 0 or 1 nearly always and
the SFT model learns the majority class (no GRPO signal, REFERENCE.md). Drawing the count uniformly
(as here) removes the majority class, but the tiny model then estimates rather than counts
(answers spread over k-1..k+1) and 150 GRPO steps sharpened the samples without moving greedy
accuracy (49.0 -> 47.8). ``max`` errors are a wrong pick among the three numbers, which sampling
explores: +11 points in the same budget. ``count`` stays available for recipes.

Train / held-out split: a problem is held out iff ``sha256(prompt) % 10 == 0``, whatever the
seed, so the two splits never share a prompt. Held-out draws are distinct problems (arith, the
smallest domain, has ~1,000 held-out problems; evaluation uses 500).

The verifier is the evaluator: `verify` / `reward` are pure and exact (surrounding whitespace is
ignored, anything else is wrong, so a model that does not stop after its answer scores 0).

Run: ``python -m tasks.domains arith 5`` prints five training problems.
"""

from __future__ import annotations

import hashlib
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "heldout")
HELDOUT_MOD = 10  # 1 problem in 10 is held out


@dataclass(frozen=True)
class Domain:
    """One synthetic task: a seeded generator and an exact verifier of the final answer."""

    name: str
    generator: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)
    verifier: Callable[[str, str], bool]  # (completion, answer) -> correct?
    description: str


def _exact(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _gen_arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}=", str(a + b)


def _gen_reverse(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, 4, 6)
    return f"rev:{s}=", s[::-1]


def _gen_sort(rng: random.Random) -> tuple[str, str]:
    s = _letters(rng, 4, 6)
    return f"sort:{s}=", "".join(sorted(s))


def _gen_max(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(10, 99) for _ in range(3)]
    return "max:" + ",".join(map(str, xs)) + "=", str(max(xs))


def _gen_count(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(4, 8)
    target = rng.choice(string.ascii_lowercase)
    k = rng.randint(1, min(n, 5))
    others = [c for c in string.ascii_lowercase if c != target]
    chars = [target] * k + [rng.choice(others) for _ in range(n - k)]
    rng.shuffle(chars)
    return f"count:{target}:{''.join(chars)}=", str(k)


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("arith", _gen_arith, _exact, "a+b with operands 0..99, e.g. '12+34=' -> '46'"),
        Domain("reverse", _gen_reverse, _exact, "reverse 4-6 letters, 'rev:abcd=' -> 'dcba'"),
        Domain("sort", _gen_sort, _exact, "sort 4-6 letters, 'sort:dbca=' -> 'abcd'"),
        Domain("max", _gen_max, _exact, "max of three 2-digit numbers, 'max:47,12,85=' -> '85'"),
        Domain(
            "count",
            _gen_count,
            _exact,
            "occurrences (1-5, uniform) of a letter in 4-8 letters, 'count:k:xkqk=' -> '2'",
        ),
    )
}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a hash of its text (independent of any seed).

    >>> split_of("12+34=") in SPLITS
    True
    """
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MOD == 0 else "train"


def _domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}") from None


def generate(domain: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """`n` problems of `domain` from `split`, deterministic in (domain, n, seed, split).

    Rows are {"prompt", "completion", "answer", "domain"} with completion == answer. Held-out rows
    are distinct problems (so accuracy is over n different prompts); training rows are drawn with
    replacement.

    >>> rows = generate("arith", 3, seed=0)
    >>> [r["domain"] for r in rows], rows == generate("arith", 3, seed=0)
    (['arith', 'arith', 'arith'], True)
    >>> all(verify("arith", r["completion"], r["answer"]) for r in rows)
    True
    """
    dom = _domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with sha512 by `random`, so the stream is stable across processes.
    rng = random.Random(f"{domain}|{seed}|{split}")
    rows: list[dict] = []
    seen: set[str] = set()
    budget = 1000 * n + 10_000  # rejection sampling; the held-out set is ~10% of the space
    while len(rows) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"domain {domain!r} has fewer than {n} distinct {split} problems")
        prompt, answer = dom.generator(rng)
        if split_of(prompt) != split or (split == "heldout" and prompt in seen):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": answer, "answer": answer, "domain": domain})
    return rows


def verify(domain: str, completion: str, answer: str) -> bool:
    """Whether `completion` is a correct answer; exact match up to surrounding whitespace.

    >>> verify("arith", "46", "46"), verify("arith", " 46 ", "46"), verify("arith", "47", "46")
    (True, True, False)
    >>> verify("reverse", "dcba", "dcba"), verify("reverse", "dcbaa", "dcba")
    (True, False)
    >>> verify("sort", "", "abcd"), verify("count", "3", "3")
    (False, True)
    """
    return _domain(domain).verifier(completion, answer)


def reward(domain: str, completion: str, answer: str) -> float:
    """1.0 for a verified answer, 0.0 otherwise (the RL reward is the evaluator).

    >>> reward("sort", "abcd", "abcd"), reward("sort", "abdc", "abcd")
    (1.0, 0.0)
    """
    return 1.0 if verify(domain, completion, answer) else 0.0


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "arith"
    for row in generate(name, int(sys.argv[2]) if len(sys.argv) > 2 else 5, seed=0):
        print(row)
