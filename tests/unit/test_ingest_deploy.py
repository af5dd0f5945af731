"""The ingestor's Deployment in ``k8s.yaml``: its entry point, one pod per Alpaca key, probes on
the endpoint it serves, a grace period above its shutdown budget, its state on a persistent
volume, hardening, and only settings the ingestor's loader accepts (schema validation,
hadolint and checkov run over the whole file in ``tests/integration/test_deploy.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from runtime.config import SECRET_REF_SUFFIX, SETTINGS, load_ingest_config

K8S = Path(__file__).resolve().parents[2] / "k8s.yaml"


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def ingest(kind: str) -> dict[str, Any]:
    [doc] = [
        d
        for d in docs()
        if d["kind"] == kind
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "ingest"
    ]
    return doc


def test_ingest_deployment() -> None:
    dep = ingest("Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["python", "-m", "runtime.ingest"]
    data = ingest("ConfigMap")["data"]
    assert c["envFrom"][0]["configMapRef"]["name"] == ingest("ConfigMap")["metadata"]["name"]
    port = int(data["HEALTH_PORT"])
    assert c["ports"][0]["containerPort"] == port
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] >= 2 * float(data["SHUTDOWN_TIMEOUT_S"])
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"]
    assert pod["enableServiceLinks"] is False  # requests scans the environment at every call
    # The state file lives on the persistent volume claim.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    [state_volume] = [n for n, p in mounts.items() if data["INGEST_STATE_PATH"].startswith(p + "/")]
    claim = volumes[state_volume]["persistentVolumeClaim"]["claimName"]
    assert claim == ingest("PersistentVolumeClaim")["metadata"]["name"]
    assert ingest("NetworkPolicy")["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "ingest"
    }


def test_ingest_configmap_loads_with_the_ingestors_loader() -> None:
    data = ingest("ConfigMap")["data"]
    for key in data:
        base = key.removesuffix(SECRET_REF_SUFFIX)
        assert base in SETTINGS and (not SETTINGS[base].secret or key != base), key

    class Resolver:
        def access(self, ref: str, project: str | None) -> tuple[str, str]:
            return f"value-of-{ref}", f"projects/{project}/secrets/{ref}/versions/latest"

    cfg, ops = load_ingest_config(data, secret_resolver=Resolver())
    assert cfg.api_key.reveal() == "value-of-alpaca-data-key"
    assert cfg.topic == "market-bars" and ops.health_port == 8080


def _image_env() -> dict[str, str]:
    """The ``ENV`` of the Dockerfile's final stage, as the container starts with it."""
    import re
    import shlex

    text = (K8S.parent / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("FROM "):
            env = {}  # a new stage
        elif line.startswith("ENV "):
            for word in shlex.split(line[4:]):
                if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word):
                    key, _, value = word.partition("=")
                    env[key] = value
    return env


def test_every_runner_configmap_starts_in_the_image() -> None:
    """helper-82: runner-chronos set PUBSUB_BACKFILL_BARS with symbols the image has no CSV
    for: the pod would exit 2 at every start. Each runner ConfigMap, over the image's ENV, with
    its keys given as its Deployment gives them (a Secret or Secret Manager), loads."""
    from runtime.config import load_config

    class Resolver:
        def access(self, ref: str, project: str | None) -> tuple[str, str]:
            return f"value-of-{ref}", f"projects/{project}/secrets/{ref}/versions/latest"

    image = _image_env()
    assert image["HEALTH_PORT"] == "8080" and "FMEL_LOCAL_PATH" in image
    runners = [
        d
        for d in docs()
        if d["kind"] == "ConfigMap"
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "runner"
    ]
    assert len(runners) >= 2
    for cm in runners:
        env = {**image, **cm["data"]}
        if "ALPACA_API_KEY_SECRET" not in env:  # from a Kubernetes Secret, as env
            env |= {"ALPACA_API_KEY": "PKTESTKEY123", "ALPACA_SECRET_KEY": "sEcReT123456"}
        cfg = load_config(env, secret_resolver=Resolver())
        assert cfg.run.symbols, cm["metadata"]["name"]
