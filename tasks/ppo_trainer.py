"""The PPO loop (stage kind `ppo`, tasks/ppo.py): sample, score, GAE, clipped updates.

`PPOTrainer.step` = `collect` (the policy samples one completion per prompt with tasks/rollout.py;
one no-grad pass gives log pi_old, the values and the reference's log-probs; reward models and
the verifier score each sample; per-token rewards, GAE) + `update` (``ppo_epochs`` passes over
the batch in ``minibatches`` shuffled minibatches: clipped surrogate + clipped value loss, one
optimizer step each). tasks/ppo.py owns the config, the checks and the stage's `run`; `build`
assembles the trainer from the stage's inputs, `summary` makes its ``train`` metrics.

The math is tasks/ppo_loss.py. `Scorer` turns samples into sequence scores (reward models,
verifier). `ActorCritic` is the one module the
optimizer (and, under ``launch``, DDP) wraps: the policy plus either a linear value head on the
policy's last hidden state (``value_init: policy``, shared trunk) or a separate value model
(``value_init: reward_model``: a sequence-classification model whose score head is read at
every position, InstructGPT's choice). Logits are ``lm_head(last_hidden_state)``, checked once
against the policy's own forward so an architecture that scales or caps its logits is refused.

Run: ``.venv/bin/python -m pytest tests/test_ppo.py -q``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from artifacts.refs import StageInputError
from tasks import domains as _domains
from tasks import rollout as R
from tasks.mopd_loss import gather_tokens, log_probs, reverse_kl_full
from tasks.ppo_loss import gae, policy_loss, token_rewards, value_loss, whiten

CHUNK_ROWS = 32  # rows per no-grad forward (length-sorted chunks cut padding: rollout.view)


class ActorCritic(torch.nn.Module):
    """The policy and its critic in one module: `forward(chunk)` -> (logits, values) [B, T]."""

    def __init__(self, policy: Any, value_model: Any = None) -> None:
        super().__init__()
        self.policy, self.value_model, self.head = policy, value_model, None
        if value_model is None:  # a linear head on the policy's last hidden state, zero at start
            self.head = torch.nn.Linear(policy.config.hidden_size, 1)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)
        elif not isinstance(getattr(value_model, "score", None), torch.nn.Linear):
            raise StageInputError("value_init: reward_model needs a sequence-classification "
                                  "model with a linear `score` head (e.g. Llama's); use "
                                  "value_init: policy")

    def value_parameters(self) -> list[torch.nn.Parameter]:
        """What the value learning rate applies to (head, or the whole value model)."""
        return list((self.head or self.value_model).parameters())

    def forward(self, chunk: R.Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        steps = chunk.tokens.shape[1]
        kw = {"input_ids": chunk.input_ids, "attention_mask": chunk.attention_mask,
              "position_ids": chunk.position_ids}
        # Position i predicts token i + 1, and V(s_t) is read where token t is predicted.
        hidden = self.policy.get_decoder()(**kw).last_hidden_state[:, -(steps + 1):-1]
        logits = self.policy.get_output_embeddings()(hidden)
        if self.head is not None:
            return logits, self.head(hidden).squeeze(-1)
        trunk = getattr(self.value_model, self.value_model.base_model_prefix)
        h = trunk(**kw).last_hidden_state[:, -(steps + 1):-1]
        return logits, self.value_model.score(h).squeeze(-1).float()


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summary(history: list[dict], steps: int, seconds: float, tokens: int) -> dict[str, Any]:
    """The stage's `train` metrics: steps, time, tokens, and the mean of the first and the last
    tenth of the steps (single steps are too noisy to compare) of each reward, KL, value loss."""
    tenth = max(1, len(history) // 10)
    train: dict[str, Any] = {"steps": steps, "seconds": seconds, "tokens": tokens,
                             "tokens_per_s": tokens / max(seconds, 1e-9)}
    for key in sorted(k for k in history[-1] if k in ("score", "kl", "verifier", "ended")
                      or k in ("value_loss",) or k.startswith(("rm/", "verifier/"))):
        train[f"{key}/first"] = mean([h[key] for h in history[:tenth] if key in h])
        train[f"{key}/last"] = mean([h[key] for h in history[-tenth:] if key in h])
    return train


class PPOTrainer:
    """One policy, its critic, a frozen reference and a scorer: collect a batch, update on it.

    `scorer(rows, texts, ended)` returns ({name: [score per row]}, combined scores [B]): the
    reward models and the verifier live in tasks/ppo.py, the trainer only sees numbers.
    """

    def __init__(self, config: Any, accelerator: Any, policy: Any, value_model: Any,
                 reference: Any, tokenizer: Any, scorer: Any) -> None:
        self.config, self.acc, self.tok, self.scorer = config, accelerator, tokenizer, scorer
        self.reference = reference.eval().requires_grad_(False).to(accelerator.device)
        ac = ActorCritic(policy, value_model)
        _check_logits(ac, tokenizer)
        groups = [{"params": list(policy.parameters()), "lr": config.learning_rate},
                  {"params": ac.value_parameters(), "lr": config.value_learning_rate}]
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        warm = max(config.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
        self.ac, self.opt, self.sched = accelerator.prepare(ac, opt, sched)
        seed = config.seed + accelerator.process_index  # each rank samples its own completions
        self.gen = torch.Generator(device=accelerator.device).manual_seed(seed)
        self.shuffle = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def unwrapped(self) -> ActorCritic:
        return self.acc.unwrap_model(self.ac)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed loop needs from the trainer (tasks/resume.py): policy and critic
        weights, optimizer, scheduler, the sampling and minibatch-shuffle generators, tokens."""
        return {"ac": self.unwrapped().state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "gen": self.gen.get_state(),
                "shuffle": self.shuffle.get_state(), "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        self.unwrapped().load_state_dict(state["ac"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["gen"])
        self.shuffle.set_state(state["shuffle"])
        self.tokens = int(state["tokens"])

    def collect(self, rows: list[dict]) -> dict[str, Any]:
        """Sample, score (policy, critic, reference, rewards), and compute advantages."""
        cfg, dev, ac = self.config, self.acc.device, self.unwrapped()
        ac.eval()
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            enc = self.tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = side
        ro = R.sample(ac.policy, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                      cfg.max_new_tokens, cfg.temperature, self.tok.eos_token_id,
                      self.tok.pad_token_id, self.gen)
        n, steps = ro.tokens.shape
        old_logp, ref_logp, values, kl, entropy = (torch.zeros(n, steps, device=dev)
                                                   for _ in range(5))
        with torch.no_grad():
            for _, idx in R.plan_chunks(ro, {"all": torch.arange(n, device=dev)}, CHUNK_ROWS):
                chunk = R.view(ro, idx)
                t, m = chunk.tokens.shape[1], chunk.mask
                logits, v = ac(chunk)
                lp = log_probs(logits, cfg.temperature)
                rlp = log_probs(R.completion_logits(self.reference, chunk), cfg.temperature)
                old_logp[idx, :t] = gather_tokens(lp, chunk.tokens) * m
                ref_logp[idx, :t] = gather_tokens(rlp, chunk.tokens) * m
                values[idx, :t] = v.float() * m
                kl[idx, :t] = reverse_kl_full(lp, rlp) * m
                entropy[idx, :t] = -(lp.exp() * lp).sum(-1) * m
        texts = self.tok.batch_decode(ro.tokens.tolist(), skip_special_tokens=True)
        ended = (ro.tokens == self.tok.eos_token_id).any(1).tolist()
        parts, scores = self.scorer(rows, texts, ended)
        scores = torch.tensor(scores, dtype=torch.float32, device=dev)
        rewards = token_rewards(old_logp, ref_logp, scores, ro.mask, cfg.kl_coef)
        adv, returns = gae(rewards, values, ro.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, ro.mask)
        tokens = ro.mask.sum()
        point = {"score": float(scores.mean()), "kl": float(kl.sum() / tokens),
                 "kl_reward": float(cfg.kl_coef * ((ref_logp - old_logp) * ro.mask).sum() / n),
                 "entropy": float(entropy.sum() / tokens), "mean_length": float(tokens / n)}
        for name, got in parts.items():
            known = [x for x in got if x == x]  # nan: this row has no such score
            if known:
                point[name] = mean(known)
        return {"rollout": ro, "old_logp": old_logp, "values": values, "adv": adv,
                "returns": returns, "point": point}

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """`ppo_epochs` passes over the batch, `minibatches` optimizer steps each."""
        cfg, ro = self.config, batch["rollout"]
        n = ro.tokens.shape[0]
        self.ac.train()
        sums: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=self.shuffle).to(ro.tokens.device)
            for idx in order.chunk(min(cfg.minibatches, n)):
                chunk = R.view(ro, idx)
                t, m = chunk.tokens.shape[1], chunk.mask
                logits, v = self.ac(chunk)
                logp = gather_tokens(log_probs(logits, cfg.temperature), chunk.tokens)
                pl, pstats = policy_loss(logp, batch["old_logp"][idx, :t], batch["adv"][idx, :t],
                                         m, cfg.cliprange)
                vl, vstats = value_loss(v.float(), batch["values"][idx, :t],
                                        batch["returns"][idx, :t], m, cfg.cliprange_value)
                self.acc.backward(pl + cfg.vf_coef * vl)
                ac = self.unwrapped()
                self.acc.clip_grad_norm_(ac.policy.parameters(), cfg.max_grad_norm)
                self.acc.clip_grad_norm_(ac.value_parameters(), cfg.max_grad_norm)
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                for k, x in {"policy_loss": float(pl.detach()), "value_loss": float(vl.detach()),
                             **pstats, **vstats}.items():
                    sums.setdefault(k, []).append(x)
        return {k: mean(xs) for k, xs in sums.items()}

    def step(self, rows: list[dict]) -> dict[str, float]:
        """One rollout + update; the metrics point logged for this step."""
        start = time.perf_counter()
        batch = self.collect(rows)
        point = {**batch["point"], **self.update(batch)}
        tokens = float(batch["rollout"].mask.sum())
        self.tokens += int(tokens)
        point["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        return point


class Scorer:
    """Sequence scores of samples: each RM's raw score, the verifier, and their weighted sum,
    minus `missing_eos_penalty` for a sample that never ended (the fraction that did: `ended`)."""

    def __init__(self, weights: Mapping[str, float], verifier_weight: float,
                 rms: Mapping[str, Any], eos_id: int, missing_eos_penalty: float = 0.0) -> None:
        from tasks.rm_scoring import RMReward

        self.weights = dict(weights)  # RM route -> weight (tasks.ppo.weights_of)
        self.rms = {n: RMReward(n, rms[n].path, eos_id) for n in self.weights}
        self.verifier_weight, self.eos_id = verifier_weight, eos_id
        self.missing_eos_penalty = missing_eos_penalty

    def __call__(self, rows: list[dict], texts: list[str], ended: list[bool]
                 ) -> tuple[dict[str, list[float]], list[float]]:
        ids = [[self.eos_id] if e else [] for e in ended]  # RMReward reads eos from the ids
        prompts = [r["prompt"] for r in rows]
        parts = {f"rm/{n}": rm(prompts, texts, completion_ids=ids) for n, rm in self.rms.items()}
        verified = [_domains.reward(r["domain"], t, r["answer"])
                    if r.get("domain") in _domains.DOMAINS and isinstance(r.get("answer"), str)
                    else float("nan") for r, t in zip(rows, texts, strict=True)]
        parts["verifier"] = verified
        for d in sorted({r.get("domain") for r in rows} & set(_domains.DOMAINS)):
            parts[f"verifier/{d}"] = [v for r, v in zip(rows, verified, strict=True)
                                      if r.get("domain") == d]
        total = [self.verifier_weight * v if self.verifier_weight else 0.0 for v in verified]
        for n, w in self.weights.items():
            total = [x + w * s for x, s in zip(total, parts[f"rm/{n}"], strict=True)]
        parts["ended"] = [float(e) for e in ended]
        total = [x - (0.0 if e else self.missing_eos_penalty)
                 for x, e in zip(total, ended, strict=True)]
        return parts, total


def build(config: Any, inputs: Any, accelerator: Any, tokenizer: Any,
          weights: Mapping[str, float]) -> PPOTrainer:
    """The trainer of stage `ppo`: the policy (`init`), its reference, its critic (value_init)
    and the scorer of its `weights` (RM route -> weight, tasks.ppo.weights_of)."""
    from tasks import models
    from tasks.rm_scoring import load_reward_model

    policy = models.load_model(inputs.init.path)
    reference = models.load_model((inputs.reference or inputs.init).path)
    value_model = None
    if config.value_init == "reward_model":  # the RM with the largest weight; ties: first name
        best = max(sorted(weights), key=lambda n: abs(weights[n]))
        value_model = load_reward_model(inputs.reward_model[best].path)[0].train()
    scorer = Scorer(weights, config.verifier_weight, inputs.reward_model,
                    tokenizer.eos_token_id, config.missing_eos_penalty)
    return PPOTrainer(config, accelerator, policy, value_model, reference, tokenizer, scorer)


def _check_logits(ac: ActorCritic, tokenizer: Any) -> None:
    """Refuse a policy whose logits are not lm_head(last hidden state) (softcapping, scaling):
    the trainer computes them that way to share the trunk with the value head."""
    enc = tokenizer(["1+2="], return_tensors="pt")
    dev = next(ac.parameters()).device
    ids, attn = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    probe = R.Rollout(ids, attn, pos, ids[:, -1:], torch.ones_like(ids[:, -1:]).float())
    with torch.no_grad():
        mine, _ = ac(probe)
        theirs = R.completion_logits(ac.policy, probe)
    if not torch.allclose(mine.float(), theirs.float(), atol=1e-4, rtol=1e-4):
        raise StageInputError(
            f"policy {type(ac.policy).__name__} computes its logits otherwise than "
            "lm_head(last hidden state) (softcapping or scaling); ppo does not support it yet")
