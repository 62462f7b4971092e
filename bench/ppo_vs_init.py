"""PPO against a reward model, side by side with its init: mean RM score and verifier accuracy.

The issue's acceptance point for `ppo`: PPO against an RM raises both the mean RM score and the
verifier accuracy over its init on the trained domains. To measure it the RM must correlate with
correctness and the init must leave headroom, so this script builds both, at fixed step counts,
calling the stage modules directly (no Prefect, no store), everything under --out:

1. data/      synthetic rows of --domains (tasks.data)
2. sft/       a demo-sized tiny Llama (tasks.models) briefly SFT-trained on them (tasks.sft):
              the policy's init, left with headroom
   sft_rm/    the same, SFT-trained longer: the RM's init (a judge that knows the task better
              than the policy it scores; --rm-sft-steps 0 starts the RM from sft/ instead)
3. pairs/     preference pairs: chosen = the verified answer, rejected = each distinct wrong
              sample of the SFT model (4 at temperature 1 per prompt), and one near miss
              (tasks.reward_model.wrong_answer)
4. rm/        a reward model trained on the pairs from sft_rm/ (tasks.reward_model: TRL
              RewardTrainer)
5. ppo/       tasks.ppo from sft/ against rm/ alone (verifier_weight 0: the verifier is only
              measured), value model initialised from the RM (InstructGPT)

and prints, for init (sft/) and ppo/: greedy held-out accuracy per domain (500 problems,
tasks.evaluate), sampled held-out accuracy (4 temperature-1 samples per problem, the distribution
PPO optimises) and the RM's mean score on the greedy answers (tasks.rm_scoring.heldout_rm), plus
the RM's held-out pairwise accuracy and how well it ranks the SFT model's own samples (AUC of
correct over wrong). Stages whose directory exists are reused (--fresh rebuilds them): pointed
at the --out of bench/rm_accuracy.py (``--out DIR --domains arith,reverse,sort,max``), it runs
PPO from that bench's SFT policy (sft/) against its RM (rm/, trained on `generate` pairs) on its
prompts (data/), building nothing. ``--algo grpo`` trains tasks.grpo against the same RM instead;
``--compare RUN,RUN`` only evaluates existing run directories beside sft/.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/ppo_vs_init.py [--out /tmp/ppo_bench] [--help]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ref(path: Path, kind: str):  # noqa: ANN202
    from artifacts.refs import ArtifactRef

    return ArtifactRef(key="0" * 64, path=path, kind=kind, stage=path.name, recipe="bench")


def _say(every: int):  # noqa: ANN202
    def progress(step: int, total: int, m: dict) -> None:
        if step % every == 0 or step == total:
            print(f"  {step}/{total} " + " ".join(f"{k}={v:.3g}" for k, v in m.items()
                                                  if "/" not in k or k.startswith("rm/")),
                  flush=True)
    return progress


def _samples(model_dir: Path, rows: list[dict], k: int, seed: int) -> list[tuple[dict, str, bool]]:
    """(row, completion, ended) for k temperature-1 samples of each row's prompt."""
    import torch

    from tasks import models
    from tasks import rollout as R

    tok, model = models.load_tokenizer(model_dir), models.load_model(model_dir).eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(rows), 256):
        part = [r for r in rows[i:i + 256] for _ in range(k)]
        enc = tok([r["prompt"] for r in part], return_tensors="pt", padding=True)
        ro = R.sample(model, enc["input_ids"], enc["attention_mask"], 8, 1.0,
                      tok.eos_token_id, tok.pad_token_id, gen)
        texts = tok.batch_decode(ro.tokens.tolist(), skip_special_tokens=True)
        ended = (ro.tokens == tok.eos_token_id).any(1).tolist()
        out += list(zip(part, texts, ended, strict=True))
    return out


