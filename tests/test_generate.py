"""The `generate` kind at toy size: best of K beats K = 1, `correct` keeps only verified rows,
`pairs` ranks chosen above rejected (by verifier and by a reward model), rows record their
generator and sample, routing by a column, and bad inputs refused at plan time or before any
sampling.

The sampler is a tiny Llama pretrained for a few dozen steps (the `base` kind's `max_steps`) on
`vowels` and `palin`: it has learnt the answer format and guesses among the answers, so its
samples are right a fraction of the time, as a small SFT model's are.

Run: ``.venv/bin/python -m pytest tests/test_generate.py -q``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from artifacts.refs import Inputs, StageInputError
from flows.recipe import RecipeError, parse
from tests import stage_fixtures as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOMAINS = ["vowels", "palin"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A briefly trained sampler, its prompts, a tiny random reward model on its tokenizer, and
    a model with another vocabulary."""
    import torch

    from tasks import base, models

    root = tmp_path_factory.mktemp("gen")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base.run(base.Config(**sf.TINY, max_steps=40, learning_rate=1e-2, batch_size=64,
                             domains=DOMAINS, eval_n=0), Inputs(), root / "sampler")
        sf.gen_data(root / "data", DOMAINS, size=400)
        tok = models.build_tokenizer()
        models.save_model(_tiny_rm(tok), tok, root / "rm")
        other = models.build_tokenizer()
        other.add_tokens(["<tool>"])  # another vocabulary (and vocab_size)
        models.save_model(models.build_tiny_model(other, **sf.TINY), other, root / "other")
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "sampler": root / "sampler", "data": root / "data", "rm": root / "rm",
            "other": root / "other"}


def _tiny_rm(tok):  # noqa: ANN001, ANN202
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForSequenceClassification(cfg)


def _run(world: dict, out: str, rm: bool = False, **cfg):  # noqa: ANN003, ANN202
    from tasks import generate

    ins = Inputs(init=sf.ref(world["sampler"], "sft", "sft"),
                 data={"train": sf.ref(world["data"], "data")},
                 reward_model={"rm": sf.ref(world["rm"], "reward_model", "rm")} if rm else {})
    metrics = generate.run(generate.Config(**cfg), ins, world["root"] / out)
    rows = [json.loads(x) for x in (world["root"] / out / "train.jsonl").read_text().splitlines()]
    return metrics, rows


def test_best_of_8_beats_one_sample(world: dict) -> None:
    one, _ = _run(world, "k1", num_samples=1, prompts=120, seed=3)
    best, rows = _run(world, "k8", num_samples=8, prompts=120, seed=3)
    for d in DOMAINS:
        k1, k8 = one["generate"][d], best["generate"][d]
        assert 0.1 < k1["accuracy"] < 0.9, k1  # the sampler is neither hopeless nor saturated
        assert k1["best_accuracy"] == k1["accuracy"]  # one sample: its best is itself
        assert k8["best_accuracy"] >= k1["best_accuracy"] + 0.2, (d, k1, k8)
        assert abs(k8["accuracy"] - k1["accuracy"]) < 0.15  # same model, same per-sample rate
    # best ranked by the verifier keeps verified samples only, one per prompt
    assert rows and all(r["verified"] for r in rows)
    assert len({r["prompt"] for r in rows}) == len(rows) == best["rows"]
    assert all(r["generator"] == "sft" and 0 <= r["sample"] < 8 for r in rows)
    assert best["schema"]["shape"] == "completion" and "eval" not in best
    assert best["sampling"]["samples"] == 8 * 120 and best["sampling"]["samples_per_s"] > 0


def test_sampler_at_low_temperature_is_greedy_decoding(world: dict) -> None:
    """rollout.sample_many (shared prefill, finished rows leave the batch) against HF greedy
    `generate`: at temperature ~0 every one of the K samples is the greedy completion."""
    from tasks import domains, evaluate, models
    from tasks.rollout import sample_texts

    model, tok = models.load_model(world["sampler"]), models.load_tokenizer(world["sampler"])
    prompts = [r["prompt"] for d in ["vowels", "palin", "sort"] for r in domains.generate(d, 8, 5)]
    greedy = evaluate.generate(model, tok, prompts, max_new_tokens=6)
    texts, ended, tokens = sample_texts(model, tok, prompts, 3, 6, 1e-6, batch_size=9)
    assert [set(ts) for ts in texts] == [{g} for g in greedy]
    assert len({len(t) for t in greedy}) > 1  # rows finished at different steps
    assert tokens == sum(3 * (len(tok(g, add_special_tokens=False)["input_ids"]) + e[0])
                         for g, e in zip(greedy, ended, strict=True))


