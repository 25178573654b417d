"""Logging set-up for the broker's processes. Log calls never carry secret values or tokens."""

from __future__ import annotations

import logging
import sys

QUIET_LIBRARIES = ("urllib3", "hvac", "grpc")


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
