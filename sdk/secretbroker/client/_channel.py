"""The one way to open a channel to the broker: mutual TLS from certificate files."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from secretbroker.client._config import BrokerClientConfig, channel_target
from secretbroker.client._errors import ClientConfigError

# Reconnect quickly after a broker restart, so retries meet a live connection; notice a broker
# that vanished without closing the connection, for long streams.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


ROUTING_HEALTH_SERVICE = "secretbroker.v1.SecretBroker.accepting"
"""The gRPC health name a broker reports SERVING under while it takes calls: from the end of
its warm-up (it holds every declared secret, or warmup_timeout passed) until it starts to shut
down, and not while a fail-closed audit trail cannot be written. Not readiness: a replica that
lacks a value for one secret still serves the others (env-served ones during a rollback)."""

SERVICE_CONFIG = json.dumps(
    {
        # Spread calls over every broker the target resolves to, not only the first.
        "loadBalancingConfig": [{"round_robin": {}}],
        # Leave a broker as soon as it says it is shutting down (it drains after that), and
        # stay away from one that is still warming up.
        "healthCheckConfig": {"serviceName": ROUTING_HEALTH_SERVICE},
        # No retryPolicy here: the SDK's RetryInterceptor is the one retry layer, under one
        # overall deadline (RetryPolicy). gRPC's transparent retry of a call no server saw
        # (a stream refused by a stopping broker) stays on.
    }
)


UNROUTED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_credentials(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials trusting ``ca_file``, presenting ``cert_file``/``key_file`` when given."""
    try:
        return grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes(),
            private_key=key_file.read_bytes() if key_file is not None else None,
            certificate_chain=cert_file.read_bytes() if cert_file is not None else None,
        )
    except OSError as exc:
        raise ClientConfigError(f"cannot read {exc.filename} ({exc.strerror})") from None


def secure_channel(config: BrokerClientConfig, *, routed: bool = True) -> grpc.Channel:
    """A channel to the broker's endpoint(s), authenticated both ways. ``routed`` (the default,
    for reading secrets): balanced over the replicas that report SERVING on the routing health
    name. Without it (operator calls to one replica, e.g. a rollback flip during an outage), the
    channel calls the replica whatever it reports."""
    return grpc.secure_channel(*channel_args(config, routed))


def secure_aio_channel(config: BrokerClientConfig, *, routed: bool = True) -> grpc.aio.Channel:
    """The same channel for asyncio code. It reads the certificate files: on a running loop,
    build the arguments in a thread (``channel_args``), as AsyncSecretsClient does."""
    return grpc.aio.secure_channel(*channel_args(config, routed))


def channel_args(
    config: BrokerClientConfig, routed: bool
) -> tuple[str, grpc.ChannelCredentials, list[tuple[str, str | int]]]:
    """The target, credentials (read from the files: blocking I/O) and options of a channel."""
    target = channel_target(config.target)
    options: list[tuple[str, str | int]] = [
        *CHANNEL_OPTIONS,
        ("grpc.service_config", SERVICE_CONFIG if routed else UNROUTED_SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
    ]
    server_name = config.server_name or _address_list_host(target)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = channel_credentials(config.ca_file, config.cert_file, config.key_file)
    return target, credentials, options


def _address_list_host(target: str) -> str | None:
    """For "ipv4:a:1,b:2", the name to check in the brokers' certificates: gRPC would check
    the whole list, which no certificate names. It is the first address's host (loopback in
    dev); brokers on several hosts should share a name in their certificates and give it as
    server_name (SECRETBROKER_SERVER_NAME)."""
    scheme, _, addresses = target.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host = addresses.split(",")[0].rpartition(":")[0]
    return host.strip("[]")
