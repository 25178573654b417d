"""The one way to open a channel to the broker: mutual TLS from certificate files."""

from __future__ import annotations

from pathlib import Path

import grpc

from secretbroker.client._config import BrokerClientConfig, ClientConfigError, channel_target

# Reconnect quickly after a broker restart, so retries meet a live connection; notice a broker
# that vanished without closing the connection, for long streams.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


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


def secure_channel(config: BrokerClientConfig) -> grpc.Channel:
    """A channel to the broker's endpoint(s), authenticated both ways."""
    return grpc.secure_channel(*_channel_args(config))


def secure_aio_channel(config: BrokerClientConfig) -> grpc.aio.Channel:
    """The same channel for asyncio code."""
    return grpc.aio.secure_channel(*_channel_args(config))


def _channel_args(
    config: BrokerClientConfig,
) -> tuple[str, grpc.ChannelCredentials, list[tuple[str, str | int]]]:
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    credentials = channel_credentials(config.ca_file, config.cert_file, config.key_file)
    return channel_target(config.target), credentials, options
