"""Sampling throughput of the `generate` kind against Hugging Face ``model.generate``, side by
side, on the same model, prompts and batches.

Same for both: the model (the demo-sized tiny Llama, randomly initialised, or ``--model DIR``,
e.g. an SFT checkpoint), the prompts (``--prompts`` training prompts of ``--domains``, seeded),
K = ``--k`` samples of each, ``--max-new-tokens``, temperature 1 with no top-k / top-p, fp32,
torch threads = ``--threads``, and the very same batches: prompts sorted by length, each
repeated K times, ``--batch`` sequences per call, left-padded by the same tokenizer call.
`ours` is `tasks.rollout.sample_texts` (what `generate` runs: one KV-cached
`rollout.sample_many` per batch, which prefills each prompt once and repeats its cache K times,
and drops a row from the batch once it has emitted eos; decoded to text); `hf` is
``model.generate(do_sample=True, ...)`` on each batch (K copies of each prompt), decoded the
same way; it stops a batch when every sequence has emitted eos.

samples/s = samples / wall seconds of one pass over all prompts (tokenizing, sampling and
decoding; verification and selection are not timed, they are the same for any sampler). The
machine is shared: runs alternate and each side keeps its median. A randomly initialised model
rarely emits eos, so every sample runs to ``--max-new-tokens``; a trained model stops early
(pass ``--model``) and both loops then stop early too.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python bench/generate_speed.py [--prompts 256 --k 8
--batch 512 --max-new-tokens 8 --threads 2 --repeats 3 --model DIR]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _setup(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    from tasks import domains, models

    if args.model:
        tok, model = models.load_tokenizer(args.model), models.load_model(args.model)
    else:
        tok = models.build_tokenizer()
        model = models.build_tiny_model(tok, 128, 4, 4, 256, seed=args.seed)
    model.eval()
    names = args.domains.split(",")
    per = -(-args.prompts // len(names))
    prompts = [r["prompt"] for d in names for r in domains.generate(d, per, args.seed)]
    return model, tok, prompts[: args.prompts]


def ours(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace) -> dict:
    import torch

    from tasks.rollout import sample_texts

    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    texts, _, tokens = sample_texts(model, tok, prompts, args.k, args.max_new_tokens, 1.0, gen,
                                    args.batch)
    seconds = time.perf_counter() - start
    return {"samples": sum(map(len, texts)), "tokens": tokens, "seconds": seconds}


def hf(model: Any, tok: Any, prompts: list[str], args: argparse.Namespace) -> dict:
    """The same batches as `sample_texts` builds them, through ``model.generate``."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    seqs = [prompts[i] for i in order for _ in range(args.k)]
    side, tok.padding_side = tok.padding_side, "left"
    samples = tokens = 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for s in range(0, len(seqs), args.batch):
                enc = tok(seqs[s : s + args.batch], return_tensors="pt", padding=True)
                out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                     max_new_tokens=args.max_new_tokens, use_cache=True,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                new = out[:, enc["input_ids"].shape[1] :]
                texts = tok.batch_decode(new, skip_special_tokens=True)
                samples += len(texts)
                # generated tokens through the first eos (what `ours` counts)
                hit = (new == tok.eos_token_id).int()
                first = torch.where(hit.any(1), hit.argmax(1) + 1, new.shape[1])
                tokens += int(first.sum())
    finally:
        tok.padding_side = side
    return {"samples": samples, "tokens": tokens, "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model dir (default: demo-sized tiny Llama, random init)")
    p.add_argument("--domains", default="arith,reverse,sort,max,count,sub,min,median,digsum,"
                   "odd,vowels,dedup,palin")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--batch", type=int, default=512, help="sequences per sampling call")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model, tok, prompts = _setup(args)
    runs = {"hf model.generate": hf, "ours (generate kind)": ours}
    for fn in runs.values():  # warm-up, not timed
        fn(model, tok, prompts[: max(1, args.batch // args.k)], args)
    results: dict[str, list[dict]] = {n: [] for n in runs}
    for rep in range(args.repeats):
        for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
            results[name].append(runs[name](model, tok, prompts, args))
    rate = {n: statistics.median(r["samples"] / r["seconds"] for r in rs)
            for n, rs in results.items()}
    base = rate["hf model.generate"]
    print(f"{len(prompts)} prompts x K={args.k}, batch {args.batch}, max_new_tokens "
          f"{args.max_new_tokens}, {args.threads} thread(s), median of {args.repeats}; model "
          f"{args.model or 'demo-sized tiny Llama (random init)'}")
    print(f"{'sampler':24s} {'samples':>8s} {'tokens':>8s} {'samples/s (each run)':>28s} "
          f"{'median':>8s} {'vs hf':>6s}")
    for name, rs in results.items():
        each = " ".join(f"{r['samples'] / r['seconds']:.0f}" for r in rs)
        print(f"{name:24s} {rs[0]['samples']:8d} {rs[0]['tokens']:8d} {each:>28s} "
              f"{rate[name]:8.0f} {rate[name] / base:5.2f}x")


if __name__ == "__main__":
    main()
