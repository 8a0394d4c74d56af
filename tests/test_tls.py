"""TLS, mutual TLS and per-device bearer tokens: valid credentials act, every invalid
combination is refused and never reaches the model.

Refusals come from two layers. A token problem (none, unknown, malformed, another device's
token) reaches our interceptor: UNAUTHENTICATED. A transport problem (plaintext to a TLS port,
no client certificate under mTLS, a certificate from another CA, a server the client does not
trust) fails the TLS handshake before any RPC exists, so a bare gRPC stub can only report
UNAVAILABLE; splitedge's PolicyClient then replays the handshake (edge.tls_check), reads the
server's alert and raises Unauthenticated naming the reason. Both are checked here.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edge.channel import ChannelSecurity, make_channel
from edge.client import Unauthenticated
from edge.tls_check import diagnose
from protos import policy_pb2 as pb
from protos import policy_pb2_grpc as pb_grpc
from server.app import PolicyServer, create_server
from server.config import ServerConfig
from splitedge.commands.certs import make_certs
from splitedge.errors import SplitedgeError
from tests.test_server import Served, action_of, feature_tensor, hello_request, reference

UNAUTH, UNAVAILABLE = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE
SHORT = 5.0  # handshake failures are immediate; this only bounds a hung test


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Our development PKI (devices pi-01, pi-02) and a rogue one (device pi-01 too)."""
    ours, rogue = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("rogue")
    make_certs(ours, ["pi-01", "pi-02"], [])
    make_certs(rogue, ["pi-01"], [])
    return ours, rogue


@dataclass
class Secured:
    server: PolicyServer
    served: Served  # the helpers' view: bundle, manifest (its stub is unused here)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def decisions(self) -> int:
        return int(self.server.servicer.stats()["decisions"])


def _start(bundle: Path, **cfg: Any) -> Iterator[Secured]:
    import json

    config = ServerConfig(bundle=bundle, metrics_port=0, **cfg)
    server, port = create_server(config)
    server.start()
    manifest = json.loads((bundle / "manifest.json").read_text())
    served = Served(server.servicer, server, port, None, None, manifest, bundle)  # type: ignore[arg-type]
    yield Secured(server, served)
    server.close()
    server.servicer.close()


@pytest.fixture(scope="module")
def mtls_tokens(tiny_bundle: Path, pki: tuple[Path, Path]) -> Iterator[Secured]:
    ours, _ = pki
    yield from _start(
        tiny_bundle,
        tls_cert=ours / "server.pem",
        tls_key=ours / "server.key",
        client_ca=ours / "ca.pem",
        tokens=ours / "tokens.txt",
    )


@pytest.fixture(scope="module")
def tls_only(tiny_bundle: Path, pki: tuple[Path, Path]) -> Iterator[Secured]:
    ours, _ = pki
    yield from _start(tiny_bundle, tls_cert=ours / "server.pem", tls_key=ours / "server.key")


@pytest.fixture(scope="module")
def tokens_only(tiny_bundle: Path, pki: tuple[Path, Path]) -> Iterator[Secured]:
    yield from _start(tiny_bundle, tokens=pki[0] / "tokens.txt")


def device(
    pki_dir: Path, name: str, token_of: str | None = None, **changes: Any
) -> ChannelSecurity:
    """A device's credentials from a PKI directory; token_of picks whose token it sends."""
    d = pki_dir / "devices"
    fields: dict[str, Any] = dict(
        ca=pki_dir / "ca.pem",
        cert=d / f"{name}.pem",
        key=d / f"{name}.key",
        token_file=d / f"{token_of or name}.token",
    )
    fields.update(changes)
    return ChannelSecurity(**fields)


def act(s: Secured, security: ChannelSecurity, metadata: Any = None, stream: bool = False) -> int:
    """Hello and one Act (or one ActStream message) over a fresh channel; returns the action."""
    q = np.arange(64, dtype=np.uint8)
    with make_channel(s.target, security=security) as ch:
        stub = pb_grpc.PolicyStub(ch)
        sid = stub.Hello(hello_request(s.served), timeout=SHORT, metadata=metadata).session_id
        request = pb.ActRequest(session_id=sid, step=1, input=feature_tensor(s.served, q))
        if stream:
            return action_of(
                next(iter(stub.ActStream(iter([request]), timeout=SHORT, metadata=metadata)))
            )
        return action_of(stub.Act(request, timeout=SHORT, metadata=metadata))


