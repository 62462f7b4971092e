"""The files in infra/ are checked against what reads them, without a cluster: the Kubernetes
stage Job and the Kubernetes deployment's job variables against the Kubernetes API models (the
`kubernetes` client's classes: a field they do not know is a field Kubernetes would drop), and
infra/prefect.yaml's deployments against the flow they name (entry point, parameters).

Run: ``.venv/bin/python -m pytest tests/test_infra.py -q``
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

kubernetes = pytest.importorskip("kubernetes")
INFRA = REPO / "infra"


def _k8s(data: dict[str, Any], kind: str) -> Any:
    """`data` as the Kubernetes model `kind`, refused if any field is unknown or mistyped:
    the model serialised back must equal the input."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    obj = api._ApiClient__deserialize(data, kind)  # the client's own (de)serialiser
    back = api.sanitize_for_serialization(obj)

    def strip(x: Any) -> Any:  # YAML ints vs the model's strings for quantities
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return str(x)

    assert strip(back) == strip(data), f"fields {kind} does not know, or mistyped"
    return obj


def _filled(text: str) -> str:
    """The template with its ${VARS} filled with sample values (as envsubst would)."""
    sample = {"GPUS": "1", "STAGE": "sft", "RECIPE": "recipes/mimo_tiny.yaml"}
    return re.sub(r"\$\{(\w+)\}", lambda m: sample.get(m[1], m[1].lower()), text)


def test_the_stage_job_is_a_valid_kubernetes_job() -> None:
    data = yaml.safe_load(_filled((INFRA / "k8s" / "stage-job.yaml").read_text()))
    job = _k8s(data, "V1Job")
    container = job.spec.template.spec.containers[0]
    assert job.kind == "Job" and job.spec.template.spec.restart_policy == "Never"
    assert container.command[:2] == ["posttrain", "stage"]  # the flow's and DVC's entry point
    assert {e.name for e in container.env} >= {"HF_HUB_OFFLINE"}


def test_a_misspelt_field_is_caught() -> None:
    data = yaml.safe_load(_filled((INFRA / "k8s" / "stage-job.yaml").read_text()))
    data["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="does not know"):
        _k8s(data, "V1Job")


def _deployments() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def test_the_kubernetes_deployments_job_variables_are_valid_kubernetes() -> None:
    jv = _deployments()["mimo-kubernetes"]["work_pool"]["job_variables"]
    # Prefect's Kubernetes worker puts `image` and `env` (a map) on the flow run's container.
    env = [{"name": k, "value": str(v)} for k, v in jv["env"].items()]
    _k8s({"name": "prefect-job", "image": "registry.example/posttrain:1", "env": env},
         "V1Container")
    assert set(jv) <= {"image", "env", "namespace", "service_account_name", "image_pull_policy",
                       "finished_job_ttl", "job_watch_timeout_seconds", "stream_output",
                       "cluster_config", "labels", "name", "command"}


@pytest.mark.parametrize("name", sorted(_deployments()))
def test_each_deployment_names_the_flow_and_its_parameters(name: str) -> None:
    from flows.deploy import posttrain_recipe

    dep = _deployments()[name]
    path, func = dep["entrypoint"].split(":")
    assert (REPO / path).exists() and func == posttrain_recipe.fn.__name__
    params = inspect.signature(posttrain_recipe.fn).parameters
    assert set(dep["parameters"]) <= set(params), set(dep["parameters"]) - set(params)
    posttrain_recipe.validate_parameters(dep["parameters"])  # types, as Prefect checks them
    assert Path(REPO / dep["parameters"]["recipe"]).exists()
