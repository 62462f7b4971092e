"""What resumable snapshots (`resume_every`, tasks/resume.py) add to a training stage's wall time.

Runs the demo's `sft` stage (recipes/mimo_tiny.yaml: its base model size, batch 64, lr schedule,
2 torch threads) on demo data through `tasks.sft.run`, for `--steps` steps (fewer than the
demo's 1200: the ratio depends on snapshots per step, which `--every` keeps at the demo's),
alternately with resume off and on, `--repeats` times each, and prints the fastest wall times
and their ratio, and the time spent writing snapshots, measured apart (on cores shared with
other jobs the ratio is noisy, that time is not). With `--mopd`, the same for the demo's `mopd`
stage (our own loop's `state.pt`; teachers are copies of the student, which costs what real
teachers cost). Also
checks that both runs publish the same weights. Everything lives in one temporary directory,
deleted at the end.

Run: ``.venv/bin/python bench/resume_cost.py [--steps 200] [--every 50] [--repeats 2] [--mopd]``
(about 5 minutes on 2 cores for the default sft run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from artifacts.refs import ArtifactRef, Inputs  # noqa: E402
from tasks import resume as resume_mod  # noqa: E402

DOMAINS = ["arith", "reverse", "sort", "max"]
BASE = {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 256}
SFT = {"learning_rate": 2.0e-3, "per_device_train_batch_size": 64, "warmup_steps": 50,
       "lr_scheduler_type": "polynomial",
       "trainer": {"lr_scheduler_kwargs": {"lr_end": 5.0e-4, "power": 1.0}}, "eval_n": 0}
MOPD = {"estimator": "full_vocab", "prompts_per_route": 16, "learning_rate": 1.0e-4,
        "warmup_steps": 20, "orm_weight": 0.5, "eval_n": 0}


def _ref(path: Path, kind: str) -> ArtifactRef:
    return ArtifactRef(key="0" * 64, path=path, kind=kind, stage=kind, recipe="bench")


SAVING = [0.0]  # seconds spent writing snapshots, summed over the current run


def _count_saves() -> None:
    """Time every snapshot write (the HF Trainer's checkpoint, our loops' state.pt): on 2 cores
    shared with other jobs the wall-time ratio is noisy, the time spent saving is not."""
    from transformers import Trainer

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                SAVING[0] += time.perf_counter() - start
        return wrapper

    Trainer._save_checkpoint = timed(Trainer._save_checkpoint)
    resume_mod.save = timed(resume_mod.save)


def _timed(module: Any, config: Any, inputs: Inputs, out: Path, resume: Path | None,
           every: int) -> float:
    """One `run` of the kind, resume on (a fresh resume dir) or off; its wall seconds."""
    import shutil

    names = (resume_mod.ENV_DIR, resume_mod.ENV_EVERY)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)
        os.environ.update({names[0]: str(resume), names[1]: str(every)})
    try:
        start = time.perf_counter()
        module.run(config, inputs, out)
        return time.perf_counter() - start
    finally:
        for n in names:
            os.environ.pop(n, None)


def _bench(name: str, module: Any, config: Any, inputs: Inputs, tmp: Path, every: int,
           repeats: int) -> None:
    from safetensors.torch import load_file

    _timed(module, config, inputs, tmp / f"{name}-warm", None, every)  # caches, first-run costs
    off, on, saving = [], [], []
    for i in range(repeats):  # alternate, so a load change on shared cores hits both
        off.append(_timed(module, config, inputs, tmp / f"{name}-off{i}", None, every))
        SAVING[0] = 0.0
        on.append(_timed(module, config, inputs, tmp / f"{name}-on{i}", tmp / f"{name}-res", every))
        saving.append(SAVING[0])
    a = load_file(str(tmp / f"{name}-off0" / "model.safetensors"))
    b = load_file(str(tmp / f"{name}-on0" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    t_off, t_on = min(off), min(on)  # the least disturbed run of each: shared cores add noise
    snaps = (config.max_steps - 1) // every
    print(f"{name}: {config.max_steps} steps, resume_every {every} ({snaps} snapshots): "
          f"off {t_off:.1f} s {[round(x, 1) for x in off]}, on {t_on:.1f} s "
          f"{[round(x, 1) for x in on]}, ratio {t_on / t_off:.3f}; snapshot writes "
          f"{statistics.median(saving):.2f} s = {statistics.median(saving) / t_off:.1%} of the "
          f"stage off; max |W_on - W_off| = {diff}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mopd", action="store_true", help="also time the demo's mopd stage")
    ap.add_argument("--mopd-steps", type=int, default=40)
    ap.add_argument("--mopd-every", type=int, default=10)
    args = ap.parse_args()

    import torch

    from tasks import base, data, mopd, sft

    torch.set_num_threads(2)  # the demo's sft and mopd hold 2 cpus
    _count_saves()
    with tempfile.TemporaryDirectory(prefix="resume-cost-") as d:
        tmp = Path(d)
        base.run(base.Config(**BASE, domains=DOMAINS, eval_n=0), Inputs(), tmp / "base")
        data.run(data.Config(domains=DOMAINS, mix={"arith": 6, "reverse": 1, "sort": 1,
                                                   "max": 1}, size=20000, seed=0),
                 Inputs(), tmp / "data")
        ins = Inputs(init=_ref(tmp / "base", "base"), data={"train": _ref(tmp / "data", "data")})
        _bench("sft", sft, sft.Config(**SFT, max_steps=args.steps), ins, tmp, args.every,
               args.repeats)
        if args.mopd:
            student = tmp / "sft-off0"
            ins = Inputs(init=_ref(student, "sft"), data={"train": _ref(tmp / "data", "data")},
                         teachers={dom: _ref(student, "grpo") for dom in DOMAINS})
            _bench("mopd", mopd, mopd.Config(**MOPD, max_steps=args.mopd_steps), ins, tmp,
                   args.mopd_every, args.repeats)


if __name__ == "__main__":
    main()
