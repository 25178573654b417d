"""The broker's client SDK: the one way any workload talks to the secrets broker.

Depends on grpcio and the generated ``secretbroker.v1`` only. Threads::

    config = BrokerClientConfig.from_env(os.environ)       # SECRETBROKER_ADDR, _CA_FILE, ...
    with SecretsClient(config) as client, LiveSecrets(client, ["media-catalog/api"]) as live:
        live.wait_ready(timeout=10)                        # kept current by WatchSecrets
        key = live.get_secret("media-catalog/api").data["jwt_secret"]
        live.on_change(lambda change: print(change.name, change.current.version))

asyncio::

    async with AsyncSecretsClient(config) as client, AsyncLiveSecrets(client, names) as live:
        await live.wait_ready()
        key = live.get_secret("media-catalog/api").data["jwt_secret"]   # no await: memory
        async for change in live.changes():
            ...

Everything the SDK raises is a ``SecretBrokerError``. ``secure_channel`` opens a channel of
your own (e.g. for the admin service).
"""

from secretbroker.client._aio_client import AsyncSecretsClient
from secretbroker.client._aio_live import AsyncLiveSecrets
from secretbroker.client._backoff import Backoff
from secretbroker.client._base import (
    GET_SECRET,
    Secret,
    SecretLookup,
    SecretSource,
    secret_from_message,
)
from secretbroker.client._channel import (
    ROUTING_HEALTH_SERVICE,
    channel_credentials,
    secure_aio_channel,
    secure_channel,
)
from secretbroker.client._client import SecretsClient
from secretbroker.client._config import ENV_PREFIX, BrokerClientConfig, channel_target
from secretbroker.client._errors import (
    ClientConfigError,
    NotReady,
    NotWatched,
    SecretBrokerError,
    SecretUnavailable,
)
from secretbroker.client._files import FileStamp, file_stamps
from secretbroker.client._held import SecretChange
from secretbroker.client._live import RESUME_BACKOFF, LiveSecrets
from secretbroker.client._retry import RetryInterceptor, RetryPolicy, RetrySchedule

__all__ = [
    "ENV_PREFIX",
    "GET_SECRET",
    "RESUME_BACKOFF",
    "ROUTING_HEALTH_SERVICE",
    "AsyncLiveSecrets",
    "AsyncSecretsClient",
    "Backoff",
    "BrokerClientConfig",
    "ClientConfigError",
    "FileStamp",
    "LiveSecrets",
    "NotReady",
    "NotWatched",
    "RetryInterceptor",
    "RetryPolicy",
    "RetrySchedule",
    "Secret",
    "SecretBrokerError",
    "SecretChange",
    "SecretLookup",
    "SecretSource",
    "SecretUnavailable",
    "SecretsClient",
    "channel_credentials",
    "channel_target",
    "file_stamps",
    "secret_from_message",
    "secure_aio_channel",
    "secure_channel",
]
