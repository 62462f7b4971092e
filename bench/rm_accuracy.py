"""Held-out pairwise accuracy of a reward model trained on `generate` pairs of the SFT model.

The issue's acceptance point for `reward_model`: the RM trained on `generate` pairs from the SFT
model reaches held-out pairwise accuracy >= 0.85, held-out pairs being built the same way on the
held-out problems (500 per domain, `tasks.evaluate.heldout_rows`, disjoint from every train
split). Everything at fixed step counts, calling the stage modules directly (no Prefect, no
store), every stage under --out and reused when its directory exists (--fresh rebuilds):

1. sft/       the policy ("the SFT model"): --policy DIR is copied in; without it, the demo
              recipe builds it (tasks.base default tiny Llama, tasks.sft 1200 steps at lr 2e-3
              on sft_data/ = tasks.data(--domains, mix arith 6 : others 1, 50000 rows, seed 0))
2. sft_rm/    the RM's init: sft/ trained --rm-sft-steps more steps on the ground-truth rows of
              sft_data/ (tasks.sft, lr --rm-sft-lr): the same architecture and tokenizer, a judge
              that knows the tasks better than the policy it judges (0: the RM starts from sft/)
3. data/      prompt rows, tasks.data(--domains, --data-size rows, seed 1, train split)
   pairs/     tasks.generate mode pairs from sft/: K=--k samples per prompt at temperature 1,
              ranked by the verifier, so chosen is a verified sample and rejected a wrong one;
              prompts whose K samples all agree give no pair
4. heldout/   the held-out problems as prompt rows; heldout_pairs/: tasks.generate on them with
              the same config (another sampling seed)
5. rm/        tasks.reward_model from sft_rm/ on pairs/ (TRL RewardTrainer, --rm-steps 2000 at
              --rm-lr 3e-4, below the kind's default 1e-3: at 1e-3 the Bradley-Terry gradient
              overwrites the judge's trunk before the head learns to read it; the arithmetic of
              an init that solves every held-out sum ranked .54 of arith pairs right at 1e-3,
              .99 at 3e-4)

Prints per domain: held-out pairs, pairwise accuracy on them (chosen scores strictly higher),
the kind's own near-miss pairwise accuracy (`metrics.eval`), and the RM's AUC of correct over
wrong samples of the held-out prompts (every sample, not just the pair ends). The same --out is
the input of ``bench/ppo_vs_init.py --out DIR`` (it reuses sft/, data/, rm/).

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/rm_accuracy.py --out /tmp/rm_bench [--help]``.
"""

from __future__ import annotations

import argparse
import json
import os
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
            print(f"  {step}/{total} " + " ".join(f"{k}={v:.3g}" for k, v in m.items()), flush=True)
    return progress


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "train.jsonl").read_text().splitlines() if x.strip()]