def refused(s: Secured, security: ChannelSecurity, **kw: Any) -> grpc.RpcError:
    before = s.decisions
    with pytest.raises(grpc.RpcError) as info:
        act(s, security, **kw)
    assert s.decisions == before  # nothing reached the model
    return info.value


def test_valid_device_acts_over_mtls_with_its_token_unary_and_stream(
    mtls_tokens: Secured, pki: tuple[Path, Path]
) -> None:
    want = int(
        reference(mtls_tokens.served.bundle, "head.onnx", np.arange(64, dtype=np.uint8)[None])[0]
    )
    for name in ("pi-01", "pi-02"):
        assert act(mtls_tokens, device(pki[0], name)) == want
        assert act(mtls_tokens, device(pki[0], name), stream=True) == want


@pytest.mark.parametrize(
    ("case", "changes", "word"),
    [
        ("no token", {"token_file": None}, "no bearer token"),
        ("another device's token", {"token_of": "pi-02"}, "certificate of 'pi-01'"),
        ("a token from another deployment", {"rogue_token": True}, "unknown or revoked"),
    ],
)
def test_token_problems_are_unauthenticated(
    mtls_tokens: Secured, pki: tuple[Path, Path], case: str, changes: dict[str, Any], word: str
) -> None:
    ours, rogue = pki
    changes = dict(changes)
    if changes.pop("rogue_token", False):
        changes["token_file"] = rogue / "devices" / "pi-01.token"
    token_of = changes.pop("token_of", None)
    for stream in (False, True):
        e = refused(mtls_tokens, device(ours, "pi-01", token_of, **changes), stream=stream)
        assert e.code() == UNAUTH and word in (e.details() or ""), (case, e.code(), e.details())


def test_malformed_authorization_header_is_unauthenticated(tokens_only: Secured) -> None:
    for value in ("Basic dXNlcjpwYXNz", "Bearer", "token-without-scheme"):
        e = refused(tokens_only, ChannelSecurity(), metadata=[("authorization", value)])
        assert e.code() == UNAUTH and "Bearer" in (e.details() or ""), value


@pytest.mark.parametrize(
    "case",
    [
        "plaintext client",
        "no client certificate",
        "certificate from another CA",
        "client does not trust the server",
    ],
)
def test_transport_problems_fail_the_handshake(
    mtls_tokens: Secured, pki: tuple[Path, Path], case: str
) -> None:
    ours, rogue = pki
    security = {
        "plaintext client": ChannelSecurity(),
        "no client certificate": device(ours, "pi-01", cert=None, key=None, tls=True),
        "certificate from another CA": device(
            ours, "pi-01", cert=rogue / "devices/pi-01.pem", key=rogue / "devices/pi-01.key"
        ),
        "client does not trust the server": device(ours, "pi-01", ca=rogue / "ca.pem"),
    }[case]
    if case == "plaintext client":  # the token would go in clear text: refused before dialling
        with pytest.raises(SplitedgeError, match="clear"):
            make_channel(
                "10.0.0.5:50051", security=device(ours, "pi-01", ca=None, cert=None, key=None)
            )
        security = ChannelSecurity()
    e = refused(mtls_tokens, security)
    assert e.code() == UNAVAILABLE, (case, e.code(), e.details())
    with pytest.raises(Unauthenticated, match=f"UNAUTHENTICATED {TRANSPORT_REASONS[case]}"):
        client(mtls_tokens, security).connect()


TRANSPORT_REASONS = {
    "plaintext client": "the server speaks TLS and this device connected in plaintext",
    "no client certificate": "the server requires a device certificate",
    "certificate from another CA": "the server refused this device's certificate",
    "client does not trust the server": "this device does not trust the server's certificate",
    "wrong server name": "this device does not trust the server's certificate for "
    "'policy.elsewhere'",
}


def client(s: Secured, security: ChannelSecurity) -> Any:
    """splitedge's device client for the secured server's bundle, short deadlines."""
    from edge.client import ClientConfig, PolicyClient
    from splitedge.bundle import load_bundle

    cfg = ClientConfig(server=s.target, backend="ort", deadline_s=1.0, security=security)
    return PolicyClient(load_bundle(s.served.bundle), cfg)


