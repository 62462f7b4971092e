"""Stage kind `generate`: sample K completions per prompt, score them, keep a data set.

One model samples (``from:``), or several, routed by a column of the prompts (``generators:
{route: stage}`` on ``route_key``, MAI-Thinking's specialists; exactly one of the two). Each
sample is scored by its domain's verifier (tasks/domains.py) and, with ``reward_model: {name:
stage}``, by reward models (``AutoModelForSequenceClassification``, logit 0 on the text the
`reward_model` kind trains on, tasks/rm_scoring.py; several are summed with ``rm_weights``).
The ranking score is ``rank_by``: ``auto`` (the reward models when given, else the verifier),
``verifier`` (ties broken by the reward models), or ``reward_model``. Then ``mode``:

- ``best``: the top sample of each prompt (rejection sampling, Llama 2 / 3). Ranked with the
  verifier, a prompt none of whose samples is verified gives no row; ranked by reward models
  alone, every prompt gives its best. Rows ``prompt, completion, answer, domain``: SFT data.
- ``correct``: every verified sample (trace distillation, DeepSeek R1's rejection-sampling
  SFT); repeats of one completion for a prompt are kept once unless ``unique: false``.
- ``pairs``: top vs bottom sample of each prompt (``prompt, chosen, rejected, domain``: DPO and
  reward-model data); a prompt whose K samples all score the same gives no pair.

Every row keeps the prompt row's other columns and records ``generator`` (route, or the
``from:`` stage) and ``sample`` (index among the K; for pairs also ``rejected_sample``), its
verifier outcome and, with reward models, ``rm_score`` and ``rm_scores``. The `columns` hook
tells plan what each mode writes, so ``sft`` refuses pairs and ``dpo`` refuses ``best`` rows.

Metrics: ``generate.<domain>``: ``prompts``, ``samples``, ``rows``, ``accuracy`` (verified
samples / samples), ``best_accuracy`` (prompts whose top-ranked sample is verified),
``pass_at_k``, ``acceptance`` (prompts that gave a row / prompts), ``mean_score`` (of the
ranking's reward models, else the verifier), ``rm/<name>``, and ``safe`` (samples that
tasks.domains.safe accepts) where prompts are flagged; ``sampling``: samples/s and tokens. No
``eval``: a data set is not a model.

Before any sampling (tasks/generate_inputs.py): every prompt row needs a known ``domain`` and
an ``answer`` (plan checks the columns), every route a generator, and every generator and reward
model the same tokenizer and ``vocab_size`` as the first generator (tasks/compat.py's
fingerprint): the rows train one student, and a reward model reads text through its own
vocabulary, so a mismatch would score characters it cannot see. Sampling is batched and
KV-cached (tasks/rollout.py `sample_many`: prompts sorted by length, each prefilled once for its
K samples, finished rows leave the batch); bench/generate_speed.py times it against
``model.generate``.

Run: ``python -m tasks.generate OUT MODEL_DIR DATA_DIR [key=value ...]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifacts.refs import ArtifactRef, Inputs, Progress, StageInputError, no_progress
from tasks.generate_inputs import default_route, preflight
from tasks.generate_select import Judged, Tally, select
from tasks.kind import KindCheckError, Node, Role, columns_of, route_values_of, train_rows

PRODUCES = "dataset"
ROLES = {
    "init": Role("model", required=False, description="The model that samples every prompt "
                 "(or give `generators`)."),
    "generators": Role("model", required=False, many=True, description="route -> model "
                       "sampling the prompts whose `route_key` value is that route."),
    "reward_model": Role("reward_model", required=False, many=True, default_name="rm",
                         description="name -> reward model scoring every sample."),
    "data": train_rows("prompt", "answer", "domain", description="Prompts; each row's domain "
                       "verifier checks its samples against its answer."),
}
Mode = Literal["best", "correct", "pairs"]
_SAMPLE = ("prompt", "completion", "answer", "domain", "generator", "sample", "verified")
_PAIR = ("prompt", "chosen", "rejected", "answer", "domain", "generator", "sample",
         "rejected_sample", "chosen_verified", "rejected_verified")
COLUMNS: dict[str, tuple[str, ...]] = {"best": _SAMPLE, "correct": _SAMPLE, "pairs": _PAIR}


class Config(BaseModel):
    """Sample `num_samples` completions of `prompts` prompts; keep rows by `mode`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = Field("best", description="best (top sample per prompt), correct (every "
                       "verified sample) or pairs (top vs bottom: chosen/rejected rows).")
    num_samples: int = Field(8, ge=1, description="K: completions sampled per prompt.")
    prompts: int = Field(1000, ge=1, description="Distinct prompts drawn (seeded) from the data "
                         "(all of them when it has fewer).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(8, ge=1, description="Longest completion, in tokens.")
    seed: int = Field(0, description="Seed of the prompt draw and of sampling.")
    rank_by: Literal["auto", "verifier", "reward_model"] = Field(
        "auto", description="Ranking of a prompt's samples: auto (reward models when given, "
        "else the verifier), verifier (ties broken by reward models) or reward_model.")
    rm_weights: dict[str, float] | None = Field(
        None, description="Weight of each reward model (by its name in `reward_model`) in the "
        "summed score; None: 1 each.")
    route_key: str = Field("domain", description="Column whose value picks a row's generator.")
    unmapped: str = Field("error", description="A route value without a generator: `error`, or "
                          "`default:<route>` to send it there.")
    unique: bool = Field(True, description="correct mode: keep each distinct completion of a "
                         "prompt once.")
    batch_size: int = Field(512, ge=1, description="Sequences per sampling / scoring forward.")

    @model_validator(mode="after")
    def _valid(self) -> Config:
        if self.mode == "pairs" and self.num_samples < 2:
            raise ValueError("mode pairs needs num_samples >= 2 (a pair is two samples)")
        if self.unmapped != "error" and not self.unmapped.startswith("default:"):
            raise ValueError(f"unmapped is `error` or `default:<route>`, got {self.unmapped!r}")
        return self


# -- plan-time hooks (tasks/kind.py) --------------------------------------------------------


def columns(config: dict[str, Any]) -> set[str]:
    """The columns every row has, by mode (the prompt rows' other columns are kept too)."""
    return set(COLUMNS[config.get("mode", "best")])


def check(node: Node, nodes: dict[str, Node]) -> list[str]:
    """Exactly one of `from:` / `generators:`; routes covered; the ranking has its judges."""
    gens, rms = node.parents("generators"), node.parents("reward_model")
    if ("init" in node.inputs) == bool(gens):
        raise KindCheckError(("generators",) if gens else (), "give exactly one of `from:` (one "
                             "model samples every prompt) or `generators: {route: stage}`")
    cfg = node.config
    if cfg.get("rank_by") == "reward_model" and not rms:
        raise KindCheckError(("rank_by",), "rank_by: reward_model needs `reward_model:` stages")
    extra = sorted(set(cfg.get("rm_weights") or {}) - set(rms))
    if extra:
        raise KindCheckError(("rm_weights",), f"rm_weights names {extra}, not reward models "
                             f"of this stage ({', '.join(sorted(rms)) or 'none'})")
    default = default_route(cfg.get("unmapped", "error"))
    if default is not None and (not gens or default not in gens):
        raise KindCheckError(("unmapped",), f"default route {default!r} is not a generator route")
    data = nodes.get(node.parents("data").get("train", ""))
    key = cfg.get("route_key", "domain")
    cols = columns_of(data) if gens else None
    if data is not None and cols is not None and key not in cols:
        raise KindCheckError(("route_key",), f"the rows of data stage {data.name!r} have no "
                             f"column {key!r} to route on; fix `route_key`")
    values = route_values_of(data, key) if gens else None
    missing = sorted((values or set()) - set(gens))
    if missing and default is None:
        raise KindCheckError(("generators",), f"no generator for route(s) {', '.join(missing)} "
                             f"of {key!r} in its data; add them, or set unmapped: default:<route>")
    return []


# -- the stage ------------------------------------------------------------------------------


def scale(config: dict[str, Any], factor: float) -> dict[str, Any]:
    """Kind hook: `posttrain run --scale FACTOR` shrinks the prompts drawn (8 at least)."""
    from tasks.kind import scaled

    return scaled(config, factor, {"prompts": 8})


def run(config: Config, inputs: Inputs, out_dir: Path, progress: Progress = no_progress) -> dict:
    """Sample, score, select; write ``out_dir/train.jsonl``; return per-domain rates."""
    import torch

    from tasks import models
    from tasks.data import FILENAME, schema

    by_route, samplers = preflight(config, inputs)  # raises before any weight is loaded
    models.quiet()
    rms = _load_rms(inputs)
    k, total, done = config.num_samples, sum(map(len, by_route.values())), 0
    clock = {"samples": 0.0, "tokens": 0.0, "seconds": 0.0}
    out: list[dict] = []
    tallies: dict[str, Tally] = {}
    for index, route in enumerate(sorted(by_route)):
        model = models.load_model(samplers[route].path)
        tok = models.load_tokenizer(samplers[route].path)
        gen = torch.Generator(device=model.device).manual_seed(config.seed * 1000 + index)
        rows = sorted(by_route[route], key=lambda r: len(r["prompt"]))  # less padding per batch
        step = max(1, config.batch_size // k)
        for s in range(0, len(rows), step):
            part = rows[s : s + step]
            out += _part(config, part, route, model, tok, gen, rms, clock, tallies)
            done += len(part)
            progress(done, total, {"samples_per_s": clock["samples"] / max(clock["seconds"],
                                                                           1e-9)})
    if not out:
        raise StageInputError(f"no {config.mode} rows were kept from {total} prompts x {k} "
                              "samples; raise num_samples or temperature, or sample from a "
                              "stronger model")
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / FILENAME).open("w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    per_domain: dict[str, int] = {}
    for r in out:
        per_domain[r["domain"]] = per_domain.get(r["domain"], 0) + 1
    return {"rows": len(out), "domains": per_domain, "schema": schema(out),
            "generate": {d: t.rates() for d, t in sorted(tallies.items())},
            "sampling": {"samples": int(clock["samples"]), "tokens": int(clock["tokens"]),
                         "seconds": clock["seconds"],
                         "samples_per_s": clock["samples"] / max(clock["seconds"], 1e-9),
                         "generators": {r: a.stage for r, a in sorted(samplers.items())}}}


def _part(config: Config, rows: list[dict], route: str, model: Any, tok: Any, gen: Any,
          rms: dict[str, tuple[Any, Any]], clock: dict[str, float],
          tallies: dict[str, Tally]) -> list[dict]:
    """Sample, verify, score and select the rows of one batch of prompts."""
    from tasks import domains as _domains
    from tasks.rollout import sample_texts

    k, weights = config.num_samples, config.rm_weights or {}
    start = time.perf_counter()
    texts, ended, n_tok = sample_texts(model, tok, [r["prompt"] for r in rows], k,
                                       config.max_new_tokens, config.temperature, gen,
                                       config.batch_size)
    clock["seconds"] += time.perf_counter() - start
    clock["samples"] += len(rows) * k
    clock["tokens"] += n_tok
    each = {n: _rm_scores(m, t, rows, texts, ended, config.batch_size)
            for n, (m, t) in rms.items()}
    kept: list[dict] = []
    for i, r in enumerate(rows):
        per = [{n: each[n][i][j] for n in each} for j in range(k)] if rms else None
        j = Judged(texts[i], [_domains.verify(r["domain"], t, r["answer"]) for t in texts[i]],
                   [sum(weights.get(n, 1.0) * v for n, v in p.items()) for p in per]
                   if per else None, per)
        got = select(config.mode, config.rank_by, config.unique, r, route, j)
        tallies.setdefault(r["domain"], Tally()).add(config.rank_by, r["prompt"], j, len(got))
        kept += got
    return kept


def _rm_scores(model: Any, tok: Any, rows: list[dict], texts: list[list[str]],
               ended: list[list[bool]], batch_size: int) -> list[list[float]]:
    """One RM's score of every sample, on the text convention of tasks/rm_scoring.py (what the
    `reward_model` kind trains on); each distinct text is scored once."""
    from tasks.rm_scoring import rm_texts, score

    flat = [rm_texts([r["prompt"]] * len(ts), ts, tok.eos_token, e)
            for r, ts, e in zip(rows, texts, ended, strict=True)]
    distinct = sorted({t for f in flat for t in f}, key=lambda t: (len(t), t))
    scores = dict(zip(distinct, score(model, tok, distinct, batch_size), strict=True))
    return [[scores[t] for t in f] for f in flat]


def _load_rms(inputs: Inputs) -> dict[str, tuple[Any, Any]]:
    from tasks.rm_scoring import load_reward_model

    return {n: load_reward_model(a.path) for n, a in sorted(inputs.reward_model.items())}


def _ref(path: str, kind: str) -> ArtifactRef:
    return ArtifactRef(key=f"local:{path}", path=Path(path), kind=kind, stage=Path(path).name,
                       recipe="cli")


if __name__ == "__main__":
    out_arg, model_dir, data_dir, *rest = sys.argv[1:]
    cfg = Config(**dict(a.split("=", 1) for a in rest))
    ins = Inputs(init=_ref(model_dir, "sft"), data={"train": _ref(data_dir, "data")})
    result = run(cfg, ins, Path(out_arg), lambda s, t, m: print(s, t, m, flush=True))
    print(json.dumps({k: result[k] for k in ("rows", "generate", "sampling")}, indent=1))