def test_correct_keeps_only_verified_rows(world: dict) -> None:
    from tasks import domains

    metrics, rows = _run(world, "correct", mode="correct", num_samples=6, prompts=80,
                         unique=False)
    assert rows and all(domains.verify(r["domain"], r["completion"], r["answer"]) for r in rows)
    verified = sum(round(m["accuracy"] * m["samples"]) for m in metrics["generate"].values())
    assert len(rows) == verified  # every verified sample, and nothing else
    _, once = _run(world, "correct_unique", mode="correct", num_samples=6, prompts=80)
    assert len(once) == len({(r["prompt"], r["completion"].strip()) for r in once}) < len(rows)
    assert set(rows[0]) >= {"prompt", "completion", "answer", "domain", "generator", "sample"}


def test_pairs_rank_chosen_above_rejected(world: dict) -> None:
    from tasks import domains

    metrics, rows = _run(world, "pairs", mode="pairs", num_samples=8, prompts=80)
    assert rows and metrics["schema"]["shape"] == "preference"
    for r in rows:
        assert r["chosen_verified"] and not r["rejected_verified"]
        assert domains.verify(r["domain"], r["chosen"], r["answer"])
        assert not domains.verify(r["domain"], r["rejected"], r["answer"])
        assert r["sample"] != r["rejected_sample"] and "completion" not in r
    assert metrics["rows"] == round(sum(m["acceptance"] * m["prompts"]
                                        for m in metrics["generate"].values()))


def test_reward_model_scores_rank_pairs_and_best(world: dict) -> None:
    metrics, rows = _run(world, "rm_pairs", rm=True, mode="pairs", num_samples=4, prompts=40)
    assert rows and all(r["chosen_rm_score"] > r["rejected_rm_score"] for r in rows)
    assert all(set(m) >= {"rm/rm", "mean_score"} for m in metrics["generate"].values())
    best, brows = _run(world, "rm_best", rm=True, num_samples=4, prompts=40)
    # ranked by the RM alone, every prompt keeps its best, verified or not
    assert len(brows) == 40 and {r["rm_scores"]["rm"] == r["rm_score"] for r in brows} == {True}
    both, _ = _run(world, "rm_verifier", rm=True, num_samples=4, prompts=40, rank_by="verifier")
    assert all(m["best_accuracy"] == m["pass_at_k"] for m in both["generate"].values())


def test_rm_scores_match_one_text_at_a_time(world: dict) -> None:
    import torch

    from tasks.generate import _rm_scores
    from tasks.rm_scoring import load_reward_model

    model, tok = load_reward_model(world["rm"])
    rows = [{"prompt": "pal:abba="}, {"prompt": "vowels:hqeik="}]
    texts, ended = [["yes", "no", "x"], ["2", "22", "y"]], [[True, True, False]] * 2
    batched = _rm_scores(model, tok, rows, texts, ended, batch_size=64)
    for i, r in enumerate(rows):
        for j, t in enumerate(texts[i]):
            text = r["prompt"] + t + (tok.eos_token if ended[i][j] else "")
            with torch.no_grad():
                alone = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
            assert batched[i][j] == pytest.approx(alone, abs=1e-5)


def test_routed_generators_record_their_route(world: dict) -> None:
    from tasks import generate

    ins = Inputs(generators={"vowels": sf.ref(world["sampler"], "sft", "a"),
                             "palin": sf.ref(world["sampler"], "sft", "b")},
                 data={"train": sf.ref(world["data"], "data")})
    metrics = generate.run(generate.Config(num_samples=2, prompts=30, mode="correct"), ins,
                           world["root"] / "routed")
    rows = [json.loads(x) for x in (world["root"] / "routed" / "train.jsonl").read_text()
            .splitlines()]
    assert rows and all(r["generator"] == r["domain"] for r in rows)
    assert metrics["sampling"]["generators"] == {"palin": "b", "vowels": "a"}
    with pytest.raises(StageInputError, match=r"values \['vowels'\] have no generator"):
        generate.run(generate.Config(), Inputs(
            generators={"palin": sf.ref(world["sampler"], "sft", "b")},
            data={"train": sf.ref(world["data"], "data")}), world["root"] / "x")


