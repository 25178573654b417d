"""The one table from broker errors to gRPC status codes."""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from broker.errors import (
    AccessDenied,
    AuditUnavailable,
    BrokerError,
    InvalidRequest,
    LimitExceeded,
    NotApplicable,
    SecretMissingInSource,
    SecretNotDeclared,
    ShuttingDown,
    SourceDenied,
    SourceUnavailable,
    StateUnavailable,
    VersionOutOfRange,
    WriteConflict,
)

STATUS_BY_ERROR: Mapping[type[BrokerError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    AccessDenied: grpc.StatusCode.PERMISSION_DENIED,
    SecretNotDeclared: grpc.StatusCode.NOT_FOUND,
    SecretMissingInSource: grpc.StatusCode.NOT_FOUND,
    SourceUnavailable: grpc.StatusCode.UNAVAILABLE,
    AuditUnavailable: grpc.StatusCode.UNAVAILABLE,
    StateUnavailable: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    # The broker's own Vault policy or credentials are wrong: no caller can fix that.
    SourceDenied: grpc.StatusCode.INTERNAL,
    VersionOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotApplicable: grpc.StatusCode.FAILED_PRECONDITION,
    WriteConflict: grpc.StatusCode.ABORTED,
}


def status_for(error: BrokerError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