def build(a: argparse.Namespace) -> dict:
    """Every stage not on disk yet; returns {stage: seconds, or generate metrics}."""
    from artifacts.refs import Inputs
    from tasks import base, data, generate, reward_model, sft
    from tasks.evaluate import heldout_rows

    out, log = Path(a.out), {}
    domains = a.domains

    def todo(name: str, marker: str = "config.json") -> bool:
        if name in a.fresh:
            shutil.rmtree(out / name, ignore_errors=True)
        return not (out / name / marker).exists()

    def timed(name: str, fn) -> None:  # noqa: ANN001
        t = time.perf_counter()
        got = fn()
        log[name] = {"seconds": round(time.perf_counter() - t, 1)}
        if isinstance(got, dict) and "generate" in got:
            log[name]["generate"] = got["generate"]
        if isinstance(got, dict) and "eval" in got:
            log[name]["eval"] = got["eval"]
        if isinstance(got, dict):  # the stage's own metrics (history, ...) beside its output
            (out / name / "bench_metrics.json").write_text(json.dumps(
                {**log[name], **got}, indent=1, default=str))

    need_sft_data = todo("sft") and not a.policy or a.rm_sft_steps and not a.rm_init and todo(
        "sft_rm")
    if need_sft_data and todo("sft_data", "train.jsonl"):
        mix = {d: 6.0 if d == "arith" else 1.0 for d in domains}
        data.run(data.Config(domains=domains, mix=mix, size=50_000, seed=0), Inputs(),
                 out / "sft_data")
    if todo("sft"):
        if a.policy:
            shutil.copytree(a.policy, out / "sft")
        else:
            base.run(base.Config(eval_n=0), Inputs(), out / "base")
            cfg = sft.Config(max_steps=1200, learning_rate=2e-3, warmup_steps=50, eval_n=0,
                             lr_scheduler_type="polynomial",
                             trainer={"lr_scheduler_kwargs": {"lr_end": 5e-4, "power": 1.0}})
            timed("sft", lambda: sft.run(cfg, Inputs(init=_ref(out / "base", "base"), data={
                "train": _ref(out / "sft_data", "data")}), out / "sft", _say(200)))
    if a.rm_sft_steps and not a.rm_init and todo("sft_rm"):
        cfg = sft.Config(max_steps=a.rm_sft_steps, learning_rate=a.rm_sft_lr, warmup_steps=20,
                         lr_scheduler_type="linear", eval_n=a.eval_n)
        timed("sft_rm", lambda: sft.run(cfg, Inputs(init=_ref(out / "sft", "sft"), data={
            "train": _ref(out / "sft_data", "data")}), out / "sft_rm", _say(200)))
    if todo("data", "train.jsonl"):
        data.run(data.Config(domains=domains, size=a.data_size, seed=1), Inputs(), out / "data")
    if todo("heldout", "train.jsonl"):
        (out / "heldout").mkdir(parents=True, exist_ok=True)
        rows = [r for d in domains for r in heldout_rows(d, a.eval_n)]
        (out / "heldout" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, src, prompts, seed in (("pairs", "data", a.pairs_prompts, 1),
                                     ("heldout_pairs", "heldout", 10 ** 9, 2)):
        if todo(name, "train.jsonl"):
            cfg = generate.Config(mode="pairs", num_samples=a.k, prompts=prompts, seed=seed,
                                  rank_by="verifier", temperature=1.0)
            timed(name, lambda cfg=cfg, src=src, name=name: generate.run(
                cfg, Inputs(init=_ref(out / "sft", "sft"), data={
                    "train": _ref(out / src, "data")}), out / name))
    if todo("rm"):
        cfg = reward_model.Config(max_steps=a.rm_steps, learning_rate=a.rm_lr,
                                  per_device_train_batch_size=a.rm_batch, eval_n=a.eval_n,
                                  eval_domains=domains, seed=a.rm_seed)
        init = Path(a.rm_init) if a.rm_init else out / ("sft_rm" if a.rm_sft_steps else "sft")
        timed("rm", lambda: reward_model.run(cfg, Inputs(init=_ref(init, "sft"), data={
            "train": _ref(out / "pairs", "data")}), out / "rm", _say(200)))
    return log


def measure(a: argparse.Namespace) -> dict:
    """Per domain: held-out generate-pair accuracy, near-miss accuracy, AUC over samples."""
    from tasks import reward_model
    from tasks.rm_scoring import load_reward_model, rm_texts, score

    out = Path(a.out)
    rm, tok = load_reward_model(out / "rm")
    eos, res = tok.eos_token, {}
    pairs = _rows(out / "heldout_pairs")
    near = reward_model.pairwise_accuracy(rm, tok, a.domains, a.eval_n)
    for d in a.domains:
        ps = [p for p in pairs if p["domain"] == d]
        assert all(p["chosen_verified"] and not p["rejected_verified"] for p in ps)
        prompts = [p["prompt"] for p in ps]
        good = score(rm, tok, rm_texts(prompts, [p["chosen"] for p in ps], eos))
        bad = score(rm, tok, rm_texts(prompts, [p["rejected"] for p in ps], eos))
        wins = sum(g > b for g, b in zip(good, bad, strict=True))
        res[d] = {"heldout_pairs": len(ps), "pairwise": wins / max(len(ps), 1),
                  "near_miss": near[d]}
    total = sum(r["heldout_pairs"] for r in res.values())
    res["all"] = {"heldout_pairs": total,
                  "pairwise": sum(r["pairwise"] * r["heldout_pairs"] for r in res.values())
                  / max(total, 1),
                  "near_miss": sum(near.values()) / len(near)}
    res["mean_of_domains"] = {"pairwise": sum(res[d]["pairwise"] for d in a.domains)
                              / len(a.domains)}
    if a.subset:  # pooled over a stated subset of the domains (the RM is the same)
        n = sum(res[d]["heldout_pairs"] for d in a.subset)
        res["subset"] = {"domains": a.subset, "heldout_pairs": n, "pairwise": sum(
            res[d]["pairwise"] * res[d]["heldout_pairs"] for d in a.subset) / max(n, 1)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/rm_bench")
    p.add_argument("--domains", default="arith,reverse,sort,max", help="comma-separated")
    p.add_argument("--policy", default="", help="an SFT model dir to copy to sft/ (default: "
                   "build the demo SFT model, ~1200 steps)")
    p.add_argument("--rm-sft-steps", type=int, default=1000, help="extra SFT steps of the RM's "
                   "init on ground truth (0: the RM starts from the policy)")
    p.add_argument("--rm-sft-lr", type=float, default=1e-3)
    p.add_argument("--rm-init", default="", help="a model dir the RM starts from instead of "
                   "sft_rm/ (same tokenizer; e.g. another SFT run of the same recipe)")
    p.add_argument("--data-size", type=int, default=20_000, help="prompt rows in data/")
    p.add_argument("--pairs-prompts", type=int, default=20_000, help="prompts sampled for pairs")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--rm-steps", type=int, default=2000)
    p.add_argument("--rm-lr", type=float, default=3e-4)
    p.add_argument("--rm-batch", type=int, default=32)
    p.add_argument("--rm-seed", type=int, default=0, help="the RM's head init and data order")
    p.add_argument("--eval-n", type=int, default=500)
    p.add_argument("--subset", default="", help="also print the pooled accuracy over these "
                   "domains (comma-separated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", default="", help="stages to rebuild (comma-separated)")
    a = p.parse_args()
    a.domains, a.fresh = a.domains.split(","), set(filter(None, a.fresh.split(",")))
    a.subset = [d for d in a.subset.split(",") if d]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tasks import models

    torch.set_num_threads(a.threads)
    models.quiet()
    start = time.perf_counter()
    log = build(a)
    res = measure(a)
    gen = {k: log[k]["generate"] for k in ("pairs", "heldout_pairs") if k in log}
    for name, g in gen.items():
        print(f"{name}: " + "; ".join(f"{d} rows {r['rows']} sample acc {r['accuracy']:.3f}"
                                      for d, r in g.items()))
    for name in ("sft_rm", "rm"):
        if "eval" in log.get(name, {}):
            print(f"{name} eval: {json.dumps(log[name]['eval'])}")
    print(f"\n{'domain':<16}{'heldout pairs':>14}{'pairwise':>10}{'near miss':>11}")
    for d in [*a.domains, "all"]:
        r = res[d]
        print(f"{d:<16}{r['heldout_pairs']:>14}{r['pairwise']:>10.3f}{r['near_miss']:>11.3f}")
    print(f"{'mean of domains':<16}{'':>14}{res['mean_of_domains']['pairwise']:>10.3f}")
    if a.subset:
        r = res["subset"]
        print(f"{'+'.join(a.subset):<16}{r['heldout_pairs']:>14}{r['pairwise']:>10.3f}")
    wall = time.perf_counter() - start
    print("seconds:", {k: v["seconds"] for k, v in log.items()}, f"total {wall:.0f}")
    (Path(a.out) / "results_rm.json").write_text(json.dumps(
        {"result": res, "stages": log, "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                 for k, v in vars(a).items()}}, indent=1))


if __name__ == "__main__":
    main()