def test_other_vocabulary_is_refused_before_sampling(world: dict, monkeypatch) -> None:
    from tasks import generate, rollout

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("sampled before the tokenizer check")

    monkeypatch.setattr(rollout, "sample_texts", boom)
    data = {"train": sf.ref(world["data"], "data")}
    cases = [
        Inputs(init=sf.ref(world["sampler"], "sft"), data=data,
               reward_model={"rm": sf.ref(world["other"], "reward_model", "wide_rm")}),
        Inputs(generators={"vowels": sf.ref(world["sampler"], "sft", "a"),
                           "palin": sf.ref(world["other"], "sft", "wide")}, data=data),
    ]
    for ins in cases:
        with pytest.raises(StageInputError,
                           match=r"(?s)another tokenizer.*vocab_size 10[01] vs 10[01]"):
            generate.run(generate.Config(), ins, world["root"] / "refused")
    assert not (world["root"] / "refused").exists()


def test_prompt_rows_without_answers_are_refused(tmp_path: Path, world: dict) -> None:
    from tasks import generate

    sf.write_jsonl(tmp_path / "d" / "train.jsonl",
                   [{"prompt": "pal:abba=", "chosen": "yes", "rejected": "no", "domain": "palin"}])
    with pytest.raises(StageInputError, match="train.jsonl:1: generate needs"):
        generate.run(generate.Config(), Inputs(init=sf.ref(world["sampler"], "sft"),
                                               data={"train": sf.ref(tmp_path / "d", "data")}),
                     tmp_path / "out")


# ---- plan time: the recipe loader and the kind's hooks, nothing runs ----

RECIPE = """\
name: gen
stages:
  prompts: {kind: data, domains: [vowels, palin], size: 64}
  base: {kind: base, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32}
  sft: {kind: sft, from: base, data: prompts, max_steps: 1}
  pairs0: {kind: generate, from: sft, data: prompts, mode: pairs}
  rm: {kind: reward_model, from: sft, data: pairs0, max_steps: 1}
  best: {kind: generate, from: sft, data: prompts, num_samples: 4}
  pairs: {kind: generate, from: sft, data: prompts, mode: pairs, reward_model: rm}
  resft: {kind: sft, from: sft, data: best, max_steps: 1}
  dpo: {kind: dpo, from: sft, data: pairs, max_steps: 1}
"""


def _recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    (tmp_path / "gen.yaml").write_text(text)
    return tmp_path / "gen.yaml"


def _needs_rm_and_dpo() -> None:
    from tasks import KINDS

    if not {"dpo", "reward_model"} <= set(KINDS):
        pytest.skip("needs the dpo and reward_model kinds")


def test_a_generate_recipe_plans(tmp_path: Path) -> None:
    _needs_rm_and_dpo()
    recipe = parse(_recipe(tmp_path))
    assert recipe.stages["best"].inputs["init"] == "sft"
    assert recipe.stages["pairs"].inputs["reward_model"] == {"rm": "rm"}
    assert recipe.stages["dpo"].inputs["data"] == {"train": "pairs"}


@pytest.mark.parametrize(("change", "message"), [
    # pairs given to sft: its rows have no completion
    ({"resft": "{kind: sft, from: sft, data: pairs, max_steps: 1}"},
     r"stages\.resft\.data\.train: kind sft reads prompt, completion .* lack completion"),
    # best rows given to dpo: no chosen / rejected
    ({"dpo": "{kind: dpo, from: sft, data: best, max_steps: 1}"},
     r"stages\.dpo\.data\.train: kind dpo reads prompt, chosen, rejected .* lack chosen"),
    ({"best": "{kind: generate, data: prompts}"}, r"stages\.best: give exactly one of `from:`"),
    ({"best": "{kind: generate, from: sft, generators: {vowels: sft}, data: prompts}"},
     r"stages\.best\.generators: give exactly one of"),
    ({"best": "{kind: generate, generators: {vowels: sft}, data: prompts}"},
     r"stages\.best\.generators: no generator for route\(s\) palin"),
    ({"best": "{kind: generate, from: sft, data: prompts, rank_by: reward_model}"},
     r"stages\.best\.rank_by: rank_by: reward_model needs"),
    # a policy is not a reward model
    ({"pairs": "{kind: generate, from: sft, data: prompts, mode: pairs, reward_model: sft}"},
     r"stages\.pairs\.reward_model\.rm: `reward_model` takes a reward_model, but stage 'sft'"),
])
def test_bad_generate_recipes_are_refused_at_plan_time(tmp_path: Path, change: dict,
                                                       message: str) -> None:
    _needs_rm_and_dpo()
    lines = [f"  {k}: {change[k.strip()]}" if (k := line.split(":")[0].strip()) in change
             else line for line in RECIPE.splitlines()]
    with pytest.raises(RecipeError, match=message):
        parse(_recipe(tmp_path, "\n".join(lines) + "\n"))
