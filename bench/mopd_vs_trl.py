"""Throughput of our MOPD trainer against TRL's on-policy distillation, side by side, one script.

TRL 1.16 ships ``trl.DistillationTrainer`` (promoted from ``trl.experimental.distillation``):
always on-policy (the student generates every batch), loss = generalized JSD over the full
vocabulary, ``beta=1`` = reverse KL. ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1,
beta=1`` is the same objective on the older code path; DistillationTrainer is the maintained one,
so it is the baseline here. TRL distils from one teacher, so the comparison uses one teacher
(one route) on our side too.

Same for both: the student and teacher weights (the demo-sized tiny Llama by default, or
``--student`` / ``--teacher`` directories), prompts (a fixed mix of the four domains), batch
(``--batch`` prompts, one sample each), ``--max-new-tokens``, temperature 1 with no top-k / top-p,
AdamW at lr 3e-4, grad clip 1.0, fp32, no gradient checkpointing (TRL's default turns it on; it
only costs time at this size), torch threads = ``--threads``.

What counts as a token: a generated completion token, through and including the first eos and
nothing after it (TRL's ``completion_mask`` and our ``Rollout.mask`` both mean exactly this).
Prompt tokens and teacher forwards are not counted; they are work both trainers do per
generated token. tokens/s = generated tokens of steps 2..N / wall seconds of those steps
(step 1 is warm-up for both): generation + teacher scoring + backward + optimizer step.
TRL is timed from ``on_step_begin`` to ``on_step_end`` (its generation happens inside the step),
so its start-up (datasets, Trainer construction) is excluded.

Ours is run twice: ``full_vocab`` (the same objective as TRL beta=1) and ``sampled_token`` (our
default). Goal: ours >= 1.5x TRL.

A third line times only the passes every exact on-policy distiller must run on a batch, on our
own rollouts and chunk layout: sampling, one student forward + backward over prompt and
completion, one teacher forward; no loss math, no optimizer, no bookkeeping. Its ratio to TRL is
the ceiling for a trainer that runs those passes with these models (HF modeling code, fp32) on
this machine: a ratio above it needs less work per token, not a leaner loop. Tried and measured
against it (2026-11-23, not kept): sharing the sampling prefill with the training forward (-3 %
step time), sequence packing of the training and teacher forwards (0 %), differentiating
through the sampling loop itself (+12 %: many small backward GEMMs), torch.compile of the
student (+12 % per pass after a 35 s compile).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/mopd_vs_trl.py [--steps 20 --batch 64
--max-new-tokens 8 --threads 1 --student DIR --teacher DIR]``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEMO = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256}


def _models(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(tokenizer, student, teacher): loaded from directories, or the demo-sized tiny Llama."""
    from tasks import models

    if args.student:
        tok = models.load_tokenizer(args.student)
        return tok, models.load_model(args.student), models.load_model(args.teacher)
    tok = models.build_tokenizer()
    return tok, models.build_tiny_model(tok, seed=0, **DEMO), models.build_tiny_model(
        tok, seed=1, **DEMO)


def _prompts(n: int, seed: int) -> list[dict]:
    from tasks import domains

    names = list(domains.DOMAINS)
    rows = [r for d in names for r in domains.generate(d, n, seed)]
    random.Random(seed).shuffle(rows)
    return rows


def bench_ours(args: argparse.Namespace, estimator: str) -> dict[str, float]:
    """Our Trainer.step (exactly what tasks.mopd.run loops over) with one teacher for all rows."""
    import torch
    from accelerate import Accelerator

    from tasks import domains, mopd, mopd_trainer

    torch.manual_seed(args.seed)
    tok, student, teacher = _models(args)
    cfg = mopd.Config(max_steps=args.steps, prompts_per_route=args.batch, learning_rate=3e-4,
                      max_new_tokens=args.max_new_tokens, estimator=estimator, eval_n=0,
                      seed=args.seed)
    table = {d: "teacher" for d in domains.DOMAINS}  # one teacher, as in TRL
    trainer = mopd_trainer.Trainer(cfg, Accelerator(cpu=True), student, {"teacher": teacher}, tok,
                                   table)
    pool = _prompts(args.batch * args.steps, args.seed)
    tokens, seconds = 0, 0.0
    for step in range(args.steps):
        rows = pool[step * args.batch : (step + 1) * args.batch]
        before, start = trainer.tokens, time.perf_counter()
        trainer.step(rows)
        if step:  # step 1 is warm-up
            seconds += time.perf_counter() - start
            tokens += trainer.tokens - before
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_shared(args: argparse.Namespace) -> dict[str, float]:
    """The passes any exact on-policy distiller runs: sample, student fwd + bwd, teacher fwd."""
    import torch
    from accelerate import Accelerator

    from tasks import domains, mopd, mopd_trainer
    from tasks import rollout as R

    torch.manual_seed(args.seed)
    tok, student, teacher = _models(args)
    cfg = mopd.Config(max_steps=args.steps, prompts_per_route=args.batch,
                      max_new_tokens=args.max_new_tokens, eval_n=0, seed=args.seed)
    table = {d: "teacher" for d in domains.DOMAINS}
    trainer = mopd_trainer.Trainer(cfg, Accelerator(cpu=True), student, {"teacher": teacher}, tok,
                                   table)
    pool = _prompts(args.batch * args.steps, args.seed)
    tokens, parts = 0, {"sample": 0.0, "student_fwd_bwd": 0.0, "teacher_fwd": 0.0}
    for step in range(args.steps):
        clock = time.perf_counter()
        batch = trainer.collect(pool[step * args.batch : (step + 1) * args.batch])
        spent = {"sample": time.perf_counter() - clock}
        chunks = [R.view(batch["rollout"], idx) for _, idx in batch["chunks"]]
        clock = time.perf_counter()
        trainer.student.train()
        for chunk in chunks:
            R.completion_logits(trainer.student, chunk).float().logsumexp(-1).sum().backward()
        spent["student_fwd_bwd"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with torch.no_grad():
            for chunk in chunks:
                R.completion_logits(teacher, chunk)
        spent["teacher_fwd"] = time.perf_counter() - clock
        trainer.opt.zero_grad(set_to_none=True)
        if step:  # step 1 is warm-up
            tokens += int(batch["rollout"].mask.sum())
            for k, v in spent.items():
                parts[k] += v
    seconds = sum(parts.values())
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            **{f"share/{k}": v / seconds for k, v in parts.items()}}


