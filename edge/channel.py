"""gRPC channels to policy servers: round-robin over replicas, TLS / mutual TLS, device tokens.

    from edge.channel import ChannelSecurity, make_channel
    ch = make_channel("10.0.0.5:50051,10.0.0.6:50051")            # round-robin over two
    ch = make_channel("dns:///policy.fleet.svc.cluster.local:50051")  # every DNS record
    ch = make_channel(
        "policy.example:50051",
        security=ChannelSecurity(ca="certs/ca.pem", cert="pi-01.pem", key="pi-01.key",
                                 token_file="pi-01.token"),
    )

Without `security`, it comes from the environment (a systemd unit's EnvironmentFile):
SPLITEDGE_CA, SPLITEDGE_CERT, SPLITEDGE_KEY, SPLITEDGE_TOKEN_FILE, SPLITEDGE_TLS_NAME.
gRPC's own client-side load balancing spreads calls over every address the target resolves
to and stops picking a replica whose connection failed, so losing one costs a device at most
the calls already on their way to it.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from splitedge.errors import SplitedgeError

ENV = {
    "ca": "SPLITEDGE_CA",
    "cert": "SPLITEDGE_CERT",
    "key": "SPLITEDGE_KEY",
    "token_file": "SPLITEDGE_TOKEN_FILE",
    "server_name": "SPLITEDGE_TLS_NAME",
}


@dataclass(frozen=True)
class ChannelSecurity:
    """How a device proves who it is and checks who it talks to.

    ca: PEM CA the server's certificate must chain to (TLS); tls=True without ca uses the
        system's roots. cert, key: the device's certificate and key (mutual TLS).
    token_file: file holding the device's bearer token (sent as 'authorization: Bearer ...').
    server_name: the name to check the server certificate against, if not the target's host.
    """

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    token_file: str | Path | None = None
    server_name: str | None = None
    tls: bool = False

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca is not None or self.cert is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ChannelSecurity:
        """Settings from SPLITEDGE_* environment variables (unset or empty = not used)."""
        env = os.environ if env is None else env
        found = {field: env.get(var) or None for field, var in ENV.items()}
        return cls(
            ca=found["ca"],
            cert=found["cert"],
            key=found["key"],
            token_file=found["token_file"],
            server_name=found["server_name"],
        )

    def token(self) -> str | None:
        """The bearer token, read from token_file."""
        if self.token_file is None:
            return None
        text = _read(self.token_file, "token file").decode().strip()
        if not text:
            raise SplitedgeError(
                f"token file {self.token_file} is empty; reissue it with `splitedge certs`"
            )
        return text


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SplitedgeError(f"cannot read the {what} {path} ({e.strerror})") from e


def resolve_target(server: str) -> str:
    """A gRPC target for `server`: 'host:port', a gRPC URI (dns:///, ipv4:...), or a
    comma-separated list of IP:port replicas (gRPC's resolver takes lists of IPs only)."""
    if server.startswith(("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")):
        return server  # already a gRPC URI
    parts = [p.strip() for p in server.split(",") if p.strip()]
    if len(parts) <= 1:
        return parts[0] if parts else server
    families = set()
    for part in parts:
        host = part.rsplit(":", 1)[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise SplitedgeError(
                f"a list of replicas must be IP:port addresses, got {part!r}; for host names "
                "use one DNS name with a record per replica (dns:///name:port)"
            ) from None
    if len(families) != 1:
        raise SplitedgeError(f"replicas must be all IPv4 or all IPv6, got {server!r}")
    return f"ipv{families.pop()}:{','.join(parts)}"


def _is_loopback(target: str) -> bool:
    if target.startswith(("ipv4:", "ipv6:")):
        addresses = target.split(":", 1)[1].split(",")
    else:
        addresses = [target.rsplit("/", 1)[-1]]  # host:port, or dns:///host:port
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in addresses]
    try:
        return all(h == "localhost" or ipaddress.ip_address(h).is_loopback for h in hosts)
    except ValueError:
        return False


def lb_options(lb: str) -> list[tuple[str, Any]]:
    """Channel options selecting a load-balancing policy (round_robin, pick_first)."""
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [{lb: {}}]}))]


def make_channel(
    server: str,
    options: Sequence[tuple[str, Any]] = (),
    security: ChannelSecurity | None = None,
    lb: str = "round_robin",
) -> grpc.Channel:
    """A channel to one server or to replicas (see resolve_target), secured as `security` says."""
    target = resolve_target(server)
    security = ChannelSecurity.from_env() if security is None else security
    opts = [*options, *lb_options(lb)]
    token = security.token()
    if security.uses_tls:
        if (security.cert is None) != (security.key is None):
            raise SplitedgeError("a device certificate needs its key (cert and key go together)")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(security.ca, "CA certificate") if security.ca else None,
            private_key=_read(security.key, "device key") if security.key else None,
            certificate_chain=_read(security.cert, "device certificate") if security.cert else None,
        )
        if security.server_name:
            opts.append(("grpc.ssl_target_name_override", security.server_name))
    elif token is not None:
        if not _is_loopback(target):
            raise SplitedgeError(
                f"a bearer token to {server} without TLS would cross the network in clear "
                "text; give the server's CA (SPLITEDGE_CA)"
            )
        # gRPC sends call credentials only on secure channels; local TCP counts as one
        creds = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return grpc.insecure_channel(target, options=opts)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds, options=opts)
