"""Every answer is defined: malformed, oversize and hostile input to every RPC of both services
ends in a status code that names the problem, never UNKNOWN; no client-caused error logs a
traceback; every decision leaves exactly one audit record; the broker stays up. Against a real
broker over real mutual TLS, with raw bytes where the stubs would refuse to send them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretbroker.v1 import broker_pb2
from tests.support import API, OPS_ID, BrokerFactory, Pki, RunningBroker, Vault, get, secure_channel

SERVICE = "/secretbroker.v1.SecretBroker/"
ADMIN = "/secretbroker.v1.SecretBrokerAdmin/"
UNARY = [SERVICE + "GetSecret"] + [
    ADMIN + rpc
    for rpc in ("GetRollbackState", "SetRollbackOverride", "ClearRollbackOverride", "RotateSecret")
]
STREAM = SERVICE + "WatchSecrets"
# Bytes that do not parse: invalid UTF-8 in field 1 (a string in every request that has one),
# a truncated varint, a field of wire type 7 (there is none), a length past the end.
UNPARSABLE = [b"\x0a\x03\xff\xfe\xfd", b"\x10\xff", b"\x0f", b"\x0a\x7fabc"]
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Caller:
    """Raw calls to a running broker, as admin (ops) or not; every one's status and details."""

    def __init__(self, broker: RunningBroker, pki: Pki) -> None:
        self.broker = broker
        self._channels = {
            admin: secure_channel(broker.port, pki.ca, pki.ops if admin else pki.catalog)
            for admin in (True, False)
        }

    def call(self, method: str, request: bytes) -> tuple[grpc.StatusCode, str]:
        channel = self._channels[method.startswith(ADMIN)]
        try:
            if method == STREAM:
                for _ in channel.unary_stream(method, None, None)(request, timeout=10):
                    break  # a first value: the stream works; the test ends it
                return grpc.StatusCode.OK, ""
            channel.unary_unary(method, None, None)(request, timeout=10)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""

    def audit_records(self) -> int:
        return len(self.broker.audit_lines())


@pytest.fixture
def caller(
    vault: Vault, pki: Pki, start_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> Iterator[Caller]:
    caplog.set_level(logging.DEBUG)
    broker = start_broker(vault, access={"spiffe://media.local/catalog": ["*"], OPS_ID: ["*"]})
    yield Caller(broker, pki)
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, f"client-caused errors logged tracebacks: {tracebacks[0].getMessage()}"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert get(broker.stub(pki.catalog, pki.ca), API).name == API, "the broker stays up"


def hostile_requests() -> list[tuple[str, bytes]]:
    many = [f"c{i}" for i in range(10_000)]
    long_name = "a/" * 50_000
    requests: list[tuple[str, bytes]] = [(m, raw) for m in [*UNARY, STREAM] for raw in UNPARSABLE]
    requests += [
        (UNARY[0], broker_pb2.GetSecretRequest(name=long_name).SerializeToString()),
        (UNARY[0], broker_pb2.GetSecretRequest(name=API, version=-1).SerializeToString()),
        (UNARY[0], broker_pb2.GetSecretRequest(name=API, version=2**62).SerializeToString()),
        (UNARY[0], broker_pb2.GetSecretRequest(name="a\u202eb\u2028").SerializeToString()),
        (UNARY[0], b""),
        (STREAM, broker_pb2.WatchSecretsRequest().SerializeToString()),
        (STREAM, broker_pb2.WatchSecretsRequest(names=many).SerializeToString()),
        (STREAM, broker_pb2.WatchSecretsRequest(names=[long_name]).SerializeToString()),
        (STREAM, broker_pb2.WatchSecretsRequest(names=[API, "x\n"]).SerializeToString()),
        (
            ADMIN + "SetRollbackOverride",
            broker_pb2.SetRollbackOverrideRequest(
                vault_enabled_categories=many
            ).SerializeToString(),
        ),
        (
            ADMIN + "SetRollbackOverride",
            broker_pb2.SetRollbackOverrideRequest(
                vault_enabled_categories=["x" * 100_000]
            ).SerializeToString(),
        ),
        (
            ADMIN + "RotateSecret",
            broker_pb2.RotateSecretRequest(name=long_name).SerializeToString(),
        ),
        (ADMIN + "RotateSecret", broker_pb2.RotateSecretRequest(name="").SerializeToString()),
        (ADMIN + "RotateSecret", broker_pb2.RotateSecretRequest(name=API).SerializeToString()),
    ]
    return requests


def test_every_rpc_answers_hostile_input_with_a_defined_status_and_one_audit_record(
    caller: Caller,
) -> None:
    for method, raw in hostile_requests():
        before = caller.audit_records()

        code, details = caller.call(method, raw)

        assert code in DEFINED, f"{method} answered {code.name}: {details}"
        assert len(details) < 1000, f"{method} echoed {len(details)} characters"
        assert caller.audit_records() == before + 1, f"{method}: one record per decision"


def test_unparsable_requests_are_invalid_argument_audited_and_counted(caller: Caller) -> None:
    code, details = caller.call(UNARY[0], UNPARSABLE[0])

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "request does not parse as a GetSecretRequest"
    last = json.loads(caller.broker.audit_lines()[-1])
    assert last["decision"] == "deny"
    assert last["identity"] == "spiffe://media.local/catalog"
    assert last["reason"].startswith("INVALID_ARGUMENT: request does not parse")
    _, metrics = caller.broker.scrape()
    assert 'secretbroker_unparsable_requests_total{method="GetSecret"} 1.0' in metrics


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.text(max_size=300),
    raw=st.binary(max_size=64),
    version=st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1)),
)
def test_any_name_version_or_bytes_get_a_defined_answer_and_one_record(
    caller: Caller, name: str, raw: bytes, version: int | None
) -> None:
    try:
        request = broker_pb2.GetSecretRequest(name=name, version=version).SerializeToString()
    except ValueError:  # names with lone surrogates cannot be encoded: send them as bytes
        request = b"\x0a" + bytes([len(name.encode("utf-8", "surrogatepass")) % 128])
    for method, body in ((UNARY[0], request), (UNARY[0], raw), (STREAM, raw)):
        before = caller.audit_records()

        code, details = caller.call(method, body)

        assert code in DEFINED, f"{method} answered {code.name}: {details}"
        assert caller.audit_records() == before + 1
