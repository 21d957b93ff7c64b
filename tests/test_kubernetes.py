"""deploy/kubernetes: both overlays render, and every object is valid against
the Kubernetes API schemas (offline: kubernetes-validate ships them), for the
oldest Kubernetes the manifests target and the newest schemas installed.
Then what the schemas cannot say: the Deployment is locked down, its probes,
drain timing, mounts and metrics port agree with the settings it mounts, and
the settings themselves load."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner_gateway import settings as settings_module
from runner_gateway.settings import load_settings, parse_duration
from tests.kustomize_lite import render

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OVERLAYS = ["single", "replicas-redis"]
OLDEST = "1.30.0"  # the oldest Kubernetes release still maintained when written


def _objects(overlay: str) -> list[dict[str, Any]]:
    return render(KUBE / "overlays" / overlay)


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = _find(objects, "Deployment", "runner-gateway")["spec"]["template"]
    return pod


def _settings_text(objects: list[dict[str, Any]]) -> str:
    text: str = _find(objects, "ConfigMap", "runner-gateway-settings")["data"]["settings.yaml"]
    return text


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", [OLDEST, "latest"])
def test_every_object_is_valid_for_kubernetes(overlay: str, version: str) -> None:
    if version == "latest":
        version = kubernetes_validate.latest_version()
    objects = _objects(overlay)
    assert {o["kind"] for o in objects} >= {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schemas_catch_mistakes() -> None:
    deployment = _find(_objects("single"), "Deployment", "runner-gateway")
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, OLDEST, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_pod_is_locked_down(overlay: str) -> None:
    pod = _pod(_objects(overlay))
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    [container] = spec["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_mounts_and_metrics_agree_with_the_settings(overlay: str) -> None:
    objects = _objects(overlay)
    pod = _pod(objects)
    [container] = pod["spec"]["containers"]
    settings = yaml.safe_load(_settings_text(objects))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # Probes: /healthz for liveness, /readyz for readiness, on the TLS port.
    assert ports["https"] == int(settings["server"]["address"].rpartition(":")[2])
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"], get["scheme"]) == (path, "https", "HTTPS")

    # Draining: the preStop pause and the drain both fit in the grace period.
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = parse_duration(settings["server"]["drainTimeout"])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= int(pause[1]) + drain + 5

    # Every file the settings name is in a read-only mount of a Secret (keys)
    # and the settings directory is the ConfigMap.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    settings_mount = mounts["/opt/gateway/settings"]
    assert volumes[settings_mount["name"]]["configMap"]["name"] == "runner-gateway-settings"
    files = [
        settings["paseto"]["publicPath"],
        settings["paseto"]["secretKeyPath"],
        settings["server"]["certificatePath"],
        settings["server"]["keyPath"],
    ]
    for path in files:
        mount = mounts[str(Path(path).parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["defaultMode"] & 0o022 == 0  # the gateway refuses writable key files
    assert mounts["/tmp"]["name"] in volumes  # the only writable place

    # Prometheus scrapes the metrics listener the settings open.
    annotations = pod["metadata"]["annotations"]
    metrics_port = int(settings["metrics"]["address"].rpartition(":")[2])
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"] == metrics_port

    # The Service and the PodDisruptionBudget select these pods.
    labels = pod["metadata"]["labels"]
    service = _find(objects, "Service", "runner-gateway")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    pdb = _find(objects, "PodDisruptionBudget", "runner-gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1  # a single replica can still be drained


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_mounted_settings_load(overlay: str, tmp_path: Path) -> None:
    text = _settings_text(_objects(overlay))
    raw = yaml.safe_load(text)
    if "redis" in raw and "redis" not in settings_module._TOP:
        # The redis section comes with shared limits and revocation (another
        # change); until then the rest of this overlay's settings is checked.
        del raw["redis"]
        text = yaml.safe_dump(raw)
    keys = tmp_path / "opt" / "gateway"
    for name in ("keys/paseto-local.key", "keys/paseto.pub", "tls/tls.crt", "tls/tls.key"):
        (keys / name).parent.mkdir(parents=True, exist_ok=True)
        (keys / name).write_text("ab" * 32 + "\n")
        (keys / name).chmod(0o440)
    directory = tmp_path / "settings"
    directory.mkdir()
    (directory / "settings.yaml").write_text(text.replace("/opt/gateway/", f"{keys}/"))
    loaded = load_settings(directory, environ={})
    assert loaded.server.tls and loaded.metrics.address is not None
    assert loaded.paseto.secret_key == "ab" * 32


def test_the_redis_overlay_shares_state_between_replicas() -> None:
    objects = _objects("replicas-redis")
    deployment = _find(objects, "Deployment", "runner-gateway")
    assert deployment["spec"]["replicas"] > 1
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "runner-gateway-redis"
    redis = yaml.safe_load(_settings_text(objects))["redis"]
    host = re.match(r"redis://([^:/]+)", redis["url"])
    assert host is not None
    _find(objects, "Service", host.group(1))  # the Redis the overlay runs
    assert "password" not in redis["url"] and "@" not in redis["url"]
    assert _find(objects, "Deployment", host.group(1))["spec"]["template"]["spec"]["containers"][0][
        "securityContext"
    ]["readOnlyRootFilesystem"]


def test_the_renderer_refuses_what_it_does_not_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources: []\nnamePrefix: x-\n"
    )
    with pytest.raises(ValueError, match="namePrefix"):
        render(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_itself_renders_the_same(overlay: str) -> None:
    binary = shutil.which("kustomize")
    if binary is None:
        pytest.skip("no kustomize on PATH (none installs from PyPI, npm or Debian here)")
    done = subprocess.run(
        [binary, "build", str(KUBE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    theirs = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(done.stdout)}
    ours = {(o["kind"], o["metadata"]["name"]): o for o in _objects(overlay)}
    assert theirs == ours
