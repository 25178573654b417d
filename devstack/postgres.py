"""A throwaway PostgreSQL server for the tests, the bench and the dev stack: initdb in a
temporary folder, loopback only, removed when it stops. Runs as the ``postgres`` user when run
as root (the server refuses to run as root)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from devstack.harness import die_with_parent, free_port_pair, stop_process, wait_until


def postgres_bindir() -> Path:
    found = shutil.which("initdb") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return Path(found).parent


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Yields a postgresql:// URL of a fresh server (trust auth: no password)."""
    with _running("trust") as (_, port, _pid):
        yield f"postgresql://catalog@127.0.0.1:{port}/postgres"


@dataclass(frozen=True)
class PasswordedPostgres:
    """A server whose TCP logins need a password (SCRAM), as in production."""

    superuser_url: str
    """The superuser, over the server's Unix socket (trusted): setup and counting only."""
    port: int
    """Its TCP port on 127.0.0.1."""
    pid: int
    """The postmaster's."""

    def pause(self) -> None:
        """Hang the whole server (SIGSTOP to the postmaster and every backend): connections
        are accepted by the kernel, and nothing answers."""
        for pid in [self.pid, *_children(self.pid)]:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in [self.pid, *_children(self.pid)]:
            os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(child) for child in text.split()]
    return []


@contextlib.contextmanager
def running_passworded_postgres() -> Iterator[PasswordedPostgres]:
    with _running("scram-sha-256") as (socket_dir, port, pid):
        yield PasswordedPostgres(
            f"postgresql://catalog@/postgres?host={socket_dir}&port={port}", port, pid
        )


@contextlib.contextmanager
def _running(host_auth: str) -> Iterator[tuple[Path, int, int]]:
    bindir = postgres_bindir()
    # setpriv, not runuser: a change of user clears the parent-death signal, so it is set after
    # (by die_with_parent, as the postgres user), and no wrapper process stays between.
    as_user = (
        ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        if os.geteuid() == 0
        else []
    )
    data = Path(tempfile.mkdtemp(prefix="catalog-pg-"))
    if as_user:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run(  # noqa: S603 - the PostgreSQL binaries found above
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(data / "db"),
            "--auth-local=trust",
            f"--auth-host={host_auth}",
            "-U",
            "catalog",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port_pair()
    server = subprocess.Popen(  # noqa: S603 - the PostgreSQL binaries found above
        [
            *as_user,
            *die_with_parent([str(bindir / "postgres")]),
            "-D",
            str(data / "db"),
            "-k",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"postgresql://catalog@/postgres?host={data}&port={port}"
    try:

        def accepts() -> bool:
            if server.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with code {server.returncode}")
            psycopg.connect(url, connect_timeout=2).close()
            return True

        wait_until(accepts, 30, "PostgreSQL to accept", (psycopg.OperationalError,), 0.1)
        yield data, port, server.pid
    finally:
        # SIGINT: PostgreSQL's fast shutdown, which ends the sessions still open (OpenBao's, a
        # pool's); SIGTERM's smart shutdown would wait for them.
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)
        stop_process(server, timeout=10)
        shutil.rmtree(data, ignore_errors=True)
