"""deploy/: Compose file against the Compose specification, Kubernetes manifests against the
Kubernetes schemas (kubernetes-validate), systemd units with systemd-analyze, and the
properties the runbooks rely on (one beat, durable Redis, authenticated Flower, grace
periods longer than a batch)."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from sqlalchemy import text
from support.helpers import conversion

from postback_worker.settings import Settings
from postback_worker.store.journal import Journal
from postback_worker.store.repo import Store
from postback_worker.worker.queues import QUEUES, RETRIES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "Kustomization"}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d]


def _kind(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in _docs() if d["kind"] == kind and
             (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _longest_batch_seconds(s: Settings) -> float:
    """A full message of first attempts: chunk / concurrency rounds of one timeout each."""
    rounds = -(-s.ingest.enqueue_chunk_size // s.delivery.concurrency)
    return rounds * s.delivery.default_timeout


# Compose


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    done = _check_compose(DEPLOY / "compose.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    # The check is real: a broken copy is refused.
    broken = _compose()
    broken["services"]["worker"]["stop_grace_period"] = {"minutes": 6}
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert _check_compose(bad).returncode != 0


def test_compose_runs_durable_redis_one_beat_and_authenticated_flower() -> None:
    services = _compose()["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "api", "worker", "beat", "flower"}
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] in {"everysec", "always"}
    assert services["beat"]["deploy"]["replicas"] == 1
    assert services["flower"]["command"][:2] == ["postback-worker", "flower"]
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?")
    for name in ("api", "worker", "beat", "flower"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    assert "deploy" not in services["worker"] or "replicas" not in services["worker"]["deploy"]
    grace = services["worker"]["stop_grace_period"]
    assert grace.endswith("m") and int(grace[:-1]) * 60 > _longest_batch_seconds(Settings())


# Kubernetes


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_is_real() -> None:
    deployment = copy.deepcopy(_kind("Deployment", "postback-worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "six minutes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(_kind("Kustomization")["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml",
                                                       "secret.example.yaml"}
    assert listed == present


def test_worker_shutdown_outlasts_a_batch_and_fits_the_visibility_timeout() -> None:
    worker = _kind("Deployment", "postback-worker")["spec"]["template"]["spec"]
    config = _kind("ConfigMap", "postback-worker")["data"]
    s = Settings.from_env({k: v for k, v in config.items() if k.startswith("POSTBACK_")})
    grace = worker["terminationGracePeriodSeconds"]
    assert grace > _longest_batch_seconds(s)
    assert s.redis.visibility_timeout > grace
    container = worker["containers"][0]
    assert container["readinessProbe"] and container["livenessProbe"]
    assert _kind("PodDisruptionBudget", "postback-worker")["spec"]["maxUnavailable"] == 1


def test_beat_is_a_single_replica_that_never_overlaps() -> None:
    beat = _kind("Deployment", "postback-beat")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"]["type"] == "Recreate"


def test_secrets_come_from_secret_objects() -> None:
    for _, doc in _docs():
        if doc["kind"] not in {"Deployment", "Job"}:
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": "postback-worker"}} in container["envFrom"]
            for env in container.get("env", []):
                assert "value" not in env or not any(
                    word in env["name"] for word in ("URL", "TOKEN", "PASSWORD", "AUTH"))
    for name in ("configmap.yaml",):
        text = (K8S / name).read_text()
        assert "DATABASE_URL" not in text and "TOKEN" not in text


def test_every_long_running_container_has_probes() -> None:
    for _, doc in _docs():
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert "livenessProbe" in container, doc["metadata"]["name"]


# The subset of KEDA's ScaledObject CRD schema that these manifests use.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {"oneOf": [
                    {"type": "object", "required": ["type", "metadata", "authenticationRef"],
                     "properties": {
                         "type": {"const": "redis"},
                         "metadata": {
                             "type": "object", "required": ["listName", "listLength"],
                             "additionalProperties": {"type": "string"},
                         },
                         "authenticationRef": {"type": "object", "required": ["name"]},
                     }},
                    {"type": "object", "required": ["type", "metadata"],
                     "properties": {
                         "type": {"const": "postgresql"},
                         "metadata": {
                             "type": "object",
                             "required": ["connectionFromEnv", "query", "targetQueryValue"],
                             "additionalProperties": {"type": "string"},
                         },
                     }},
                ]}},
            },
        },
    },
}


def test_keda_scales_workers_on_the_journal_backlog_and_the_retries_queue(
        store: Store) -> None:
    scaled = _kind("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "postback-worker"
    worker = _kind("Deployment", spec["scaleTargetRef"]["name"])
    assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > spec["minReplicaCount"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for trigger in spec["triggers"]:
        by_type.setdefault(trigger["type"], []).append(trigger)
    # Redis: the retries queue (the conversions queue holds at most a wake-up).
    assert {t["metadata"]["listName"] for t in by_type["redis"]} == {RETRIES} <= set(QUEUES)
    auth = _kind("TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in by_type["redis"]} == {
        auth["metadata"]["name"]}
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert {t["metadata"]["addressFromEnv"] for t in by_type["redis"]} <= {
        e["name"] for e in container["env"]}
    # PostgreSQL: the events waiting in the journal, counted by the query KEDA runs.
    (pg,) = by_type["postgresql"]
    secret = _kind("Secret")
    assert pg["metadata"]["connectionFromEnv"] in secret["stringData"]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]
    Journal(store).record([conversion(f"tx{i}", id=f"cv{i}") for i in range(3)])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE conversions SET state = 'no_click' WHERE id = 'cv0'"))
        assert conn.execute(text(pg["metadata"]["query"])).scalar_one() == 2


# systemd and Procfile


def _verify_units(directory: Path) -> subprocess.CompletedProcess[str]:
    units = sorted(str(p) for p in directory.glob("*.service")) + \
        sorted(str(p) for p in directory.glob("*.target"))
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_units_verify(tmp_path: Path) -> None:
    bindir = str(Path(sys.executable).parent)
    env = tmp_path / "env"
    env.write_text((DEPLOY / "systemd" / "env.example").read_text())
    for unit in (DEPLOY / "systemd").iterdir():
        text = unit.read_text().replace("/opt/postback-worker/venv/bin", bindir)
        (tmp_path / unit.name).write_text(text.replace("/etc/postback-worker/env", str(env)))
    done = _verify_units(tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    (tmp_path / "postback-api.service").write_text(
        (tmp_path / "postback-api.service").read_text().replace("Restart=", "Restrat="))
    assert "Unknown key" in _verify_units(tmp_path).stderr


def test_systemd_worker_stops_warm_and_beat_is_single() -> None:
    worker = (DEPLOY / "systemd" / "postback-worker@.service").read_text()
    assert "KillSignal=SIGTERM" in worker and "KillMode=mixed" in worker
    timeout = int(worker.split("TimeoutStopSec=")[1].split()[0])
    assert timeout > _longest_batch_seconds(Settings())
    assert not (DEPLOY / "systemd" / "postback-beat@.service").exists()


def test_procfile_runs_the_same_processes() -> None:
    procs = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert {"web", "worker", "beat", "flower", "release"} <= set(procs)
    assert procs["flower"].split()[:2] == ["postback-worker", "flower"]
    assert "-Q conversions,retries,replay,maintenance" in procs["worker"]
