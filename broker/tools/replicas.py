"""Every broker replica behind a client target, one by one: what an ops command that must reach
all of them (a rollback flip, status) talks to.

A catalog client spreads its calls over the replicas (round_robin) and does not care which one
answers. A rollback flip is different: each replica keeps its own override, so the flip must
reach every replica, and ops must learn which ones it did not reach. The target is resolved
here the way gRPC would resolve it, and each address gets a channel of its own:

- a list or "ipv4:a,b": each endpoint;
- "dns:///name:port", "dns:name:port" or "name:port": every address the name resolves to (a
  Kubernetes headless Service gives one per ready pod), with the name checked in each
  replica's certificate.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from secretbroker.client import BrokerClientConfig, ClientConfigError, channel_target

Resolve = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Replica:
    endpoint: str
    """One replica's "ip:port"."""
    config: BrokerClientConfig
    """The client settings with this endpoint as the only target."""


def resolve_replicas(
    config: BrokerClientConfig, resolve: Resolve = socket.getaddrinfo
) -> list[Replica]:
    """One Replica per address behind ``config.target``; raises ClientConfigError when a name
    does not resolve."""
    target = channel_target(config.target)
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        endpoints = rest.split(",")
        server_name = config.server_name or _host(endpoints[0])
        return [_replica(config, endpoint, server_name) for endpoint in endpoints]
    if scheme == "unix":
        return [Replica(target, config)]
    name = rest.lstrip("/") if scheme == "dns" else target
    if name.count("/") == 1:  # dns://authority/name:port
        name = name.split("/", 1)[1]
    host, _, port = name.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ClientConfigError(f"cannot tell the host and port in the broker target {target!r}")
    if _is_ip(host):
        return [_replica(config, _endpoint(host, port), config.server_name or host)]
    try:
        found = resolve(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ClientConfigError(f"the broker name {host!r} does not resolve ({exc})") from None
    addresses = sorted({str(info[4][0]) for info in found})
    if not addresses:
        raise ClientConfigError(f"the broker name {host!r} resolves to no address")
    server_name = config.server_name or host
    return [_replica(config, _endpoint(address, port), server_name) for address in addresses]


def _replica(config: BrokerClientConfig, endpoint: str, server_name: str) -> Replica:
    return Replica(endpoint, dataclasses.replace(config, target=endpoint, server_name=server_name))


def _endpoint(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _host(endpoint: str) -> str:
    return endpoint.rpartition(":")[0].strip("[]")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
