"""Tokenizer and model helpers: the in-process tiny Llama, loading, saving, and fingerprints.

- `build_tokenizer`: a character-level tokenizer (printable ASCII + newline, plus <pad> <bos>
  <eos> <unk>) built with `tokenizers` and wrapped as a transformers fast tokenizer. Its
  post-processor prepends <bos>, so ``tokenizer(text)`` gives the same ids in SFT, GRPO (both
  call the tokenizer on plain text) and our own evaluation. Its chat template only concatenates
  contents: the demo's prompts are plain text.
- `build_tiny_model`: a Llama-shaped causal LM with tied embeddings (~0.66M parameters at the
  demo size), initialised from `seed`.
- `load_model` / `load_tokenizer`: plain ``from_pretrained`` on a local directory or a hub id.
- `save_model`: a plain Hugging Face directory (config.json, model.safetensors, tokenizer files)
  that ``AutoModelForCausalLM`` / ``AutoTokenizer`` and vLLM load as is.
- `tokenizer_fingerprint`: what the multi-teacher compatibility check compares.

Departure: the printable-ASCII vocabulary (100 ids) is wider than the demo needs (44) so that
user JSONL data sets tokenize without <unk>; the unused rows cost ~7k parameters.

Run: ``python -m tasks.models /tmp/tiny`` builds, saves and reloads the demo-sized model.
"""

from __future__ import annotations

import hashlib
import json
import string
import sys
from pathlib import Path
from typing import Any

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space; no \t\r\x0b\x0c
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def build_tokenizer() -> Any:
    """A char-level `PreTrainedTokenizerFast` with bos/eos/pad/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}
    # BPE with no merges and no pre-tokenizer splits any text into single characters.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",  # generation pads on the left; trainers set their own side
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    tokenizer: Any,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    seed: int = 0,
) -> Any:
    """A freshly initialised `LlamaForCausalLM` sized for `tokenizer`, tied embeddings."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local directory or a hub id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # hub tokenizers often have none; batching needs one
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | Path, trust_remote_code: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (float32: training here runs on CPU or in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, dtype=torch.float32
    )


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a plain HF directory (safetensors weights + config + tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any, model_config: Any) -> dict:
    """What must match between MOPD teachers and student (OpenRLHF / verl / NeMo-RL checks).

    `vocab_size` is the model's (padded) embedding size, not len(tokenizer): same tokenizer with a
    different padded vocab is the trap REFERENCE.md names.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    template = tokenizer.chat_template
    if isinstance(template, dict):  # multi-template tokenizers
        template = json.dumps(template, sort_keys=True)
    return {
        "vocab_sha256": _sha256(json.dumps(vocab)),
        "vocab_size": int(model_config.vocab_size),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template_sha256": _sha256(template) if template else None,
    }


def fingerprint_of(path: str | Path, trust_remote_code: bool = False) -> dict:
    """`tokenizer_fingerprint` of a model directory, from its tokenizer and config files alone
    (no weights loaded): what every tokenizer check compares."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return tokenizer_fingerprint(load_tokenizer(path, trust_remote_code), config)


# ---- trainer plumbing shared by the training kinds (base, sft, grpo) ----

MAX_HISTORY = 200


def quiet() -> None:
    """Silence per-file progress bars and info logs (the stage runner shows its own progress)."""
    import warnings

    import datasets
    import transformers

    # TRL's configs still set the renamed `gradient_checkpointing` field; the rename is not ours.
    warnings.filterwarnings(
        "ignore", message=".*gradient_checkpointing.* deprecated", category=FutureWarning
    )
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()


def subsample(history: list[dict], limit: int = MAX_HISTORY) -> list[dict]:
    """At most `limit` evenly spaced points of a curve, always keeping the last one.

    >>> [h["step"] for h in subsample([{"step": i} for i in range(10)], 4)]
    [0, 3, 6, 9]
    """
    if len(history) <= limit:
        return list(history)
    idx = sorted({round(i * (len(history) - 1) / (limit - 1)) for i in range(limit)})
    return [history[i] for i in idx]


