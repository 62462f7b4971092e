"""Entry point of the Prefect deployments (infra/prefect.yaml): one flow run = one recipe run.

A worker (process pool, Kubernetes pool) starts this flow; its body is `posttrain run`'s own
steps, not a call of the CLI: the same argument checks (the CLI's parser), the same plan and
bookkeeping (`flows.cli.open_run` / `close_run`) and, with the threads runner, the stage tasks
wired straight into *this* flow run (`flows.run.wire`), so the deployment's flow run in the
Prefect UI is the recipe's DAG. With `runner: ray` the stages run as the recipe's flow on Ray's
task runner, a subflow of this one (a flow's task runner is fixed when it is declared). A run
whose stages fail ends Failed with the stages' own messages; a user error (a bad recipe, a bad
parameter) ends Failed with the CLI's one-line error.

Run: ``prefect deploy --prefect-file infra/prefect.yaml --name mimo-tiny-process`` then
``prefect deployment run posttrain-recipe/mimo-tiny-process``; tests/test_prefect_worker_slow.py
does both against a real server and worker on loopback.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner


def run_args(recipe: str, store: str, state_dir: str, max_parallel: int,
             tracking_uri: str | None, runner: str, sets: list[str] | None,
             force: list[str] | None) -> list[str]:
    """`posttrain run` arguments for the deployment's parameters (checked by the CLI's parser).

    >>> run_args("r.yaml", "s3://b/s", ".posttrain", 2, None, "threads", ["sft.max_steps=3"],
    ...          None)[:6]
    ['run', 'r.yaml', '--store', 's3://b/s', '--state-dir', '.posttrain']
    """
    argv = ["run", recipe, "--store", store, "--state-dir", state_dir, "--max-parallel",
            str(max_parallel), "--runner", runner, "--json"]
    if tracking_uri:
        argv += ["--tracking-uri", tracking_uri]
    for s in sets or []:
        argv += ["--set", s]
    for f in force or []:
        argv += ["--force", f]
    return argv


@flow(name="posttrain-recipe", task_runner=ThreadPoolTaskRunner(max_workers=64),
      persist_result=False, log_prints=True)
def posttrain_recipe(recipe: str, store: str = ".posttrain/store",
                     state_dir: str = ".posttrain", max_parallel: int = 2,
                     tracking_uri: str | None = None, runner: str = "threads",
                     sets: list[str] | None = None, force: list[str] | None = None) -> Any:
    """Build every stage of `recipe` that is not in `store`; the stages' result rows."""
    from flows import cli
    from flows.run import RUNTIME, execute, wire
    from flows.runners import RUNNERS

    args = cli.build_parser().parse_args(
        run_args(recipe, store, state_dir, max_parallel, tracking_uri, runner, sets, force))
    try:
        session = cli.open_run(args)
        if isinstance(session, int):  # every stage is in the store: nothing ran
            return (f"nothing to build: every stage of {recipe} is in {store}" if session == 0
                    else Failed(message=f"posttrain run {recipe}: exit {session}"))
        run = session["run"]
        if runner == "threads":  # the stages are tasks of this flow run
            cpus = max(os.cpu_count() or 1, session["max_parallel"])
            RUNTIME[run.run_id]["runner"] = RUNNERS["threads"](cpus, session["max_parallel"])
            wire(session["recipe"].name, session["plans"], run)
        else:
            execute(session["recipe"].name, session["plans"], run, session["max_parallel"])
        code = cli.close_run(args, session)
    except cli.USER_ERRORS as e:
        return Failed(message=f"error: {cli.cli_common.error_line(e, store)}")
    rows = [r.row() for r in session["results"]]
    if code:
        failed = [f"stage {r['stage']}: {r.get('error')}" for r in rows
                  if r["status"] == "failed"]
        return Failed(message=f"posttrain run {recipe}: exit {code}; " + "; ".join(failed))
    return rows
