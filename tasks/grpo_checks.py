"""The run-time checks of stage kind `grpo` (tasks/grpo.py) around TRL's GRPOTrainer.

Holds `check_vllm` (vLLM generation can run here), `check_reference` (the KL reference shares
the policy's tokenizer) and `align_resume` (`resume_every` falls where TRL generates a fresh
batch, and a resumed trainer regenerates where the uninterrupted run does). They are apart from
tasks/grpo.py so the kind module stays its config, plan-time hooks and `run`; each raises
StageInputError with the fix. torch / transformers are imported inside functions only.

Run: ``.venv/bin/python -m pytest tests/test_stages.py -q -k grpo``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from artifacts.refs import ArtifactRef, StageInputError


def check_vllm(config: Any) -> None:
    """vllm importable, CUDA visible, and a server URL in server mode (`config`: a
    tasks.grpo.Config with use_vllm set)."""
    import torch

    if importlib.util.find_spec("vllm") is None:
        raise StageInputError(
            "use_vllm is set but vllm is not importable in this environment; install vllm here "
            "(colocate) or run `trl vllm-serve` elsewhere, or set use_vllm: false"
        )
    if not torch.cuda.is_available():
        raise StageInputError("use_vllm is set but no CUDA device is visible; set use_vllm: false")
    if config.vllm_mode == "server" and not config.vllm_server_base_url:
        raise StageInputError("vllm_mode server needs vllm_server_base_url (e.g. http://host:8000)")


def check_reference(reference: ArtifactRef, init: ArtifactRef, model: Any) -> None:
    """The reference's tokenizer fingerprint equals the policy's (`model` is the loaded init)."""
    from transformers import AutoConfig

    from tasks.models import load_tokenizer, tokenizer_fingerprint

    mine = tokenizer_fingerprint(load_tokenizer(init.path), model.config)
    ref_config = AutoConfig.from_pretrained(str(reference.path))
    theirs = tokenizer_fingerprint(load_tokenizer(reference.path), ref_config)
    diff = sorted(k for k in mine if mine[k] != theirs[k])
    if diff:
        raise StageInputError(
            f"reference {reference.stage!r} does not match init {init.stage!r}: {diff} differ; "
            "use a reference built from the same tokenizer"
        )


def align_resume(trainer: Any, every: int, step: int | None) -> None:
    """Snapshots must fall where TRL generates a fresh batch: a resumed GRPOTrainer starts with
    no buffered generations, and its micro-step counter (`_step`, not in the checkpoint) is put
    back from the step, so it regenerates exactly where the uninterrupted run does."""
    args = trainer.args
    micro = args.steps_per_generation * trainer.num_iterations  # micro-steps per generation
    if micro % args.gradient_accumulation_steps or every * args.gradient_accumulation_steps % micro:
        raise StageInputError(
            f"resume_every {every} must be a multiple of the optimizer steps between two "
            f"generations (steps_per_generation {args.steps_per_generation} x num_iterations "
            f"{trainer.num_iterations} / gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}); set resume_every to such a multiple")
    if step:
        trainer._step = step * args.gradient_accumulation_steps
