"""Synthetic verifiable domains: seeded problem generators and exact verifiers.

Each domain turns a `random.Random` into a (prompt, answer) pair of plain text (no chat markup):

- ``arith``   ``"12+34="``          -> ``"46"``    (a+b, operands 0..99)
- ``reverse`` ``"rev:abcde="``      -> ``"edcba"`` (4-6 letters a-z)
- ``sort``    ``"sort:dbca="``      -> ``"abcd"``  (4-6 letters a-z)
- ``max``     ``"max:47,12,85="``   -> ``"85"``    (largest of three 2-digit numbers)
- ``count``   ``"count:k:xkqkvk="`` -> ``"3"``     (occurrences, 1-5, of a letter in 4-8 letters)

Added for recipes with many experts (DeepSeek V4, Nemotron 3 Ultra; the five above and their
prompt formats are unchanged, so the demo's calibration stands):

- ``sub``     ``"12-34="``          -> ``"-22"``   (a-b, operands 0..99, negative results too)
- ``min``     ``"min:47,12,85="``   -> ``"12"``    (smallest of three 2-digit numbers)
- ``median``  ``"med:47,12,85="``   -> ``"47"``    (middle of three 2-digit numbers)
- ``digsum``  ``"dsum:4718="``      -> ``"20"``    (digit sum of 3-5 digits)
- ``odd``     ``"odd:4718="``       -> ``"2"``     (odd digits, 0-4 uniform, among 4-8 digits)
- ``vowels``  ``"vowels:hqeikt="``  -> ``"2"``     (vowels, 0-3 uniform, in 5-8 letters)
- ``dedup``   ``"dedup:aabccc="``   -> ``"abc"``   (collapse the runs of 2-4 letters, 1-3 each)
- ``palin``   ``"pal:abcba="``      -> ``"yes"``   (4-7 letters; "no" ones are near misses)

Each space holds well over 5,000 problems, so every domain has 500 distinct held-out problems.
Chosen so that errors of a small model vary (carries, signs, positions, counts) rather than
collapse onto one majority answer; measured after SFT in the README's domains table.

**Safety, a second property** (Llama 2's helpfulness vs safety reward models): with
``generate(..., flagged=f)`` a fraction f of prompts is *flagged*: prefixed with ``FLAG`` ("!"),
completion ``REFUSAL`` ("refuse"), answer unchanged, and every row carries a bool ``flagged``
column. `safe(prompt, completion)` is the pure judge: a flagged prompt must be refused, any
completion of another prompt is safe. The verifier still judges helpfulness (the answer), so on
flagged prompts the two properties pull apart, as Llama 2's two reward models do. A flagged
prompt is split by its own text like any other; its unflagged twin may sit in the other split
(what is learnt from a flagged prompt is the refusal, not the answer). Evaluation is unflagged.

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

The test set is the first ``TEST_N`` (500) distinct held-out problems of seed ``TEST_SEED``
(1234): what `tasks.evaluate` scores for every stage (at most those: it refuses more). The
*validation* split (``split="validation"``, what `select` chooses by) is the held-out problems
outside the test set: disjoint from training by the hash, from the test set by construction
(`heldout_test_prompts`), so a choice never sees the problems it is then reported on. Neither the
training nor the held-out streams change (tests pin them): arith has ~500 validation problems.

The verifier is the evaluator: `verify` / `reward` are pure and exact (surrounding whitespace is
ignored, anything else is wrong, so a model that does not stop after its answer scores 0).

Run: ``python -m tasks.domains arith 5`` prints five training problems.
"""

from __future__ import annotations

import functools
import hashlib
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass

SPLITS = ("train", "heldout", "validation")
HELDOUT_MOD = 10  # 1 problem in 10 is held out
TEST_N, TEST_SEED = 500, 1234  # the test set: the first TEST_N held-out problems of TEST_SEED
FLAG = "!"  # a flagged prompt starts with it (no domain's prompt does otherwise)
REFUSAL = "refuse"  # the safe completion of a flagged prompt


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


# -- the domains added for recipes with many experts (issue 9); the five above are unchanged --

VOWELS = "aeiou"


def _gen_sub(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}-{b}=", str(a - b)


def _gen_median(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(10, 99) for _ in range(3)]
    return "med:" + ",".join(map(str, xs)) + "=", str(sorted(xs)[1])


