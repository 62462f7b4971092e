"""The MOPD training loop (stage kind `mopd`, tasks/mopd.py): collect a batch, update on it.

`Trainer.step` = `collect` (the student samples one completion per prompt with tasks/rollout.py,
rows are routed to their teacher, the verifier scores the samples) + `update` (per chunk: one
student forward shared by log p_old and the loss, the routed teacher's forward, tasks/mopd_loss.py,
one backward and one optimizer step per minibatch); `train_metrics` sums a run up. tasks/mopd.py
owns the config, the checks and the stage's `run`; bench/mopd_vs_trl.py times `Trainer.step`
against TRL.

Run: ``python -m pytest tests/test_mopd.py -q``.
"""

from __future__ import annotations

import time
from typing import Any

CHUNK_ROWS = 32  # rows per forward: per-route, length-sorted chunks cut padding (rollout.view)


def accelerator_for(config: Any) -> Any:
    """Plain accelerate (CPU when no GPU), or DeepSpeed from `accelerate_config`.

    Multi-process runs come from wrapping the stage in ``accelerate launch``; Accelerator() picks
    the launcher's settings up from the environment. Untested here (no GPU, no deepspeed): ZeRO
    1/2 should work; ZeRO-3 would also need the sharded student gathered for sampling.
    """
    import torch
    from accelerate import Accelerator

    if config.accelerate_config is None:
        return Accelerator(cpu=not torch.cuda.is_available())
    from accelerate.utils import DeepSpeedPlugin  # needs `pip install deepspeed` (extra "gpu")

    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config.accelerate_config))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def train_metrics(trainer: Trainer, history: list[dict], seconds: float, max_steps: int,
                  table: dict[str, str], schedule: Any) -> dict[str, Any]:
    """The stage's `train` metrics: throughput, IS drop rate, the route table, the teacher
    schedule (`Schedule.record()`), and the first / last tenth of every `kl/<route>` and
    `reward/<value>` curve of `history` (one dict per step)."""
    tenth = max(1, len(history) // 10)  # single steps are too noisy to compare
    train: dict[str, Any] = {
        "steps": max_steps,
        "seconds": seconds,
        "tokens": trainer.tokens,
        "tokens_per_s": trainer.tokens / max(seconds, 1e-9),
        "is_drop_rate": mean([h["is_drop_rate"] for h in history]),
        "routes": table,
        "teacher_schedule": schedule,
    }
    for key in sorted(k for k in history[-1] if k.startswith(("kl/", "reward/"))):
        train[f"{key}/first"] = mean([h[key] for h in history[:tenth] if key in h])
        train[f"{key}/last"] = mean([h[key] for h in history[-tenth:] if key in h])
    return train


class Trainer:
    """The MOPD loop around one student and its teacher panel: collect a batch, update on it."""

    def __init__(
        self,
        config: Any,
        accelerator: Any,
        student: Any,
        teachers: dict[str, Any],
        tokenizer: Any,
        table: dict[str, str],
    ) -> None:
        import torch

        self.config, self.acc, self.tok, self.table = config, accelerator, tokenizer, table
        for teacher in teachers.values():
            teacher.eval().requires_grad_(False)
        self.teachers = teachers
        opt = torch.optim.AdamW(student.parameters(), lr=config.learning_rate, weight_decay=0.0)
        warm = max(config.warmup_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm))
        self.student, self.opt, self.sched = accelerator.prepare(student, opt, sched)
        # Each data-parallel process samples its own completions.
        seed = config.seed + accelerator.process_index
        self.gen = torch.Generator(device=accelerator.device).manual_seed(seed)
        self.tokens = 0

    def unwrapped(self) -> Any:
        """The bare student module (for sampling, saving and evaluation)."""
        return self.acc.unwrap_model(self.student)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed loop needs from the trainer (tasks/resume.py): the student's
        weights, the optimizer, the scheduler, the sampling generator and the token count."""
        return {"student": self.unwrapped().state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "gen": self.gen.get_state(),
                "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what `state_dict` returned."""
        self.unwrapped().load_state_dict(state["student"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["gen"])
        self.tokens = int(state["tokens"])

    def collect(self, rows: list[dict]) -> dict[str, Any]:
        """Sample one completion per row, route each row to its teacher, score, verify."""
        import torch

        from tasks import domains as _domains
        from tasks import rollout as R

        cfg, dev, model = self.config, self.acc.device, self.unwrapped()
        model.eval()
        side, self.tok.padding_side = self.tok.padding_side, "left"
        try:
            enc = self.tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        finally:
            self.tok.padding_side = side
        rollout = R.sample(model, enc["input_ids"].to(dev), enc["attention_mask"].to(dev),
                           cfg.max_new_tokens, cfg.temperature, self.tok.eos_token_id,
                           self.tok.pad_token_id, self.gen)
        values = [str(r[cfg.route_key]) for r in rows]
        by_route: dict[str, list[int]] = {}
        for i, value in enumerate(values):
            by_route.setdefault(self.table[value], []).append(i)
        groups = {r: torch.tensor(ix, device=dev) for r, ix in sorted(by_route.items())}
        texts = self.tok.batch_decode(rollout.tokens.tolist(), skip_special_tokens=True)
        rewards = [
            _domains.reward(r["domain"], text, r["answer"])
            if r.get("domain") in _domains.DOMAINS and isinstance(r.get("answer"), str)
            else float("nan")
            for r, text in zip(rows, texts, strict=True)
        ]
        return {"rollout": rollout, "chunks": R.plan_chunks(rollout, groups, CHUNK_ROWS),
                "values": values, "rewards": torch.tensor(rewards, device=dev)}

    def score(self, batch: dict[str, Any]) -> list[Any]:
        """Pre-pass (no gradient): each chunk scored by its route's teacher, in chunk order."""
        import torch

        from tasks import rollout as R

        model, out = self.unwrapped(), []
        model.eval()
        with torch.no_grad():
            for route, idx in batch["chunks"]:
                chunk = R.view(batch["rollout"], idx)
                logits = R.completion_logits(model, chunk)
                out.append(R.score(logits, self.teachers[route], chunk, self.config.temperature))
        return out

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """`minibatches` optimizer steps on one collected batch; returns loss and KL statistics.

        With one minibatch (on-policy), each chunk's teacher is scored inside the update and
        log p_old is the detached log-prob of the very forward that is differentiated: no
        update has happened since sampling, so they are the sampling policy's log-probs and
        the student runs once per chunk, not twice. With more minibatches, a no-grad pre-pass
        fixes log p_old for every chunk before the first update, and the IS gate acts.
        """
        from tasks import mopd_loss as L
        from tasks import rollout as R

        cfg, rollout, chunks = self.config, batch["rollout"], batch["chunks"]
        orm = L.orm_advantage(batch["rewards"], cfg.orm_weight) if cfg.orm_weight else None
        pre = self.score(batch) if cfg.minibatches > 1 else None
        self.student.train()
        sums = {"tokens": 0.0, "dropped": 0.0, "loss_sum": 0.0}
        kl_sum: dict[str, float] = {}
        kl_tokens: dict[str, float] = {}
        norms = []
        for part in range(min(cfg.minibatches, len(chunks))):
            members = list(range(part, len(chunks), cfg.minibatches))
            views = {i: R.view(rollout, chunks[i][1]) for i in members}
            n_tokens = max(sum(float(v.mask.sum()) for v in views.values()), 1.0)
            total = None
            for i, chunk in views.items():
                route, idx = chunks[i]
                logits = R.completion_logits(self.student, chunk)
                sc = pre[i] if pre else R.score(logits, self.teachers[route], chunk,
                                                cfg.temperature)
                loss_sum, stats = L.mopd_loss(
                    logits, chunk.tokens, chunk.mask, sc.old_logp, sc.teacher_logp,
                    sc.teacher_logp_full, estimator=cfg.estimator, temperature=cfg.temperature,
                    is_low=cfg.is_low, is_high=cfg.is_high, top_k=cfg.top_k,
                    orm_adv=None if orm is None else orm[idx],
                )
                total = loss_sum if total is None else total + loss_sum
                for k in sums:
                    sums[k] += stats[k]
                kl_sum[route] = kl_sum.get(route, 0.0) + sc.kl_sum
                kl_tokens[route] = kl_tokens.get(route, 0.0) + stats["tokens"]
            # One backward per optimizer step (not one per chunk): DeepSpeed's engine steps inside
            # backward and DDP all-reduces there, so several calls would step / sync too often.
            self.acc.backward(total / n_tokens)
            norm = self.acc.clip_grad_norm_(self.student.parameters(), cfg.max_grad_norm)
            norms.append(float(norm) if norm is not None else float("nan"))  # None under DS
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
        n = max(sums["tokens"], 1.0)
        point = {"loss": sums["loss_sum"] / n, "is_drop_rate": sums["dropped"] / n,
                 "grad_norm": mean(norms), "kl": sum(kl_sum.values()) / n}
        point.update({f"kl/{r}": kl_sum[r] / max(kl_tokens[r], 1.0) for r in sorted(kl_sum)})
        return point

    def step(self, rows: list[dict]) -> dict[str, float]:
        """One rollout + update; the metrics point logged for this step."""
        start = time.perf_counter()
        batch = self.collect(rows)
        point = self.update(batch)
        tokens = float(batch["rollout"].mask.sum())
        self.tokens += int(tokens)
        rewards = batch["rewards"].tolist()
        for value in sorted(set(batch["values"])):
            got = [x for v, x in zip(batch["values"], rewards, strict=True) if v == value]
            if got and got[0] == got[0]:  # nan: no verifier for this row
                point[f"reward/{value}"] = mean(got)
        point["tokens_per_s"] = tokens / max(time.perf_counter() - start, 1e-9)
        return point
