"""Entry point for Prefect deployments (infra/prefect.yaml): runs `posttrain run` for a recipe.

Wiring only: a worker pulls the repo, installs it and calls this flow, which is the CLI's run.

Run: ``prefect deploy --prefect-file infra/prefect.yaml --name mimo-tiny-process``
"""

from __future__ import annotations

from prefect import flow


@flow(name="posttrain-recipe")
def posttrain_recipe(recipe: str, store: str = ".posttrain/store", max_parallel: int = 2,
                     tracking_uri: str | None = None, runner: str = "threads") -> int:
    from flows.cli import main

    args = ["run", recipe, "--store", store, "--max-parallel", str(max_parallel),
            "--runner", runner]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    rc = main(args)
    if rc != 0:
        raise RuntimeError(f"posttrain run {recipe} exited {rc}")
    return rc