def progress_callback(progress: Any, total: int, history: list[dict], keys: dict[str, str]) -> Any:
    """A TrainerCallback that feeds `progress` and appends {"step", name: value} to `history`.

    `keys` maps a trainer log key (e.g. "reward") to the name we record (e.g. "reward").
    A run resumed from a checkpoint (tasks/resume.py) first gets the steps before it back from
    the checkpoint's log history, so its curve is the uninterrupted run's.
    """
    from transformers import TrainerCallback

    def point_of(logs: dict) -> dict[str, float]:
        point = {
            n: float(logs[k]) for k, n in keys.items() if isinstance(logs.get(k), int | float)
        }
        return {} if "train_runtime" in logs else point  # the end-of-training summary is not one

    class _Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            if not history:  # resumed: state.log_history is the checkpoint's
                history.extend({"step": int(row["step"]), **p} for row in state.log_history
                               if "step" in row and (p := point_of(row)))

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            point = point_of(logs or {})
            if not point:
                return
            history.append({"step": int(state.global_step), **point})
            progress(int(state.global_step), total, point)

    return _Progress()


def silence_printer(trainer: Any) -> None:
    """Drop the Trainer's stdout log printer (active when tqdm is off); `history` has the logs."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def trainer_defaults(out_dir: Path) -> dict[str, Any]:
    """TrainingArguments we fix for every stage; the stage's `trainer` dict may override them.

    TRL's defaults are tuned for large GPU models (bf16, gradient checkpointing); here fp32 and no
    checkpointing are right for a tiny model on CPU, and checkpoints are the store's job.
    """
    return {
        "output_dir": str(out_dir),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        # Every weight of a causal LM gets a gradient: skip DDP's unused-parameter search
        # (stages with `launch: {processes: N}`).
        "ddp_find_unused_parameters": False,
    }


# TRL arguments the stage owns: where checkpoints go and what survives it. A stage publishes
# exactly one artifact; Trainer checkpoints land in a staging directory deleted at the end.
_CKPT = ("checkpoints inside a stage are deleted when the stage ends (the store keeps only its "
         "final model); to keep an intermediate model, end a stage at that step and chain the "
         "next one with `from:`; to survive a kill, set `resume_every: N` on the stage")
STAGE_OWNED = {
    "output_dir": "the stage writes into the store's staging directory",
    "save_strategy": _CKPT,
    "save_steps": _CKPT,
    "save_total_limit": _CKPT,
    "load_best_model_at_end": "a stage never picks a checkpoint by its held-out score",
    "resume_from_checkpoint": "a stage starts from its `from:` model, or from its own resumable "
    "state (`resume_every: N` on the stage)",
    "ignore_data_skip": "a resumed stage must see the uninterrupted run's data order",
    "save_only_model": _CKPT,
    "push_to_hub": "artifacts live in the store (and its MLflow mirror), not on a hub",
    "hub_model_id": "artifacts live in the store (and its MLflow mirror), not on a hub",
    "report_to": "the stage's curves go to MLflow through posttrain",
}


def check_passthrough(trainer: dict[str, Any], own_fields: set[str]) -> None:
    """Refuse a `trainer` passthrough key that shadows a first-class config field, or one the
    stage owns (checkpoint saving that would be silently deleted, hub pushes, ...).

    >>> check_passthrough({"save_strategy": "no", "weight_decay": 0.1}, {"max_steps"})
    >>> check_passthrough({"save_steps": 250}, {"max_steps"})
    Traceback (most recent call last):
    ...
    ValueError: trainer.save_steps: checkpoints inside a stage are deleted when the stage ends ...
    """
    clash = sorted(set(trainer) & own_fields)
    if clash:
        raise ValueError(f"set {clash} as stage fields, not inside `trainer`")
    for name, why in STAGE_OWNED.items():
        if name in trainer and not (name == "save_strategy" and trainer[name] == "no"):
            raise ValueError(f"trainer.{name}: {why}. Remove it from `trainer`")


def n_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny")
    tok = build_tokenizer()
    save_model(build_tiny_model(tok), tok, target)
    model = load_model(target)
    print(target, n_parameters(model), tokenizer_fingerprint(load_tokenizer(target), model.config))
