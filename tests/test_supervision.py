"""The broker's own failures: a background task that dies is logged CRITICAL with its traceback,
turns the broker NOT_SERVING and ends the process with EXIT_BACKGROUND_TASK_DIED (so its
orchestrator restarts it); a start that fails half-way releases the port; a starting broker
takes no traffic until it holds every declared secret (or warmup_timeout passes); and one
Vault call ends within vault.call_budget however many nodes hang."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.cli import EXIT_BACKGROUND_TASK_DIED
from broker.config import TokenAuth, VaultConfig
from broker.config_loader import parse_config
from broker.errors import SourceUnavailable
from broker.server import Broker
from broker.sources.vault_nodes import VaultNodes
from devstack.harness import free_port_pair, wait_until
from secretbroker.client import ROUTING_HEALTH_SERVICE, channel_credentials
from secretbroker.v1 import broker_pb2_grpc
from tests.support import (
    API,
    DATABASE,
    BrokerFactory,
    Pki,
    RunningBroker,
    Vault,
    Watch,
    broker_settings,
    get,
    status_of,
    write_config,
)

BACKGROUND_TASKS = [
    "event-loop-heartbeat",
    "vault-token-keeper",
    "vault-health-probe",
    "rotation-schedule",
    "watch-version-poller",
    "routing",
]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(broker: RunningBroker, pki: Pki, service: str) -> int:
    """Asked over a plain channel: the SDK's would send nothing to a NOT_SERVING broker."""
    credentials = channel_credentials(pki.ca, pki.catalog.cert, pki.catalog.key)
    with grpc.secure_channel(f"127.0.0.1:{broker.port}", credentials) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        status: int = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status
    return status


def not_serving(broker: RunningBroker, pki: Pki, service: str) -> bool:
    return bool(health_of(broker, pki, service) == NOT_SERVING)


def inject_death(broker: RunningBroker, name: str) -> None:
    """Make the named task's next await raise, as an unexpected error from whatever it awaited
    (a bug, a library's surprise) would."""

    async def inject() -> bool:
        task = next(t for t in broker.broker._tasks if t.get_name() == name)
        waiter = getattr(task, "_fut_waiter", None)  # the future the task is suspended on
        if waiter is None or waiter.done():
            return False
        waiter.set_exception(RuntimeError(f"injected fault in {name}"))
        return True

    def injected() -> bool:
        return bool(broker.run(inject()))

    wait_until(injected, what=f"{name} suspended at an await")


@pytest.mark.parametrize("task", BACKGROUND_TASKS)
def test_a_background_task_that_dies_is_logged_critical_and_takes_the_broker_out_of_service(
    vault: Vault,
    pki: Pki,
    start_broker: BrokerFactory,
    caplog: pytest.LogCaptureFixture,
    task: str,
) -> None:
    broker = start_broker(vault, secrets_={DATABASE: {}, API: {"rotation": {"key": "value"}}})
    assert health_of(broker, pki, ROUTING_HEALTH_SERVICE) == SERVING
    ended = asyncio.run_coroutine_threadsafe(broker.broker.wait(), broker._loop)

    with caplog.at_level(logging.CRITICAL, logger="broker.server"):
        inject_death(broker, task)
        assert ended.result(timeout=10) == task, "wait() ends, naming the task"

    died = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(died) == 1
    assert task in died[0].getMessage()
    assert died[0].exc_info is not None, "with its traceback"
    for service in ("", ROUTING_HEALTH_SERVICE):
        wait_until(functools.partial(not_serving, broker, pki, service))
    status, reason = broker.scrape("/healthz")
    assert (status, reason.strip()) == (503, f"background task {task} died")


