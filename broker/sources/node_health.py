"""What a Vault node said about itself at the last health probe."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeRole(enum.Enum):
    UNKNOWN = "unknown"
    """Not probed yet, or not reachable at the last probe."""
    ACTIVE = "active"
    STANDBY = "standby"
    SEALED = "sealed"
    UNINITIALIZED = "uninitialized"


# /sys/health's status codes (OpenBao and Vault document the same ones).
_ROLE_BY_STATUS = {
    200: NodeRole.ACTIVE,
    429: NodeRole.STANDBY,
    473: NodeRole.STANDBY,  # performance standby
    503: NodeRole.SEALED,
    501: NodeRole.UNINITIALIZED,
}


@dataclass(frozen=True)
class NodeHealth:
    address: str
    reachable: bool
    role: NodeRole

    @property
    def usable(self) -> bool:
        return self.reachable and self.role in (NodeRole.ACTIVE, NodeRole.STANDBY)


def role_of_status(status: int) -> NodeRole:
    return _ROLE_BY_STATUS.get(status, NodeRole.UNKNOWN)
