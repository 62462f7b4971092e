"""Smaller students (DeepSeek R1's distill-to-dense): a model of another size with the same
tokenizer passes every tokenizer check a stage makes (tasks/compat.py's fingerprint, used by
mopd, generate, select, dpo / grpo / ppo references and reward models); the same sizes with
another tokenizer are refused, naming the field.

Run: ``.venv/bin/python -m pytest tests/test_compat_sizes.py -q``
"""

from __future__ import annotations

from pathlib import Path

import pytest

from artifacts.refs import ArtifactRef, StageInputError
from flows.recipe import parse

REPO = Path(__file__).resolve().parent.parent


def _save(path: Path, hidden: int, layers: int, extra_token: bool = False) -> Path:
    from tasks import models

    tok = models.build_tokenizer()
    if extra_token:
        tok.add_tokens(["<tool>"])
    models.save_model(models.build_tiny_model(tok, hidden, layers, 2, 2 * hidden, 0), tok, path)
    return path


def _fp(path: Path) -> dict:
    from tasks.models import fingerprint_of

    return fingerprint_of(path)


@pytest.fixture(scope="module")
def models_(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sizes")
    return {"big": _save(root / "big", 32, 2), "small": _save(root / "small", 16, 1),
            "other": _save(root / "other", 16, 1, extra_token=True)}


def test_a_smaller_model_with_the_same_tokenizer_is_compatible(models_: dict[str, Path]) -> None:
    from transformers import AutoConfig

    from tasks.compat import check_tokenizers, fingerprint_diff
    from tasks.models import load_tokenizer
    from tasks.rm_scoring import check_compatible

    big, small = AutoConfig.from_pretrained(str(models_["big"])), \
        AutoConfig.from_pretrained(str(models_["small"]))
    assert (big.hidden_size, big.num_hidden_layers) != (small.hidden_size,
                                                       small.num_hidden_layers)
    assert fingerprint_diff(_fp(models_["small"]), _fp(models_["big"])) == []
    check_tokenizers(_fp(models_["small"]), {"big": _fp(models_["big"])})  # no error
    ref = ArtifactRef("b" * 64, models_["big"], "grpo", "final", "r1")
    check_compatible("teacher 'big'", ref, load_tokenizer(models_["small"]), small)


def test_another_tokenizer_is_refused_whatever_the_size(models_: dict[str, Path]) -> None:
    from transformers import AutoConfig

    from tasks.compat import check_tokenizers
    from tasks.models import load_tokenizer
    from tasks.rm_scoring import check_compatible

    with pytest.raises(StageInputError, match=r"teacher 'other' is incompatible.*vocab_sha256"):
        check_tokenizers(_fp(models_["small"]), {"other": _fp(models_["other"])})
    ref = ArtifactRef("o" * 64, models_["other"], "grpo", "other", "r")
    with pytest.raises(StageInputError, match="vocab"):
        check_compatible("reference 'other'", ref, load_tokenizer(models_["small"]),
                         AutoConfig.from_pretrained(str(models_["small"])))


def test_r1_distils_into_another_size_of_the_same_tokenizer() -> None:
    """The shipped R1 recipe's dense student: a smaller base, the SFT of the larger model's
    verified samples (generate mode correct from the final RL model)."""
    s = parse(REPO / "recipes" / "r1.yaml").stages
    big, small = s["base"].config, s["small_base"].config
    assert small["hidden_size"] < big["hidden_size"] and small["model"] is None is big["model"]
    assert s["distill"].inputs == {"init": "small_base", "data": {"train": "distill_rows"}}
    assert s["distill_rows"].config["mode"] == "correct"
    assert s["distill_rows"].inputs["init"] == "final"