def bench_trl(args: argparse.Namespace) -> dict[str, float]:
    """trl.DistillationTrainer, beta=1 (reverse KL), on the same models, prompts and batch."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.manual_seed(args.seed)
    tok, student, teacher = _models(args)
    counted = {"tokens": 0}

    class Counting(DistillationTrainer):
        def _generate_and_score_completions(self, inputs):  # noqa: ANN001, ANN202
            out = super()._generate_and_score_completions(inputs)
            counted["tokens"] += int(out["completion_mask"].sum())  # through eos, like ours
            return out

    marks: list[tuple[float, float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            self.start, self.before = time.perf_counter(), counted["tokens"]

        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001, ANN003, ANN201
            marks.append((self.start, time.perf_counter(), counted["tokens"] - self.before))

    pool = _prompts(args.batch * args.steps, args.seed)
    with tempfile.TemporaryDirectory() as out_dir:
        config = DistillationConfig(
            output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
            learning_rate=3e-4, lr_scheduler_type="constant", max_grad_norm=1.0, beta=1.0,
            temperature=1.0, top_k=0, top_p=1.0, max_completion_length=args.max_new_tokens,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
            dataloader_num_workers=0, seed=args.seed, shuffle_dataset=False,
        )
        trainer = Counting(
            model=student, teacher_model=teacher, args=config, processing_class=tok,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in pool]),
            callbacks=[Clock()],
        )
        trainer.train()
    timed = marks[1:]  # step 1 is warm-up
    seconds = sum(end - start for start, end, _ in timed)
    tokens = sum(n for _, _, n in timed)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="prompts per step (1 sample each)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per trainer")
    parser.add_argument("--student", help="student model dir (default: demo-sized tiny Llama)")
    parser.add_argument("--teacher", help="teacher model dir (with --student)")
    args = parser.parse_args()
    if bool(args.student) != bool(args.teacher):
        parser.error("--student and --teacher go together")

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    runs = {
        "trl DistillationTrainer (beta=1, full vocab)": lambda: bench_trl(args),
        "ours mopd full_vocab": lambda: bench_ours(args, "full_vocab"),
        "ours mopd sampled_token": lambda: bench_ours(args, "sampled_token"),
        "shared passes only (ceiling, see docstring)": lambda: bench_shared(args),
    }
    # The machine is shared: alternate the trainers, repeat, and keep each one's median run.
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for rep in range(args.repeats):
        order = list(runs)[rep % len(runs):] + list(runs)[: rep % len(runs)]
        for name in order:
            results[name].append(runs[name]())
    medians = {n: statistics.median(r["tokens_per_s"] for r in rs) for n, rs in results.items()}
    base = next(iter(medians.values()))
    print(f"batch {args.batch} x max_new_tokens {args.max_new_tokens}, steps 2..{args.steps}, "
          f"{args.threads} thread(s), median of {args.repeats}; tokens = generated completion "
          "tokens through eos")
    print(f"{'trainer':46s} {'tokens/run':>10s} {'tokens/s (each run)':>26s} {'median':>7s} "
          f"{'vs TRL':>6s}")
    for name, rs in results.items():
        each = " ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
        print(f"{name:46s} {rs[0]['tokens']:10.0f} {each:>26s} {medians[name]:7.0f} "
              f"{medians[name] / base:5.2f}x")
    shares = results["shared passes only (ceiling, see docstring)"]
    print("shared passes, share of their time: " + ", ".join(
        f"{k.removeprefix('share/')} {statistics.median(r[k] for r in shares):.0%}"
        for k in shares[0] if k.startswith("share/")))

if __name__ == "__main__":
    main()