def build(a: argparse.Namespace) -> dict:
    """Every stage that is not on disk yet; returns seconds per stage built."""
    from artifacts.refs import Inputs
    from tasks import data, models, reward_model, sft
    from tasks.domains import verify

    out, secs = Path(a.out), {}

    def fresh(name: str) -> bool:
        if a.fresh and name in a.fresh.split(","):
            shutil.rmtree(out / name, ignore_errors=True)
        return not (out / name / ("train.jsonl" if name in ("data", "pairs") else
                                  "config.json")).exists()

    if fresh("data"):
        data.run(data.Config(domains=a.domains, size=a.data_size, seed=0), Inputs(), out / "data")
    for name, steps in (("sft", a.sft_steps), ("sft_rm", a.rm_sft_steps)):
        if steps and fresh(name):
            t = time.perf_counter()
            tok = models.build_tokenizer()
            models.save_model(models.build_tiny_model(tok, seed=0), tok, out / "base")
            cfg = sft.Config(max_steps=steps, eval_n=0, lr_scheduler_type="polynomial",
                             trainer={"lr_scheduler_kwargs": {"lr_end": 5e-4, "power": 1.0}})
            sft.run(cfg, Inputs(init=_ref(out / "base", "base"),
                                data={"train": _ref(out / "data", "data")}), out / name, _say(100))
            secs[name] = time.perf_counter() - t
    if fresh("pairs"):
        rows = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
        rows = random.Random(1).sample(rows, a.pairs)
        by_prompt: dict[str, list[str]] = {}
        for row, text, ended in _samples(out / "sft", rows, 4, seed=1):
            if ended and text.strip() and not verify(row["domain"], text, row["answer"]):
                by_prompt.setdefault(row["prompt"], []).append(text)
        pairs = [{"prompt": r["prompt"], "chosen": r["answer"], "domain": r["domain"],
                  "rejected": wrong}
                 for r in rows
                 for wrong in sorted(set(by_prompt.get(r["prompt"], [])))[:a.negatives]
                 + [reward_model.wrong_answer(r["domain"], r["prompt"], r["answer"])]]
        random.Random(2).shuffle(pairs)
        own = len(pairs) - len(rows)
        (out / "pairs").mkdir(parents=True, exist_ok=True)
        (out / "pairs" / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"pairs: {len(pairs)}, rejected = the SFT model's own wrong samples: {own}, "
              f"a near miss: {len(rows)}")
    if fresh("rm"):
        t = time.perf_counter()
        cfg = reward_model.Config(max_steps=a.rm_steps, eval_n=0)
        judge = out / ("sft_rm" if a.rm_sft_steps else "sft")
        reward_model.run(cfg, Inputs(init=_ref(judge, "sft"),
                                     data={"train": _ref(out / "pairs", "data")}),
                         out / "rm", _say(100))
        secs["rm"] = time.perf_counter() - t
    return secs


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a correct sample outscores a wrong one), ties half (Mann-Whitney).

    >>> auc([2.0, 3.0], [1.0, 2.0])
    0.875
    """
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def rm_quality(a: argparse.Namespace) -> dict:
    """Held-out pairwise accuracy, and AUC of correct over wrong SFT samples of held-out prompts."""
    from tasks import reward_model
    from tasks.domains import verify
    from tasks.evaluate import heldout_rows
    from tasks.rm_scoring import load_reward_model, rm_texts, score

    out = Path(a.out)
    rm, tok = load_reward_model(out / "rm")
    res = {"pairwise": reward_model.pairwise_accuracy(rm, tok, a.domains, a.eval_n)}
    rows = [r for d in a.domains for r in heldout_rows(d, 200)]
    got = _samples(out / "sft", rows, 2, seed=2)
    scores = score(rm, tok, rm_texts([r["prompt"] for r, _, _ in got], [t for _, t, _ in got],
                                     tok.eos_token, [e for _, _, e in got]))
    ok = [verify(r["domain"], t, r["answer"]) for r, t, _ in got]
    res["auc_sft_samples"] = auc([s for s, c in zip(scores, ok, strict=True) if c],
                                 [s for s, c in zip(scores, ok, strict=True) if not c])
    res["sft_sample_accuracy"] = sum(ok) / len(ok)
    return res


def compare(a: argparse.Namespace, names: list[str]) -> dict:
    """Greedy held-out accuracy and RM score per domain, for each model directory in `names`,
    and `sampled`: the verified fraction of 4 temperature-1 samples (seeded, max_new_tokens 8,
    as in training) per held-out problem, the distribution PPO itself optimises."""
    from tasks import models
    from tasks.domains import verify
    from tasks.evaluate import evaluate, generate, heldout_rows
    from tasks.rm_scoring import heldout_rm

    out, res = Path(a.out), {}
    rms = {"rm": _ref(out / "rm", "reward_model")}
    for name in names:
        tok, model = models.load_tokenizer(out / name), models.load_model(out / name)
        acc = evaluate(model, tok, a.domains, a.eval_n)
        rm = {d: heldout_rm(model, tok, [d], a.eval_n, rms)["rm"] for d in a.domains}
        sampled = {}
        for d in a.domains:
            rows = [r for r in heldout_rows(d, a.eval_n) for _ in range(4)]
            got = generate(model, tok, [r["prompt"] for r in rows], 8, do_sample=True, seed=5)
            sampled[d] = sum(verify(d, t, r["answer"]) for r, t in zip(rows, got, strict=True)
                             ) / len(rows)
        res[name] = {"accuracy": acc, "rm": rm, "sampled": sampled}
    return res


def table(a: argparse.Namespace, res: dict, names: list[str]) -> None:
    """Per-domain rows of `compare`'s result: accuracy (greedy), sampled accuracy, RM score."""
    print(f"{'':<30}" + "".join(f"{d:>10}" for d in a.domains) + f"{'mean':>10}")
    for what in ("accuracy", "sampled", "rm"):
        for name in names:
            vals = [res[name][what][d] for d in a.domains]
            print(f"{what + ' ' + ('init' if name == 'sft' else name):<30}"
                  + "".join(f"{v:>10.3f}" for v in vals) + f"{sum(vals) / len(vals):>10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/ppo_bench")
    p.add_argument("--domains", default="reverse,max", help="comma-separated")
    p.add_argument("--data-size", type=int, default=20_000)
    p.add_argument("--sft-steps", type=int, default=150, help="SFT steps of the policy's init")
    p.add_argument("--rm-sft-steps", type=int, default=400, help="SFT steps of the RM's own "
                   "init (a longer-trained judge of the same tokenizer; 0: the policy's init)")
    p.add_argument("--pairs", type=int, default=4000, help="preference pairs for the RM")
    p.add_argument("--negatives", type=int, default=4, help="distinct wrong samples of the "
                   "policy's init per prompt kept as rejected (each prompt also gets a near miss)")
    p.add_argument("--rm-steps", type=int, default=600)
    p.add_argument("--ppo-steps", type=int, default=100)
    p.add_argument("--ppo", default="{}", help="JSON of extra ppo (or grpo) Config fields")
    p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo", help="grpo: tasks.grpo "
                   "(TRL GRPOTrainer, G=8, 16 prompts x 8 per step, lr 2e-4) against the same RM, "
                   "--ppo-steps steps, instead of tasks.ppo")
    p.add_argument("--name", default="ppo", help="directory (under --out) of this PPO run")
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare", default="", help="only evaluate these existing run directories "
                   "(comma-separated, under --out) beside sft/; no training")
    p.add_argument("--fresh", default="", help="stages to rebuild: data,sft,sft_rm,pairs,rm (ppo "
                   "always runs)")
    a = p.parse_args()
    a.domains = a.domains.split(",")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from artifacts.refs import Inputs
    from tasks import grpo, models, ppo

    torch.set_num_threads(a.threads)
    models.quiet()
    out = Path(a.out)
    if a.compare:
        names = ["sft", *a.compare.split(",")]
        res = compare(a, names)
        table(a, res, names)
        (out / "results_compare.json").write_text(json.dumps(res, indent=1))
        return
    secs = build(a)
    quality = rm_quality(a)
    print("rm:", json.dumps(quality))
    if a.algo == "ppo":
        cfg = ppo.Config(**{"max_steps": a.ppo_steps, "verifier_weight": 0.0, "eval_n": 0,
                            "value_init": "reward_model", "domains": a.domains,
                            **json.loads(a.ppo)})
    else:
        cfg = grpo.Config(**{"max_steps": a.ppo_steps, "num_generations": 8,
                             "per_device_train_batch_size": 128, "learning_rate": 2e-4,
                             "max_completion_length": 8, "verifier_weight": 0.0, "eval_n": 0,
                             "domains": a.domains, **json.loads(a.ppo)})
    t = time.perf_counter()
    shutil.rmtree(out / a.name, ignore_errors=True)
    metrics = (ppo if a.algo == "ppo" else grpo).run(
        cfg, Inputs(init=_ref(out / "sft", "sft"), data={"train": _ref(out / "data", "data")},
                    reward_model={"rm": _ref(out / "rm", "reward_model")}),
        out / a.name, _say(10))
    secs[a.algo] = time.perf_counter() - t
    res = compare(a, ["sft", a.name])
    print(f"\n{a.algo} config: {cfg.model_dump_json()}")
    table(a, res, ["sft", a.name])
    train = metrics["train"]
    print(f"sampled (first vs last tenth of {a.algo} steps): " + " ".join(
        f"{k}={train[k]:.3f}" for k in sorted(train) if k.endswith(("/first", "/last"))))
    if a.algo == "grpo":  # first step and mean of the last 10 (tasks.grpo's train metrics)
        print("sampled (first step vs last 10 steps): " + " ".join(
            f"{k}={v:.3f}" for k, v in sorted(train.items()) if k.startswith(("first", "final"))))
    print("seconds:", {k: round(v) for k, v in secs.items()})
    (out / f"results_{a.name}.json").write_text(json.dumps(
        {"compare": res, "rm_quality": quality, "train": train, "seconds": secs,
         "history": metrics["history"],
         "config": cfg.model_dump()}, indent=1))


if __name__ == "__main__":
    main()