def test_a_server_that_is_down_is_not_called_unauthenticated(
    tiny_bundle: Path, pki: tuple[Path, Path]
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for security in (ChannelSecurity(), device(pki[0], "pi-01")):
        assert diagnose(f"127.0.0.1:{port}", security, timeout=1.0) is None


def test_health_needs_no_token_but_reflection_does(
    mtls_tokens: Secured, pki: tuple[Path, Path]
) -> None:
    no_token = device(pki[0], "pi-01", token_file=None)
    with make_channel(mtls_tokens.target, security=no_token) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=SHORT)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(
                reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=SHORT
                )
            )
        assert info.value.code() == UNAUTH
    with make_channel(mtls_tokens.target, security=device(pki[0], "pi-01")) as ch:
        replies = list(
            reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=SHORT
            )
        )
        assert "splitedge.v1.Policy" in {s.name for s in replies[0].list_services_response.service}


def test_refusals_are_counted_by_code_in_metrics(
    mtls_tokens: Secured, pki: tuple[Path, Path]
) -> None:
    refused(mtls_tokens, device(pki[0], "pi-01", token_file=None))
    url = f"http://127.0.0.1:{mtls_tokens.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=SHORT).read().decode()
    assert 'splitedge_errors_total{code="UNAUTHENTICATED",method="Hello"}' in text


def test_tls_without_client_certificates(tls_only: Secured, pki: tuple[Path, Path]) -> None:
    ours, rogue = pki
    assert act(tls_only, ChannelSecurity(ca=ours / "ca.pem")) in (0, 1)
    for security in (
        ChannelSecurity(),  # plaintext
        ChannelSecurity(ca=rogue / "ca.pem"),  # a server it cannot verify
        ChannelSecurity(ca=ours / "ca.pem", server_name="policy.elsewhere"),  # wrong name
    ):
        assert refused(tls_only, security).code() == UNAVAILABLE
    wrong_name = ChannelSecurity(ca=ours / "ca.pem", server_name="policy.elsewhere")
    with pytest.raises(Unauthenticated, match=TRANSPORT_REASONS["wrong server name"]):
        client(tls_only, wrong_name).connect()
    assert diagnose(tls_only.target, ChannelSecurity(ca=ours / "ca.pem")) is None  # valid


def test_tokens_on_a_loopback_plaintext_server(
    tokens_only: Secured, pki: tuple[Path, Path]
) -> None:
    token = pki[0] / "devices" / "pi-02.token"
    assert act(tokens_only, ChannelSecurity(token_file=token)) in (0, 1)
    assert refused(tokens_only, ChannelSecurity()).code() == UNAUTH
    # TLS to a plaintext server is a misconfiguration, not a credential the server refused
    assert diagnose(tokens_only.target, ChannelSecurity(ca=pki[0] / "ca.pem")) is None


def test_channel_security_from_environment(pki: tuple[Path, Path]) -> None:
    env = {
        "SPLITEDGE_CA": str(pki[0] / "ca.pem"),
        "SPLITEDGE_TOKEN_FILE": "",
        "SPLITEDGE_TLS_NAME": "x",
    }
    s = ChannelSecurity.from_env(env)
    assert (s.ca, s.cert, s.token_file, s.server_name, s.uses_tls) == (
        str(pki[0] / "ca.pem"),
        None,
        None,
        "x",
        True,
    )
    assert not ChannelSecurity.from_env({}).uses_tls


def test_bad_tokens_file_is_a_clear_error(tmp_path: Path, tiny_bundle: Path) -> None:
    bad = tmp_path / "tokens.txt"
    bad.write_text("pi-01 plaintext-token\n")
    with pytest.raises(SplitedgeError, match=r"tokens.txt:1: expected '<device-id> sha256:<hex>'"):
        create_server(ServerConfig(bundle=tiny_bundle, tokens=bad))
    with pytest.raises(SplitedgeError, match="cannot read the TLS key"):
        create_server(
            ServerConfig(
                bundle=tiny_bundle, tls_cert=tmp_path / "a.pem", tls_key=tmp_path / "a.key"
            )
        )


def test_policy_client_acts_over_mtls_with_its_token(
    mtls_tokens: Secured, pki: tuple[Path, Path]
) -> None:
    from edge.client import ClientConfig, PolicyClient
    from splitedge.bundle import load_bundle

    bundle = load_bundle(mtls_tokens.served.bundle)
    frame = np.zeros((3, 48, 48), np.uint8)
    good = ClientConfig(server=mtls_tokens.target, backend="ort", security=device(pki[0], "pi-01"))
    with PolicyClient(bundle, good).connect() as client:
        client.act(frame)
        assert client.last is not None and not client.last.fallback
    stolen = ClientConfig(
        server=mtls_tokens.target, backend="ort", security=device(pki[0], "pi-01", "pi-02")
    )
    with pytest.raises(ConnectionError, match="UNAUTHENTICATED"):
        PolicyClient(bundle, stolen).connect()
