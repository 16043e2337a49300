"""The shipped indexed Job for sharded reencrypt runs: shards agree, pod security is restricted, keys are files."""

from __future__ import annotations

import yaml

from proxy.cli import _parser
from proxy.migrate.shards import parse_shard
from tests.conftest import ROOT

JOB_DIR = ROOT / "deploy" / "kubernetes" / "jobs" / "reencrypt"


def _job() -> dict:
    kustomization = yaml.safe_load((JOB_DIR / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["job.yaml"]
    return yaml.safe_load((JOB_DIR / "job.yaml").read_text())


def test_every_index_runs_a_distinct_shard_of_the_same_count():
    job = _job()
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    args = container["args"]
    shard = args[args.index("--shard") + 1]
    assert shard.startswith("$(JOB_COMPLETION_INDEX)/")  # Kubernetes substitutes the pod's index
    count = int(shard.split("/")[1])
    assert spec["completions"] == count and spec["parallelism"] <= count
    # only an interrupted shard (exit 3, resumable) is worth a retry
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailIndex" and rule["onExitCodes"]["values"] == [1, 2]
    shards = {parse_shard(shard.replace("$(JOB_COMPLETION_INDEX)", str(i))) for i in range(spec["completions"])}
    assert shards == {(i, count) for i in range(count)}
    parsed = _parser().parse_args(
        [a.replace("$(JOB_COMPLETION_INDEX)", "0") for a in args]
    )  # the real command line accepts them
    assert parsed.command == "reencrypt" and parsed.report == "-"


def test_pod_security_is_restricted_and_keys_are_read_only_secret_files():
    pod = _job()["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) == {"FHIRCRYPT_KEYRING", "FHIRCRYPT_KEK_FILE", "FHIRCRYPT_UPSTREAM_TOKEN_FILE"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name in ("keys", "upstream-token"):
        assert mounts[name]["readOnly"] is True
        assert volumes[name]["secret"]["defaultMode"] == 0o400
        assert any(value.startswith(mounts[name]["mountPath"] + "/") for value in env.values())
    assert "kek" not in " ".join(container["args"]).lower()  # secrets never on the command line
