"""Compatibility guards for stages that learn from teachers (MOPD today, trace distillation later).

Two checks run before any training step, because both failures are silent otherwise:

- `check_tokenizers`: every teacher must share the student's vocabulary (hash), ``vocab_size`` of
  the model config, bos / eos / pad ids and chat template. Token ids are the only thing a teacher
  and a student exchange; a teacher with another vocabulary, or the same tokenizer with a
  differently padded embedding (Qwen2.5-0.5B 151936 vs 7B 152064, huggingface/trl#2215), scores
  the wrong tokens and the student trains on noise without any error.
- `check_lineage`: every teacher must descend from the student's SFT checkpoint (same
  ``sft_root`` in its manifest). Same-lineage teachers start close to the student (KL ~0.04 in the
  MOPD paper) and distil well; a teacher from another SFT run starts far away (~0.19) and did
  worse. A recipe may still opt in with ``allow_cross_lineage: true``; the run then carries a
  warning in its manifest.

Both are pure functions of fingerprints / refs so they are unit-testable without models, and both
raise `StageInputError` (exit code 2, no traceback) with the teacher, the field, both values and
the fix.

Run: imported by tasks/mopd.py; ``python -m pytest tests/test_mopd.py -q -k compat`` tests it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from artifacts.refs import ArtifactRef, StageInputError

# The fields of tasks.models.tokenizer_fingerprint that must match, in the order we report them.
FINGERPRINT_FIELDS = (
    "vocab_sha256",
    "vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "chat_template_sha256",
)


def fingerprint_diff(student_fp: Mapping[str, Any], teacher_fp: Mapping[str, Any],
                     labels: tuple[str, str] = ("teacher", "student")) -> list[str]:
    """Fields (of FINGERPRINT_FIELDS) whose values differ, as 'field: teacher=X student=Y'
    (`labels` names the two sides: teacher's, then student's).

    >>> fingerprint_diff({"vocab_size": 44, "pad_token_id": 0},
    ... {"vocab_size": 48, "pad_token_id": 0})
    ['vocab_size: teacher=48 student=44']
    >>> fingerprint_diff({"vocab_size": 44}, {"vocab_size": 48}, ("rm", "sft"))
    ['vocab_size: rm=48 sft=44']
    """
    return [
        f"{name}: {labels[0]}={teacher_fp.get(name)!r} {labels[1]}={student_fp.get(name)!r}"
        for name in FINGERPRINT_FIELDS
        if student_fp.get(name) != teacher_fp.get(name)
    ]


def check_tokenizers(
    student_fp: Mapping[str, Any], teacher_fps: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise StageInputError unless every teacher's tokenizer fingerprint equals the student's.

    The message lists every incompatible teacher route with each differing field and both values.

    >>> check_tokenizers({"vocab_size": 44}, {"arith": {"vocab_size": 44}})
    >>> check_tokenizers({"vocab_size": 44}, {"sort": {"vocab_size": 64}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    artifacts.refs.StageInputError: teacher 'sort' is incompatible with the student: ...
    """
    problems = []
    for route in sorted(teacher_fps):
        diff = fingerprint_diff(student_fp, teacher_fps[route])
        if diff:
            detail = "; ".join(diff)
            problems.append(f"teacher {route!r} is incompatible with the student: {detail}")
    if problems:
        raise StageInputError(
            "\n".join(problems)
            + "\nA teacher must share the student's tokenizer and config.vocab_size exactly, or it"
            " scores the wrong tokens. Fix: use teachers trained from the student's checkpoint"
            " (same tokenizer files, same vocab_size)."
        )


def _describe(ref: ArtifactRef) -> str:
    return f"stage {ref.stage!r} of recipe {ref.recipe!r} (key {ref.key[:12]})"


def check_lineage(
    student: ArtifactRef, teachers: Mapping[str, ArtifactRef], allow_cross_lineage: bool
) -> list[str]:
    """Refuse teachers whose sft_root differs from the student's; return warnings.

    With ``allow_cross_lineage`` a mismatch becomes a warning instead of an error. An sft_root
    missing on both sides (refs built by hand, or a student that never went through SFT) cannot
    be checked: that is a warning too, never a silent pass.
    """
    mismatched = {r: t for r, t in sorted(teachers.items()) if t.sft_root != student.sft_root}
    warnings: list[str] = []
    if student.sft_root is None:
        unknown = [r for r, t in sorted(teachers.items()) if t.sft_root is None]
        if unknown:
            warnings.append(
                "sft_root is unknown for the student and teachers "
                f"{', '.join(map(repr, unknown))}: SFT lineage was not checked"
            )
    if not mismatched:
        return warnings
    lines = [
        f"teacher {route!r} ({_describe(t)}) has sft_root {t.sft_root!r}"
        for route, t in mismatched.items()
    ]
    summary = (
        f"the student ({_describe(student)}) has sft_root {student.sft_root!r}, but "
        + "; ".join(lines)
    )
    if allow_cross_lineage:
        return [*warnings, f"cross-lineage distillation (allow_cross_lineage: true): {summary}"]
    raise StageInputError(
        f"teachers do not share the student's SFT lineage: {summary}. Teachers from another SFT"
        " run start far from the student and distil worse. Fix: train the teachers from the"
        " student's SFT checkpoint, or set `allow_cross_lineage: true` in this stage's config to"
        " distil anyway (the run then records a warning)."
    )
