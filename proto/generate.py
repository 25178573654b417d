"""Regenerate the Python code for proto/**.proto into the SDK's package, sdk/secretbroker/.

The proto path mirrors the import path (proto/secretbroker/v1/broker.proto is the
module secretbroker.v1.broker_pb2, written to sdk/secretbroker/v1/), so generated files
import each other without rewriting, beside the hand-written client SDK
(sdk/secretbroker/client/). Run from anywhere: ``python proto/generate.py``. CI runs it and
fails when ``git status --porcelain sdk/secretbroker/v1`` shows a difference (the drift check).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
OUT_ROOT = PROTO_ROOT.parent / "sdk"  # the client distribution: secretbroker.v1 ships with the SDK


def main() -> int:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    for package_dir in {OUT_ROOT / Path(s).parent for s in sources}:
        for parent in [package_dir, *package_dir.parents]:
            if parent == OUT_ROOT:
                break
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
            (parent / "py.typed").touch()
    scripts = Path(sys.executable).parent  # mypy-protobuf's plugins sit beside this interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={scripts / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={scripts / 'protoc-gen-mypy_grpc'}",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={OUT_ROOT}",
        f"--mypy_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        f"--mypy_grpc_out={OUT_ROOT}",
        *sources,
    ]
    return int(protoc.main(args))


if __name__ == "__main__":
    sys.exit(main())
