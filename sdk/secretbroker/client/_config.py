"""How a client reaches the broker: where (one or several endpoints), with which certificate,
how long it waits. ``from_env`` is the one reader of the SECRETBROKER_* variables."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from secretbroker.client._errors import ClientConfigError
from secretbroker.client._retry import RetryPolicy

ENV_PREFIX = "SECRETBROKER_"


@dataclass(frozen=True)
class BrokerClientConfig:
    target: str | Sequence[str]
    """Where the broker is: "host:port"; a gRPC name such as "dns:///broker:50051" (every
    address the name resolves to) or "ipv4:10.0.0.1:50051,10.0.0.2:50051"; or a list of
    "ip:port" endpoints. See ``channel_target``."""
    ca_file: Path
    """CA that signed the broker's server certificate."""
    cert_file: Path
    """This workload's client certificate: its identity."""
    key_file: Path
    server_name: str | None = None
    """Name to check in the broker's certificate, when it differs from the target host."""
    deadline: float = 2.0
    """Seconds allowed for one attempt of a call."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    reload_interval: float = 5.0
    """How often the certificate, key and CA files are checked for a change (rotated
    certificates); 0: never. A change steady for one interval gets a new channel."""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> BrokerClientConfig:
        """Read SECRETBROKER_ADDR (one endpoint, or several separated by commas), _CA_FILE,
        _CERT_FILE, _KEY_FILE and the optional _SERVER_NAME. ``overrides`` (e.g. command line
        flags, keyed ADDR, CA_FILE, ...) win over the environment where they are set."""
        given = {k: v for k, v in (overrides or {}).items() if v}

        def setting(key: str) -> str | None:
            return given.get(key) or environ.get(ENV_PREFIX + key) or None

        def required(key: str) -> str:
            value = setting(key)
            if not value:
                raise ClientConfigError(f"{ENV_PREFIX}{key}: missing")
            return value

        def existing_file(key: str) -> Path:
            path = Path(required(key))
            if not path.is_file():
                raise ClientConfigError(f"{ENV_PREFIX}{key}: file not found: {path}")
            return path

        addresses = [part.strip() for part in required("ADDR").split(",") if part.strip()]
        return cls(
            target=addresses[0] if len(addresses) == 1 else tuple(addresses),
            ca_file=existing_file("CA_FILE"),
            cert_file=existing_file("CERT_FILE"),
            key_file=existing_file("KEY_FILE"),
            server_name=setting("SERVER_NAME"),
        )


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target for one or several endpoints.

    One string is used as it is ("host:port", "dns:///name:port", "ipv4:...", "unix:..."),
    unless it lists several endpoints separated by commas. Several endpoints must be IP
    addresses ("10.0.0.1:50051", "[::1]:50051"): gRPC resolves a name to all of its
    addresses itself, so a name that stands for several brokers is given as "dns:///name:port".
    """
    if isinstance(target, str):
        if "," in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
            return channel_target(target.split(","))
        return target
    endpoints = [endpoint.strip() for endpoint in target]
    if not endpoints:
        raise ClientConfigError(f"{ENV_PREFIX}ADDR: no endpoint")
    if len(endpoints) == 1:
        return endpoints[0]
    families = {_ip_family(endpoint) for endpoint in endpoints}
    if len(families) != 1:
        raise ClientConfigError(
            f'{ENV_PREFIX}ADDR: several endpoints must all be IPv4 or all IPv6 "ip:port";'
            " for a name that resolves to several brokers use dns:///name:port"
        )
    return f"{families.pop()}:{','.join(endpoints)}"


def _ip_family(endpoint: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if not sep or not port.isdigit() or address is None:
        raise ClientConfigError(
            f'{ENV_PREFIX}ADDR: in a list of endpoints, each must be "ip:port";'
            " for a name that resolves to several brokers use dns:///name:port"
        )
    return f"ipv{address.version}"