def test_a_dead_background_task_ends_the_process_with_its_exit_code(
    vault: Vault, pki: Pki, tmp_path: Path
) -> None:
    """The real process: `serve` exits EXIT_BACKGROUND_TASK_DIED, having closed what it held."""
    config = write_config(tmp_path / "broker.toml", broker_settings(vault, pki))
    program = (
        "import asyncio, sys\n"
        "import broker.server\n"
        "async def dying(self):\n"
        "    await asyncio.sleep(1)\n"
        "    raise RuntimeError('injected fault')\n"
        "broker.server.Broker._beat = dying\n"
        "from broker.cli import main\n"
        f"sys.exit(main(['serve', '--config', {str(config)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == EXIT_BACKGROUND_TASK_DIED, done.stderr[-2000:]
    assert "CRITICAL" in done.stderr
    assert "background task event-loop-heartbeat died" in done.stderr
    assert "RuntimeError: injected fault" in done.stderr, "the traceback"
    assert "broker stopped" in done.stderr


def test_a_start_that_fails_after_the_port_is_bound_releases_the_port(
    vault: Vault, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port_pair()
    settings = broker_settings(vault, pki, listen=f"127.0.0.1:{port}")
    config = parse_config(settings, tmp_path, environ={})

    async def failing_prefetch(self: Broker) -> bool:
        raise RuntimeError("injected fault after the port was bound")

    monkeypatch.setattr(Broker, "_prefetch", failing_prefetch)

    async def start() -> None:
        await Broker(config, environ={}).start()

    with pytest.raises(RuntimeError, match="injected fault"):
        asyncio.run(start())
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # raises if the failed start kept it


def test_a_broker_started_while_vault_hangs_takes_no_calls_until_it_holds_every_secret(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Until it is warm, a client's connection waits in the listen backlog: a client that
    balances over several replicas (health checking or not) sends its calls to the others."""
    private_vault.server.pause()
    try:
        broker = start_broker(private_vault, timeout="500ms")
        status, reason = broker.scrape("/readyz")
        assert (status, reason.split(":")[0]) == (503, "warming up, not taking calls yet")
        stub = broker.stub(pki.catalog, pki.ca)
        assert status_of(lambda: get(stub, API, timeout=1)) == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        private_vault.server.resume()
    wait_until(lambda: health_of(broker, pki, ROUTING_HEALTH_SERVICE) == SERVING, timeout=30)
    assert not get(stub, API).stale
    assert broker.scrape("/readyz")[0] == 200


def test_a_broker_that_cannot_warm_up_takes_traffic_after_warmup_timeout(
    private_vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """A fleet started during a Vault outage still serves what it can (here: nothing from Vault,
    but every env-served secret)."""
    private_vault.server.pause()
    try:
        broker = start_broker(
            private_vault,
            environ={"MEDIA_CATALOG_DATABASE_VALUE": "v", "MEDIA_CATALOG_DATABASE_OTHER": "o"},
            timeout="500ms",
            server={"warmup_timeout": "1s"},
        )
        broker.run(_flip_database_to_env(broker.broker))
        wait_until(lambda: health_of(broker, pki, ROUTING_HEALTH_SERVICE) == SERVING)
        assert get(broker.stub(pki.catalog, pki.ca), DATABASE).data["value"] == "v"
    finally:
        private_vault.server.resume()


async def _flip_database_to_env(broker: Broker) -> None:
    await broker.rollback.commit(broker.rollback.plan_set(["api"], by="test"))


class HungNode:
    """A TCP listener that accepts and never answers: a black-holed or SIGSTOPped Vault node
    (the kernel completes the handshake; nothing reads). Counts the connections it got."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.address = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self._socket.accept()[0])

    def close(self) -> None:
        for connection in self.accepted:
            connection.close()
        self._socket.close()


@pytest.fixture
def hung_nodes() -> Iterator[list[HungNode]]:
    nodes = [HungNode() for _ in range(3)]
    yield nodes
    for node in nodes:
        node.close()


def test_a_vault_call_meeting_hung_nodes_ends_within_its_budget_not_a_timeout_per_node(
    hung_nodes: list[HungNode],
) -> None:
    config = VaultConfig(
        addresses=tuple(node.address for node in hung_nodes),
        auth=TokenAuth(),
        timeout=1.0,
        call_budget=1.5,
    )
    nodes = VaultNodes(config)
    try:
        with pytest.raises(SourceUnavailable):
            nodes.call("read", "a read", lambda client: client.sys.read_health_status())
    finally:
        nodes.close()
    tried = sum(len(node.accepted) for node in hung_nodes)
    assert tried == 2, "the first node took a whole timeout, the second the rest of the budget"


def test_logging_never_waits_on_a_stderr_pipe_nobody_reads(tmp_path: Path) -> None:
    """Log calls hand their record to a writer thread: 50,000 of them into a pipe whose reader
    never reads return at once; what the full queue cannot take is dropped and counted."""
    program = (
        "import logging, os, sys\n"
        "from broker.observe.logs import configure_logging, dropped_log_records\n"
        "read_end, write_end = os.pipe()\n"
        "configure_logging('INFO', 'text', os.fdopen(write_end, 'w'))\n"
        "for n in range(50_000):\n"
        "    logging.getLogger('broker.test').info('line %d of a log nobody reads', n)\n"
        "print(dropped_log_records(), flush=True)\n"
        "os._exit(0)\n"  # the writer thread is stuck in write(2) for good
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < 50_000


def test_a_stopping_broker_ends_watch_streams_unavailable_not_cancelled(
    vault: Vault, pki: Pki, start_broker: BrokerFactory
) -> None:
    """Clients resume a stream that ends UNAVAILABLE; CANCELLED is not retryable."""
    broker = start_broker(vault)
    credentials = channel_credentials(pki.ca, pki.catalog.cert, pki.catalog.key)
    with grpc.secure_channel(f"127.0.0.1:{broker.port}", credentials) as channel:
        watch = Watch(broker_pb2_grpc.SecretBrokerStub(channel), [API])
        assert watch.next().name == API
        stopping = threading.Thread(target=broker.stop, kwargs={"delay": 0.2, "grace": 5})
        stopping.start()
        with pytest.raises(grpc.RpcError) as ended:
            watch.next()
        stopping.join(timeout=30)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (ended.value.details() or "")
