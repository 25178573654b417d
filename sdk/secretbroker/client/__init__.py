"""The broker's client SDK: the one way any workload talks to the secrets broker.

Depends on grpcio and the generated ``secretbroker.v1`` only::

    config = BrokerClientConfig.from_env(os.environ)       # SECRETBROKER_ADDR, _CA_FILE, ...
    with SecretsClient(config) as client:
        live = LiveSecrets(client, ["media-catalog/api"])  # kept current by WatchSecrets
        live.wait_ready(timeout=10)
        key = live.get_secret("media-catalog/api").data["jwt_secret"]

``secure_channel`` opens a channel of your own (e.g. for the admin service).
"""

from secretbroker.client._backoff import Backoff
from secretbroker.client._channel import (
    ROUTING_HEALTH_SERVICE,
    channel_credentials,
    secure_aio_channel,
    secure_channel,
)
from secretbroker.client._client import (
    GET_SECRET,
    Secret,
    SecretLookup,
    SecretsClient,
    SecretSource,
    SecretUnavailable,
    secret_from_message,
)
from secretbroker.client._config import (
    ENV_PREFIX,
    BrokerClientConfig,
    ClientConfigError,
    channel_target,
)
from secretbroker.client._files import FileStamp, file_stamps
from secretbroker.client._live import RESUME_BACKOFF, LiveSecrets
from secretbroker.client._retry import RetryInterceptor, RetryPolicy

__all__ = [
    "ENV_PREFIX",
    "GET_SECRET",
    "RESUME_BACKOFF",
    "ROUTING_HEALTH_SERVICE",
    "Backoff",
    "BrokerClientConfig",
    "ClientConfigError",
    "FileStamp",
    "LiveSecrets",
    "RetryInterceptor",
    "RetryPolicy",
    "Secret",
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