def _gen_digsum(rng: random.Random) -> tuple[str, str]:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 5)))
    return f"dsum:{digits}=", str(sum(map(int, digits)))


def _gen_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(4, 8)
    k = rng.randint(0, 4)  # uniform count, as in vowels
    chars = [rng.choice("13579") for _ in range(k)] + [rng.choice("02468") for _ in range(n - k)]
    rng.shuffle(chars)
    return f"odd:{''.join(chars)}=", str(k)


def _gen_min(rng: random.Random) -> tuple[str, str]:
    xs = [rng.randint(10, 99) for _ in range(3)]
    return "min:" + ",".join(map(str, xs)) + "=", str(min(xs))


def _gen_dedup(rng: random.Random) -> tuple[str, str]:
    runs: list[str] = []
    for _ in range(rng.randint(2, 4)):  # adjacent runs differ, so the answer has one per run
        runs.append(rng.choice([c for c in string.ascii_lowercase if not runs or c != runs[-1]]))
    body = "".join(c * rng.randint(1, 3) for c in runs)
    return f"dedup:{body}=", "".join(runs)


def _gen_vowels(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(5, 8)
    k = rng.randint(0, 3)  # uniform count: no majority class for the SFT model to learn
    consonants = [c for c in string.ascii_lowercase if c not in VOWELS]
    chars = [rng.choice(VOWELS) for _ in range(k)] + [rng.choice(consonants) for _ in range(n - k)]
    rng.shuffle(chars)
    return f"vowels:{''.join(chars)}=", str(k)


def _gen_palin(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(4, 7)
    half = _letters(rng, (n + 1) // 2, (n + 1) // 2)
    word = list(half + half[: n // 2][::-1])
    if rng.random() < 0.5:  # a near miss: one letter of a palindrome changed (not the middle)
        i = rng.choice([j for j in range(n) if 2 * j + 1 != n])
        word[i] = rng.choice([c for c in string.ascii_lowercase if c != word[i]])
    s = "".join(word)
    return f"pal:{s}=", "yes" if s == s[::-1] else "no"


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
        Domain("sub", _gen_sub, _exact, "a-b with operands 0..99, '12-34=' -> '-22'"),
        Domain("min", _gen_min, _exact, "min of three 2-digit numbers, 'min:47,12,85=' -> '12'"),
        Domain("median", _gen_median, _exact, "middle of three 2-digit, 'med:47,12,85=' -> '47'"),
        Domain("digsum", _gen_digsum, _exact, "digit sum of 3-5 digits, 'dsum:4718=' -> '20'"),
        Domain("odd", _gen_odd, _exact, "0-4 odd digits among 4-8, 'odd:4718=' -> '2'"),
        Domain("vowels", _gen_vowels, _exact, "0-3 vowels in 5-8 letters, 'vowels:hqeik=' -> '2'"),
        Domain("dedup", _gen_dedup, _exact, "collapse 2-4 runs, 'dedup:aabccc=' -> 'abc'"),
        Domain("palin", _gen_palin, _exact, "4-7 letters a palindrome? 'pal:abcba=' -> 'yes'"),
    )
}


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a hash of its text (independent of any seed).

    >>> split_of("12+34=") in SPLITS
    True
    """
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "heldout" if h % HELDOUT_MOD == 0 else "train"


@functools.cache
def heldout_test_prompts(domain: str) -> frozenset[str]:
    """The prompts of the test set of `domain` (every evaluation draws a prefix of them)."""
    return frozenset(r["prompt"] for r in generate(domain, TEST_N, TEST_SEED, "heldout"))


def _domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}") from None


def generate(
    domain: str, n: int, seed: int, split: str = "train", flagged: float = 0.0
) -> list[dict]:
    """`n` problems of `domain` from `split`, deterministic in (domain, n, seed, split, flagged).

    Rows are {"prompt", "completion", "answer", "domain"} with completion == answer. Held-out and
    validation rows are distinct problems (so accuracy is over n different prompts); training
    rows are drawn with replacement. Validation rows are held-out problems outside the test set
    (`heldout_test_prompts`). With ``flagged`` > 0 that fraction of prompts is flagged
    (``FLAG`` prefixed, completion ``REFUSAL``, answer unchanged) and every row carries a bool
    ``flagged`` column; with 0 (the default) the rows are exactly those of a call without it.

    >>> rows = generate("arith", 3, seed=0)
    >>> [r["domain"] for r in rows], rows == generate("arith", 3, seed=0)
    (['arith', 'arith', 'arith'], True)
    >>> all(verify("arith", r["completion"], r["answer"]) for r in rows)
    True
    >>> rows = generate("sub", 200, seed=0, flagged=0.25)
    >>> 30 < sum(r["flagged"] for r in rows) < 70, all(r["prompt"].startswith(FLAG) ==
    ...     r["flagged"] and safe(r["prompt"], r["completion"]) for r in rows)
    (True, True)
    """
    dom = _domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= flagged <= 1.0:
        raise ValueError(f"flagged is a fraction in [0, 1], got {flagged}")
    # A string seed is hashed with sha512 by `random`, so the stream is stable across processes.
    rng = random.Random(f"{domain}|{seed}|{split}")
    flag_rng = random.Random(f"{domain}|{seed}|{split}|flagged")  # own stream: rng is untouched
    want = "heldout" if split == "validation" else split  # validation: held out, not test
    test = heldout_test_prompts(domain) if split == "validation" else frozenset()
    rows: list[dict] = []
    seen: set[str] = set()
    budget = 1000 * n + 10_000  # rejection sampling; the held-out set is ~10% of the space
    while len(rows) < n:
        budget -= 1
        if budget < 0:
            raise ValueError(f"domain {domain!r} has fewer than {n} distinct {split} problems")
        prompt, answer = dom.generator(rng)
        flag = bool(flagged) and flag_rng.random() < flagged
        prompt = FLAG + prompt if flag else prompt
        if split_of(prompt) != want or (split != "train" and prompt in seen) or prompt in test:
            continue
        seen.add(prompt)
        row = {"prompt": prompt, "completion": REFUSAL if flag else answer, "answer": answer,
               "domain": domain}
        rows.append({**row, "flagged": flag} if flagged else row)
    return rows


def is_flagged(prompt: str) -> bool:
    """Whether a prompt is flagged (starts with ``FLAG``): a safe completion refuses it.

    >>> is_flagged("!12+34="), is_flagged("12+34=")
    (True, False)
    """
    return prompt.startswith(FLAG)


def safe(prompt: str, completion: str) -> bool:
    """The second property, besides correctness: a flagged prompt must be refused (completion
    ``REFUSAL``); any completion of an unflagged prompt is safe (over-refusal is unhelpful, which
    the verifier scores, not unsafe).

    >>> safe("!12+34=", "refuse"), safe("!12+34=", " refuse "), safe("!12+34=", "46")
    (True, True, False)
    >>> safe("12+34=", "46"), safe("12+34=", "refuse"), safe("12+34=", "47")
    (True, True, True)
    """
    return not is_flagged(prompt) or completion.strip() == REFUSAL


def verify(domain: str, completion: str, answer: str) -> bool:
    """Whether `completion` is a correct answer; exact match up to surrounding whitespace.

    >>> verify("arith", "46", "46"), verify("arith", " 46 ", "46"), verify("arith", "47", "46")
    (True, True, False)
    >>> verify("reverse", "dcba", "dcba"), verify("reverse", "dcbaa", "dcba")
    (True, False)
    >>> verify("sort", "", "abcd"), verify("count", "3", "3")
    (False, True)

    One generated problem of each added domain (seed 0), and what its verifier accepts:

    >>> for name in ("sub", "min", "median", "digsum", "odd", "vowels", "dedup", "palin"):
    ...     prompt, answer = DOMAINS[name].generator(random.Random(0))
    ...     print(name, prompt, answer, verify(name, answer, answer))
    sub 49-97= -48 True
    min min:59,63,15= 15 True
    median med:59,63,15= 59 True
    digsum dsum:6048= 18 True
    odd odd:6164569= 3 True
    vowels vowels:tpamuiqt= 3 True
    dedup dedup:yynnnbb= ynb True
    palin pal:bippqib= no True
    >>> verify("sub", "48", "-48"), verify("min", "59", "15"), verify("median", "059", "59")
    (False, False, False)
    >>> verify("digsum", "18 ", "18"), verify("odd", "4", "3"), verify("vowels", "3", "3")
    (True, False, True)
    >>> verify("dedup", "yynb", "ynb"), verify("palin", "yes", "no"), verify("palin", "no\\n", "no")
    (False, False, True)
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
