"""The one harness the dev stack, the tests and the bench share: how a child process starts
(dying with its parent) and stops (terminate, then kill), how to wait for a condition, how a
broker runs as its own process, and how a client is configured for it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from devstack.broker_config import write_broker_config
from devstack.pki import CertFiles
from secretbroker.client import BrokerClientConfig, RetryPolicy

T = TypeVar("T")

DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "TERM", "--")
"""Prefix for a child's argv: util-linux ``setpriv`` asks the kernel to send the child SIGTERM
when its parent dies, then execs the command, so no server is left behind. Nothing runs
between fork and exec but C code: a Python callback in the forked child is unsafe while
gRPC's threads run (the child can deadlock or die before exec). Note that a change of user
clears the death signal: put this prefix after any command that changes user."""


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` prefixed so the child gets SIGTERM when this process dies."""
    return [*DIE_WITH_PARENT, *argv]


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A free port whose successor is free too (OpenBao's dev cluster listener takes port + 1),
    outside the kernel's ephemeral range when it leaves room below it. A port in that range can
    be taken by any outgoing connection between this check and the server's bind: seen on a
    loaded machine, an OpenBao node's cluster port taken while the cluster formed, so the node
    never joined."""
    low = _ephemeral_low()
    for _ in range(200):
        port = (
            random.randrange(LOWEST_PORT, low - 1)  # noqa: S311 - spreading, not a secret
            if low - 1 > LOWEST_PORT
            else _any_free_port(host)
        )
        if _bindable(host, port) and _bindable(host, port + 1):
            return port
    raise RuntimeError("no pair of free ports on loopback")


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _any_free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 10.0) -> int | None:
    """The one terminate-then-kill: SIGTERM (resumed first: a paused process cannot handle
    it), SIGKILL after ``timeout``. Its exit code; None when it was never started."""
    if process is None:
        return None
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = 20.0,
    what: str = "the condition",
    ignoring: tuple[type[Exception], ...] = (),
    interval: float = 0.05,
) -> T:
    """The one wait: until ``condition()`` returns something true (which it returns), at most
    ``timeout`` seconds; exceptions in ``ignoring`` count as not yet. Raises TimeoutError
    naming ``what``. For state that other processes or threads change."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
            if result:
                return result
        except ignoring:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what} ({timeout:g}s)")
        time.sleep(interval)


def broker_command(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m broker ARGS`` run to its end, its output captured: the CLI commands, and a
    ``serve`` expected to exit (a config it refuses). A broker that keeps serving is a
    BrokerProcess."""
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def client_config(
    target: str | Sequence[str],
    ca: Path,
    client: CertFiles,
    deadline: float = 2.0,
    retry: RetryPolicy | None = None,
) -> BrokerClientConfig:
    """The one client config for a broker (or its replicas) the harness runs: the SDK's
    defaults (a 2 s attempt deadline, retries within 10 s) unless given."""
    return BrokerClientConfig(
        target=target if isinstance(target, str) else list(target),
        ca_file=ca,
        cert_file=client.cert,
        key_file=client.key,
        deadline=deadline,
        retry=retry or RetryPolicy(),
    )


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    """GET ``path`` from a broker's metrics listener: status and body."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """One sample of a scrape; None when the series is not there."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return None


class BrokerProcess:
    """``python -m broker serve`` as its own process: the one way the dev stack, the tests and
    the bench run a broker (a test can SIGKILL, SIGSTOP or SIGTERM it).

    ``document`` is its config; its listeners get free loopback ports unless it names ports.
    ``environ``: variables for it besides this process's own (VAULT_* excepted), e.g. the
    values a rollback serves. Its output goes to ``workdir/broker.log``, or with ``to_terminal``
    to this process's own (the dev stack's). ``stalled_stdout``: its standard output is a pipe
    nobody reads, as a log pipeline that stopped would leave it (the audit trail's "-" writes
    there)."""

    def __init__(
        self,
        workdir: Path,
        document: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        stalled_stdout: bool = False,
        to_terminal: bool = False,
        header: str = "",
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        server = dict(document["server"])
        metrics = dict(document.get("metrics", {}))
        for table in (server, metrics):  # a port known before it starts: to call, and to restart
            if str(table.get("listen", ":0")).endswith(":0"):
                table["listen"] = f"127.0.0.1:{free_port_pair()}"
        self.endpoint: str = server["listen"]
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.metrics_endpoint: str = metrics["listen"]
        self.metrics_port = int(self.metrics_endpoint.rsplit(":", 1)[1])
        self.config = write_broker_config(
            workdir / "broker.toml", {**document, "server": server, "metrics": metrics}, header
        )
        self.log_path = None if to_terminal else workdir / "broker.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._environ = dict(environ or {})
        self._stalled_stdout = stalled_stdout

    def start(self) -> BrokerProcess:
        """Start it (again, after a kill: the same ports and config)."""
        env = {key: value for key, value in os.environ.items() if not key.startswith("VAULT_")}
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab")) if self.log_path else None
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                die_with_parent(
                    [sys.executable, "-m", "broker", "serve", "--config", str(self.config)]
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self._stalled_stdout else log,
                stderr=log if self._stalled_stdout else subprocess.STDOUT if log else None,
                env={**env, **self._environ},
                cwd=self.workdir,
            )
        return self

    @property
    def pid(self) -> int:
        return self._running().pid

    def exited(self) -> int | None:
        """Its exit code once it has exited; None while it runs."""
        return self._running().poll()

    def kill(self) -> None:
        """SIGKILL: gone without a goodbye, connections reset."""
        self._running().kill()
        self._running().wait()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM: the graceful shutdown (NOT_SERVING, drain, stop); its exit code."""
        process = self._running()
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def send(self, signum: signal.Signals) -> None:
        """A signal, e.g. SIGHUP (the audit trail reopens its file)."""
        self._running().send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP: hung, connections accepted by the kernel and never answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"the broker in {self.workdir} was not started")
        return self.process

    def stop(self) -> int | None:
        code = stop_process(self.process)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        """GET ``path`` from its metrics listener: status and body."""
        return scrape(self.metrics_port, path)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of a scrape; None when the series is not there."""
        return sample(self.scrape()[1], name, **labels)

    def vault_reads(self) -> float:
        """KV reads this replica has sent to Vault so far (from its /metrics)."""
        return sum(
            found.value
            for family in text_string_to_metric_families(self.scrape()[1])
            for found in family.samples
            if found.name == "secretbroker_vault_requests_total"
            and found.labels.get("operation") == "read"
        )

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")
