"""Tests of the `mopd` kind: loss math, routing, compatibility guards, and that training moves.

Tiny Llamas (hidden 32, 2 layers) built in-process, everything under tmp_path, no hub access.

Run: ``.venv/bin/python -m pytest tests/test_mopd.py -q``
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from artifacts.refs import ArtifactRef, Inputs, StageInputError  # noqa: E402
from tasks import compat, models, mopd, mopd_trainer  # noqa: E402
from tasks import mopd_loss as L  # noqa: E402
from tasks import rollout as R  # noqa: E402

torch.set_num_threads(1)
SIZE = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
PROMPTS = ["12+34=", "rev:abcde=", "1+2=", "sort:dcbaef="] * 4


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer()


def tiny(tok, seed: int = 0):
    return models.build_tiny_model(tok, seed=seed, **SIZE)


def rollout_of(model, tok, prompts=PROMPTS, seed: int = 0, max_new_tokens: int = 6):
    enc = tok(prompts, return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(seed)
    return R.sample(model.eval(), enc["input_ids"], enc["attention_mask"], max_new_tokens, 1.0,
                    tok.eos_token_id, tok.pad_token_id, gen)


def ref(
    path: Path, kind: str = "grpo", sft_root: str | None = "sft0", stage: str = ""
) -> ArtifactRef:
    return ArtifactRef(key=f"{path.name:0<64}"[:64], path=path, kind=kind,
                       stage=stage or path.name, recipe="test", manifest={"sft_root": sft_root})


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok):
    """Saved student / teachers / data shared by the run-level tests (built once)."""
    from tasks import data

    root = tmp_path_factory.mktemp("mopd_store")
    student = tiny(tok, 0)
    models.save_model(student, tok, root / "student")
    models.save_model(tiny(tok, 1), tok, root / "t_arith")
    models.save_model(tiny(tok, 2), tok, root / "t_reverse")
    data.run(data.Config(domains=["arith", "reverse"], size=64), Inputs(), root / "data")
    return root


def inputs_of(root: Path, teachers: dict[str, ArtifactRef] | None = None, **kw) -> Inputs:
    teachers = teachers if teachers is not None else {
        "arith": ref(root / "t_arith"), "reverse": ref(root / "t_reverse")}
    return Inputs(init=ref(root / "student", "sft", **kw), teachers=teachers,
                  data={"train": ref(root / "data", "data")})


FAST = {"max_steps": 1, "prompts_per_route": 4, "eval_n": 0, "max_new_tokens": 4}


# ---- the invariant: student == teacher gives exactly zero ----


@pytest.mark.parametrize("estimator", L.ESTIMATORS)
def test_student_equal_teacher_gives_exact_zero(tok, estimator):
    student = tiny(tok)
    teacher = copy.deepcopy(student).eval()
    ro = rollout_of(student, tok)
    groups = {"a": torch.arange(0, len(PROMPTS), 2), "b": torch.arange(1, len(PROMPTS), 2)}
    chunks = R.plan_chunks(ro, groups, max_rows=4)
    assert len(chunks) == 4
    student.train()
    for _, idx in chunks:
        chunk = R.view(ro, idx)
        logits = R.completion_logits(student, chunk)
        sc = R.score(logits, teacher, chunk)
        assert torch.equal(sc.old_logp, sc.teacher_logp) and sc.kl_sum == 0.0
        assert torch.count_nonzero(L.advantages(sc.teacher_logp, sc.old_logp, chunk.mask)) == 0
        loss, stats = L.mopd_loss(logits, chunk.tokens, chunk.mask, sc.old_logp, sc.teacher_logp,
                                  sc.teacher_logp_full, estimator=estimator, top_k=4)
        loss.backward()
        assert loss.item() == 0.0 and stats["dropped"] == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in student.parameters())


@pytest.mark.parametrize("minibatches", [1, 2])
def test_student_equal_teacher_trainer_step_is_a_no_op(tok, minibatches):
    """End to end (fused on-policy update, and the pre-pass path): KL 0, weights unchanged."""
    from accelerate import Accelerator

    student = tiny(tok)
    before = copy.deepcopy(student.state_dict())
    teachers = {"arith": copy.deepcopy(student), "reverse": copy.deepcopy(student)}
    cfg = mopd.Config(max_new_tokens=5, minibatches=minibatches, estimator="full_vocab")
    trainer = mopd_trainer.Trainer(cfg, Accelerator(cpu=True), student, teachers, tok,
                           {"arith": "arith", "reverse": "reverse"})
    rows = [{"prompt": "1+2=", "domain": "arith", "answer": "3"},
            {"prompt": "rev:abcd=", "domain": "reverse", "answer": "dcba"}] * 4
    point = trainer.step(rows)
    assert point["kl/arith"] == point["kl/reverse"] == point["loss"] == 0.0
    after = trainer.unwrapped().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_view_trims_padding_but_keeps_logits(tok):
    model = tiny(tok).eval()
    ro = rollout_of(model, tok, ["1+2=", "count:k:xkqkvk="] * 2)
    idx = torch.tensor([0, 2])  # the two short prompts
    chunk = R.view(ro, idx)
    assert chunk.input_ids.shape[1] < ro.input_ids.shape[1]
    with torch.no_grad():
        full = R.completion_logits(model, ro)[idx][:, : chunk.tokens.shape[1]]
        trimmed = R.completion_logits(model, chunk)
    valid = chunk.mask.bool()
    torch.testing.assert_close(trimmed[valid], full[valid], rtol=1e-4, atol=1e-5)


def test_kl_estimators_on_known_distributions():
    logp_s = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    logp_t = torch.log(torch.tensor([[[0.2, 0.2, 0.6]]]))
    exact = 0.7 * math.log(0.7 / 0.2) + 0.1 * math.log(0.1 / 0.6)
    assert L.reverse_kl_full(logp_s, logp_t).item() == pytest.approx(exact, rel=1e-5)
    # top-1 + tail bin: bins {0}, {1, 2}: 0.7 log(0.7/0.2) + 0.3 log(0.3/0.8)
    binned = 0.7 * math.log(0.7 / 0.2) + 0.3 * math.log(0.3 / 0.8)
    assert L.reverse_kl_top_k(logp_s, logp_t, 1).item() == pytest.approx(binned, rel=1e-5)
    assert L.reverse_kl_top_k(logp_s, logp_t, 3).item() == pytest.approx(exact, rel=1e-5)


def test_surrogate_kl_has_the_true_gradient():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 11, generator=gen)
    logp_t = torch.randn(2, 3, 11, generator=gen).log_softmax(-1)
    for fn in (L.reverse_kl_full, lambda s, t, sur=False: L.reverse_kl_top_k(s, t, 4, sur)):
        grads = []
        for sur in (False, True):
            x = z.clone().requires_grad_(True)
            fn(x.log_softmax(-1), logp_t, sur).sum().backward()
            grads.append(x.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ---- IS gate ----


def test_is_gate_drops_tokens_outside_the_band():
    ratios = torch.tensor([[0.4, 0.5, 1.0, 2.0, 2.5]])
    old = torch.zeros_like(ratios)
    w, kept = L.is_gate(ratios.log(), old, 0.5, 2.0)
    assert kept.tolist() == [[False, True, True, True, False]]
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0]]))
    # Through the loss: dropped tokens are counted and get no gradient.
    logits = torch.zeros(1, 5, 3, requires_grad=True)  # p(token 0) = 1/3 everywhere
    tokens = torch.zeros(1, 5, dtype=torch.long)
    old_logp = math.log(1 / 3) - ratios.log()  # so that p_theta / p_old == ratios
    teacher = torch.zeros(1, 5)  # log p_T = 0: positive advantage everywhere
    loss, stats = L.mopd_loss(logits, tokens, torch.ones(1, 5), old_logp, teacher)
    loss.backward()
    assert stats["dropped"] == 2 and stats["tokens"] == 5
    per_token = logits.grad.abs().sum(-1)[0]
    assert per_token[0] == 0 and per_token[4] == 0 and bool((per_token[1:4] > 0).all())


def test_outcome_reward_is_centered_and_pushes_the_better_sample_up():
    orm = L.orm_advantage(torch.tensor([1.0, 0.0, 0.0, 1.0]), 0.5)
    torch.testing.assert_close(orm, torch.tensor([0.25, -0.25, -0.25, 0.25]))
    # Teacher == old policy (no distillation signal): only the outcome term moves the logits.
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3], [1, 2, 3]])
    old = torch.full((2, 3), math.log(1 / 5))
    for estimator in L.ESTIMATORS:
        logits.grad = None
        teacher_full = torch.full((2, 3, 5), math.log(1 / 5))
        loss, _ = L.mopd_loss(logits, tokens, torch.ones(2, 3), old, old, teacher_full,
                              estimator=estimator, top_k=2, orm_adv=torch.tensor([0.5, -0.5]))
        loss.backward()
        picked = logits.grad.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        # gradient descent raises sample 0 (grad < 0) and lowers sample 1 (grad > 0)
        assert bool((picked[0] < 0).all() and (picked[1] > 0).all()), estimator


# ---- routing ----


class FixedTeacher(torch.nn.Module):
    """A fake teacher whose logits put (almost) all mass on one token at every position."""

    def __init__(self, token: int, vocab: int) -> None:
        super().__init__()
        self.token, self.vocab = token, vocab
        self.rows_seen = 0

    def forward(self, input_ids, **kwargs):  # noqa: ANN001, ANN003
        self.rows_seen += input_ids.shape[0]
        logits = torch.full((*input_ids.shape, self.vocab), -10.0)
        logits[..., self.token] = 10.0
        return SimpleNamespace(logits=logits)


def test_routing_sends_each_sample_to_its_routes_teacher(tok):
    from accelerate import Accelerator

    vocab = len(tok)
    tokens = {"arith": tok.convert_tokens_to_ids("7"), "reverse": tok.convert_tokens_to_ids("z")}
    teachers = {route: FixedTeacher(t, vocab) for route, t in tokens.items()}
    rows = [{"prompt": "1+2=", "domain": "arith", "answer": "3"},
            {"prompt": "rev:abcd=", "domain": "reverse", "answer": "dcba"}] * 3
    cfg = mopd.Config(max_new_tokens=5)
    trainer = mopd_trainer.Trainer(cfg, Accelerator(cpu=True), tiny(tok), teachers, tok,
                           {"arith": "arith", "reverse": "reverse"})
    batch = trainer.collect(rows)
    expected = torch.tensor([-10.0, 10.0]).log_softmax(-1)  # [off-token, on-token] log-probs
    seen = []
    for (route, idx), sc in zip(batch["chunks"], trainer.score(batch), strict=True):
        assert {rows[i]["domain"] for i in idx.tolist()} == {route}
        seen += idx.tolist()
        chunk = R.view(batch["rollout"], idx)
        valid = chunk.mask.bool()
        assert (sc.teacher_logp_full[valid].argmax(-1) == tokens[route]).all()
        lp = torch.where(chunk.tokens == tokens[route], expected[1], expected[0])
        torch.testing.assert_close(sc.teacher_logp[valid], lp[valid])
        adv = L.advantages(sc.teacher_logp, sc.old_logp, chunk.mask)
        torch.testing.assert_close(adv[valid], (lp - sc.old_logp)[valid])
    assert sorted(seen) == list(range(len(rows)))
    assert teachers["arith"].rows_seen == 3 and teachers["reverse"].rows_seen == 3
    point = trainer.update(batch)  # the fused path routes the same chunks
    assert teachers["arith"].rows_seen == 6 and teachers["reverse"].rows_seen == 6
    assert point["kl/arith"] > 1 and point["kl/reverse"] > 1


def test_route_table_unmapped_error_and_default():
    assert mopd.route_table(["a", "b"], ["a", "b"], "error") == {"a": "a", "b": "b"}
    with pytest.raises(StageInputError, match=r"\['c'\].*known routes: \['a', 'b'\]"):
        mopd.route_table(["a", "c"], ["a", "b"], "error")
    assert mopd.route_table(["a", "c"], ["a", "b"], "default:b") == {"a": "a", "c": "b"}
    with pytest.raises(StageInputError, match="names no teacher"):
        mopd.route_table(["a"], ["a"], "default:zz")


def test_unmapped_route_refused_before_training_and_default_fallback(store, tmp_path):
    only_arith = {"arith": ref(store / "t_arith")}
    with pytest.raises(StageInputError, match=r"'reverse'.*known routes: \['arith'\]"):
        mopd.run(mopd.Config(**FAST), inputs_of(store, only_arith), tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before any training or saving
    cfg = mopd.Config(**FAST, unmapped="default:arith")
    out = mopd.run(cfg, inputs_of(store, only_arith), tmp_path / "b")
    assert out["train"]["routes"] == {"arith": "arith", "reverse": "arith"}
    assert (tmp_path / "b" / "config.json").is_file()


# ---- compatibility and lineage guards ----


def test_teacher_with_other_vocabulary_is_refused(store, tok, tmp_path):
    other = models.build_tokenizer()
    other.add_tokens(["<tool>"])
    models.save_model(models.build_tiny_model(other, seed=3, **SIZE), other, tmp_path / "t_other")
    teachers = {"arith": ref(store / "t_arith"), "reverse": ref(tmp_path / "t_other")}
    with pytest.raises(StageInputError) as err:
        mopd.run(mopd.Config(**FAST), inputs_of(store, teachers), tmp_path / "out")
    msg = str(err.value)
    assert "teacher 'reverse'" in msg and "vocab_sha256" in msg
    assert "vocab_size: teacher=101 student=100" in msg and "'arith'" not in msg
    assert not (tmp_path / "out").exists()


def test_teacher_with_padded_vocab_size_is_refused(store, tok, tmp_path):
    padded = tiny(tok, 4)
    padded.resize_token_embeddings(128)  # same tokenizer, embedding padded to 128 rows
    models.save_model(padded, tok, tmp_path / "t_padded")
    teachers = {"arith": ref(tmp_path / "t_padded"), "reverse": ref(store / "t_reverse")}
    with pytest.raises(StageInputError, match=r"'arith'.*vocab_size: teacher=128 student=100"):
        mopd.run(mopd.Config(**FAST), inputs_of(store, teachers), tmp_path / "out")


def test_check_tokenizers_names_every_differing_field():
    fp = {"vocab_sha256": "a", "vocab_size": 100, "bos_token_id": 1, "eos_token_id": 2,
          "pad_token_id": 0, "chat_template_sha256": "t"}
    compat.check_tokenizers(fp, {"x": dict(fp)})
    bad = {**fp, "eos_token_id": 3, "chat_template_sha256": "u"}
    with pytest.raises(StageInputError) as err:
        compat.check_tokenizers(fp, {"x": dict(fp), "y": bad})
    msg = str(err.value)
    assert "teacher 'y'" in msg and "teacher 'x'" not in msg
    assert "eos_token_id: teacher=3 student=2" in msg and "chat_template_sha256" in msg


def test_lineage_guard(store, tmp_path):
    teachers = {"arith": ref(store / "t_arith", sft_root="rootB", stage="rl_arith"),
                "reverse": ref(store / "t_reverse", sft_root="rootA")}
    with pytest.raises(StageInputError) as err:
        mopd.run(mopd.Config(**FAST), inputs_of(store, teachers, sft_root="rootA"), tmp_path / "a")
    msg = str(err.value)
    assert "'rootA'" in msg and "'rootB'" in msg and "rl_arith" in msg
    assert "allow_cross_lineage: true" in msg and "'reverse'" not in msg
    cfg = mopd.Config(**FAST, allow_cross_lineage=True)
    out = mopd.run(cfg, inputs_of(store, teachers, sft_root="rootA"), tmp_path / "b")
    assert len(out["warnings"]) == 1 and "rootB" in out["warnings"][0]


def test_check_lineage_same_root_passes_and_unknown_warns(store):
    student = ref(store / "student", "sft", sft_root="r")
    assert compat.check_lineage(student, {"a": ref(store / "t_arith", sft_root="r")}, False) == []
    unknown = ref(store / "student", "sft", sft_root=None)
    warns = compat.check_lineage(unknown, {"a": ref(store / "t_arith", sft_root=None)}, False)
    assert len(warns) == 1 and "not checked" in warns[0]


# ---- config ----


def test_config_validation():
    with pytest.raises(ValueError):
        mopd.Config(is_low=2.0, is_high=2.0)
    with pytest.raises(ValueError):
        mopd.Config(unmapped="fallback")
    with pytest.raises(ValueError):
        mopd.Config(bogus=1)
    assert all(f.description for f in mopd.Config.model_fields.values())


# ---- training moves ----


def test_one_step_changes_the_weights(store, tmp_path):
    before = models.load_model(store / "student").state_dict()
    out = mopd.run(mopd.Config(**FAST), inputs_of(store), tmp_path / "out")
    after = models.load_model(tmp_path / "out").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert out["history"][0]["step"] == 1
    assert {"loss", "kl/arith", "kl/reverse", "is_drop_rate", "tokens_per_s"} <= set(
        out["history"][0])


@pytest.mark.parametrize(("estimator", "reverse_scale"), [("sampled_token", 3.0),
                                                         ("full_vocab", 0.5)])
def test_short_run_lowers_kl_to_the_teachers(tok, tmp_path, estimator, reverse_scale):
    """Teachers = the student with sharpened (arith) / sharpened or flattened (reverse) outputs.

    A random tiny Llama is near-uniform over 100 tokens, where one-sample estimates are pure
    noise; scaling the final norm gives the low-entropy student an SFT model would be. Flattening
    (raising entropy) is the hard direction for the sampled-token estimator, so it is exercised
    with full_vocab.
    """
    from tasks import data

    student = tiny(tok, 0)
    with torch.no_grad():
        student.model.norm.weight.mul_(10.0)
    models.save_model(student, tok, tmp_path / "student")
    for route, scale in (("arith", 2.0), ("reverse", reverse_scale)):
        teacher = copy.deepcopy(student)
        with torch.no_grad():
            teacher.model.norm.weight.mul_(scale)
        models.save_model(teacher, tok, tmp_path / f"t_{route}")
    data.run(data.Config(domains=["arith", "reverse"], size=64), Inputs(), tmp_path / "data")
    cfg = mopd.Config(max_steps=30, prompts_per_route=8, eval_n=0, max_new_tokens=4,
                      learning_rate=3e-3, estimator=estimator)
    train = mopd.run(cfg, inputs_of(tmp_path), tmp_path / "out")["train"]
    for route in ("arith", "reverse"):
        first, last = train[f"kl/{route}/first"], train[f"kl/{route}/last"]
        assert first > 0.2 and last < 0.3 * first, (route, first, last)
