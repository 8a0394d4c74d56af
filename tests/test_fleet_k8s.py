"""deploy/k8s: the shipped manifests parse, agree with each other, with `splitedge serve`'s own
argument parser and ServerConfig, and with the files `splitedge certs` writes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge.channel import resolve_target
from server.health import LIVENESS
from splitedge.cli import build_parser
from splitedge.commands.certs import make_certs
from splitedge.commands.serve import LIMITS, config_from_args
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


def _container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _serve_args(docs: dict[str, dict[str, Any]]) -> Any:
    args = build_parser().parse_args(_container(docs)["args"])  # the real CLI, no guessing
    assert args.command == "serve"
    return args


def test_the_service_is_headless_and_selects_the_pods(docs: dict[str, dict[str, Any]]) -> None:
    assert {"Service", "Deployment", "PodDisruptionBudget"} <= set(docs)
    svc, dep = docs["Service"], docs["Deployment"]
    assert svc["spec"]["clusterIP"] == "None"  # one DNS record per pod: client-side balancing
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]
    assert dep["spec"]["replicas"] >= 3 > docs["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1


def test_container_args_are_a_valid_serve_command(docs: dict[str, dict[str, Any]]) -> None:
    args = _serve_args(docs)
    ports = {p["name"]: p["containerPort"] for p in _container(docs)["ports"]}
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", ports["grpc"], ports["metrics"])
    cfg = config_from_args(args)
    assert cfg.tls and cfg.client_ca is not None and cfg.tokens is not None
    # readiness: /ready on the metrics port (503 once draining); liveness: plaintext gRPC
    # health, service "liveness" (SERVING until exit, so a draining pod is not restarted)
    ready, live = _container(docs)["readinessProbe"], _container(docs)["livenessProbe"]
    assert ready["httpGet"]["path"] == "/ready" and ports[ready["httpGet"]["port"]] == 9100
    assert live["grpc"] == {"port": args.health_port, "service": LIVENESS}
    assert args.health_port in ports.values() and args.metrics_host == "0.0.0.0"
    assert args.metrics_token is not None  # metrics leave the pod: they need a token


def test_every_limit_is_set_explicitly(docs: dict[str, dict[str, Any]]) -> None:
    given = {a.split("=", 1)[0] for a in _container(docs)["args"]}
    assert {flag for flag, *_ in LIMITS} - {"--max-message-bytes", "--max-sessions"} <= given


def test_manifests_pass_a_kubernetes_schema_validator() -> None:
    import kubernetes_validate  # the dev extra installs it

    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:  # raises ValidationError naming the field; strict: no unknown fields
                kubernetes_validate.validate(doc, "1.37", strict=True)
    broken = yaml.safe_load_all((K8S / "policy-server.yaml").read_text())
    deployment = next(d for d in broken if d and d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):  # it really checks the schema
        kubernetes_validate.validate(deployment, "1.37", strict=True)


def test_secret_files_are_what_splitedge_certs_writes(
    docs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    args = _serve_args(docs)
    mounts = {m["name"]: m["mountPath"] for m in _container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["tls"]["secret"]["secretName"]
    make_certs(tmp_path, ["pi-01"], ["splitedge-policy.default.svc.cluster.local"])
    readme = (K8S / "README.md").read_text()
    for path in (args.tls_cert, args.tls_key, args.client_ca, args.tokens):
        assert path.parent == Path(mounts["tls"])  # every file comes from the Secret's mount
        assert (tmp_path / path.name).is_file()  # ...and `splitedge certs` makes it
        assert f"--from-file=certs/{path.name}" in readme  # ...and the README puts it there
    assert f"create secret generic {secret}" in readme


def test_shutdown_fits_in_the_termination_grace_period(docs: dict[str, dict[str, Any]]) -> None:
    args = _serve_args(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    command = " ".join(_container(docs)["lifecycle"]["preStop"]["exec"]["command"])
    pre_stop = float(re.search(r"sleep\((\d+(?:\.\d+)?)\)", command).group(1))  # type: ignore[union-attr]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + args.grace_s


def test_the_documented_device_target_is_a_grpc_dns_target() -> None:
    readme = (K8S / "README.md").read_text()
    target = re.search(r"dns:///[\w.-]+:\d+", readme).group(0)  # type: ignore[union-attr]
    assert resolve_target(target) == target and target.endswith(":50051")
