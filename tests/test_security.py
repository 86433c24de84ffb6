"""Private swarms and record validation, without peers: the secret, the HMAC checks, the validators and the bound."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any
from unittest import mock

import pytest
from hivemind.averaging.averager import DecentralizedAverager
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, dht_pb2
from hivemind.utils import MSGPackSerializer, ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.optimizer import SwarmProgressTracker
from lightning_moshpit.security import (
    PLAUSIBLE_TARGET_FACTOR,
    PrivateGradientAverager,
    SecretAuthorizer,
    SecretRecordValidator,
    SwarmSecret,
    gather_is_authentic,
    implausible_progress,
    resolve_swarm_secret,
    unwrap_gather,
    wrap_gather,
)

SECRET = "correct-horse-battery-staple"
PEER_A = PeerID.from_base58("QmQNbAKVBXMHicxrgxwufHKSCSnTRJfwgwhcdqL2z3xhm4")
PEER_B = PeerID.from_base58("Qmbp8wxAKT1d94sqoLgxK7gL9uqDWuQ9T3NbhN9w28z3sp")


# ---------------------------------------------------------------------------------------------------- the secret
def test_no_secret_means_an_open_swarm() -> None:
    with mock.patch.dict(os.environ, {}, clear=True):
        assert resolve_swarm_secret(None) is None


def test_the_environment_variable_is_read_when_the_argument_is_left_out() -> None:
    with mock.patch.dict(os.environ, {"MOSHPIT_SWARM_SECRET": SECRET}):
        from_env = resolve_swarm_secret(None)
    assert from_env is not None
    assert from_env.tag(b"x") == SwarmSecret(SECRET).tag(b"x")


@pytest.mark.parametrize("bad", ["short", " " + SECRET, SECRET + "\n", "tab\there-but-long-enough"])
def test_a_bad_secret_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="`swarm_secret` must be at least 16 printable characters") as error:
        resolve_swarm_secret(bad)
    assert bad.strip() not in str(error.value)
    with mock.patch.dict(os.environ, {"MOSHPIT_SWARM_SECRET": bad}):
        with pytest.raises(ValueError, match="MOSHPIT_SWARM_SECRET"):
            resolve_swarm_secret(None)


def test_a_secret_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="`swarm_secret` must be a string"):
        resolve_swarm_secret(12345678901234567890)  # type: ignore[arg-type]


def test_the_secret_never_shows_in_repr_or_in_the_strategy() -> None:
    secret = SwarmSecret(SECRET)
    assert SECRET not in repr(secret) and SECRET not in str(secret)
    strategy = MoshpitStrategy(swarm_secret=SECRET)
    assert strategy.private
    assert SECRET not in repr(vars(strategy))


def test_a_private_swarm_refuses_a_custom_gradient_averager() -> None:
    with pytest.raises(ValueError, match="`grad_averager_factory` cannot be combined with `swarm_secret`"):
        MoshpitStrategy(swarm_secret=SECRET, grad_averager_factory=object)


def test_tags_depend_on_secret_label_and_part_boundaries() -> None:
    secret, other = SwarmSecret(SECRET), SwarmSecret(SECRET + "!")
    tag = secret.tag(b"join", b"ab", b"c")
    assert secret.verify(tag, b"join", b"ab", b"c")
    assert not other.verify(tag, b"join", b"ab", b"c")
    assert not secret.verify(tag, b"record", b"ab", b"c")  # a tag made for one purpose is useless for another
    assert not secret.verify(tag, b"join", b"a", b"bc")
    assert not secret.verify(tag.hex(), b"join", b"ab", b"c")  # not bytes: refused, not an exception


# --------------------------------------------------------------------------------------------------- DHT records
def _record(value: bytes = b"payload", subkey: bytes = b"sub") -> DHTRecord:
    return DHTRecord(key=b"run_progress", subkey=subkey, value=value, expiration_time=get_dht_time() + 30)


def test_a_record_tagged_with_the_secret_is_accepted_and_stripped_back() -> None:
    validator = SecretRecordValidator(SwarmSecret(SECRET))
    record = _record()
    signed = dataclasses.replace(record, value=validator.sign_value(record))
    assert signed.value != record.value
    assert validator.validate(signed)
    assert validator.strip_value(signed) == record.value


def test_records_without_a_valid_tag_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = SecretRecordValidator(SwarmSecret(SECRET)), SecretRecordValidator(SwarmSecret("another-secret-123"))
    progress = LocalTrainingProgress(peer_id=PEER_B.to_bytes(), epoch=3, samples_accumulated=10, samples_per_second=1.0,
                                     time=get_dht_time(), client_mode=False)  # fmt: skip
    record = _record(MSGPackSerializer.dumps(progress.dict()))
    foreign = dataclasses.replace(record, value=theirs.sign_value(record))
    genuine = dataclasses.replace(record, value=ours.sign_value(record))
    tampered = dataclasses.replace(genuine, value=genuine.value.replace(b"\x03", b"\x04", 1))
    moved = dataclasses.replace(genuine, subkey=b"another subkey")  # a tag is bound to its key, subkey and expiry
    with caplog.at_level(logging.WARNING):
        assert [ours.validate(r) for r in (record, foreign, genuine, tampered, moved)] == [False, False, True, False,
                                                                                           False]  # fmt: skip
    assert PEER_B.to_base58() in caplog.text  # the warning names the peer the record claims to come from


def test_the_secret_tag_wraps_hiveminds_signed_schema_records() -> None:
    """Composite order: schema, then RSA signature, then our tag; validation in reverse; other secrets fail."""
    private_key = RSAPrivateKey()
    rsa = RSASignatureValidator(private_key)
    validators = CompositeValidator([SchemaValidator(TrainingProgressSchema, prefix="run"), rsa,
                                     SecretRecordValidator(SwarmSecret(SECRET))])  # fmt: skip
    strangers = CompositeValidator([SchemaValidator(TrainingProgressSchema, prefix="run"), RSASignatureValidator(),
                                    SecretRecordValidator(SwarmSecret("another-secret-123"))])  # fmt: skip
    from hivemind.dht.routing import DHTID

    progress = LocalTrainingProgress(peer_id=PEER_A.to_bytes(), epoch=0, samples_accumulated=1, samples_per_second=1.0,
                                     time=get_dht_time(), client_mode=False)  # fmt: skip
    record = DHTRecord(key=DHTID.generate(source="run_progress").to_bytes(), subkey=MSGPackSerializer.dumps(rsa.local_public_key),
                       value=MSGPackSerializer.dumps(progress.dict()), expiration_time=get_dht_time() + 30)  # fmt: skip
    signed = dataclasses.replace(record, value=validators.sign_value(record))
    assert validators.validate(signed)
    assert validators.strip_value(signed) == record.value
    assert not strangers.validate(signed)


# -------------------------------------------------------------------------------------------------- DHT requests
def test_dht_requests_are_accepted_only_from_holders_of_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> list[bool]:
        secret = SwarmSecret(SECRET)
        client = SecretAuthorizer(secret, PEER_A.to_base58(), RSAPrivateKey())
        server = SecretAuthorizer(secret, PEER_B.to_base58(), RSAPrivateKey())
        outsider = SecretAuthorizer(SwarmSecret("a-guess-that-is-wrong"), "QmOutsiderClaimedId", RSAPrivateKey())
        good, bad, replay = dht_pb2.PingRequest(), dht_pb2.PingRequest(), dht_pb2.PingRequest()
        await client.sign_request(good, None)
        await outsider.sign_request(bad, None)
        replay.CopyFrom(good)
        return [await server.validate_request(good), await server.validate_request(bad),
                await server.validate_request(replay), await server.validate_request(dht_pb2.PingRequest())]  # fmt: skip

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(scenario()) == [True, False, False, False]
    assert "QmOutsiderClaimedId" in caplog.text and "<no token>" in caplog.text


# ------------------------------------------------------------------------------------------------------ averaging
def _serialized_gather(payload: Any) -> bytes:
    """What hivemind's averager sends as ``gather``: [bandwidth, mode, serialized user data]."""
    return MSGPackSerializer.dumps([100.0, 0, MSGPackSerializer.dumps(payload)])


def test_a_join_tag_is_valid_only_for_its_own_peer_and_secret() -> None:
    secret = SwarmSecret(SECRET)
    gathered = _serialized_gather(wrap_gather(secret, PEER_A, 7))
    assert gather_is_authentic(secret, PEER_A, gathered)
    assert not gather_is_authentic(secret, PEER_B, gathered)  # replayed by another peer: refused
    assert not gather_is_authentic(SwarmSecret("another-secret-123"), PEER_A, gathered)
    assert not gather_is_authentic(secret, PEER_A, _serialized_gather(7))  # a stock hivemind peer
    assert not gather_is_authentic(secret, PEER_A, b"\xc1garbage")
    assert unwrap_gather(MSGPackSerializer.loads(MSGPackSerializer.loads(gathered)[2])) == 7


def test_a_leader_refuses_a_join_request_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    averager = PrivateGradientAverager.__new__(PrivateGradientAverager)  # only the refusal path runs: no process
    averager.swarm_secret = SwarmSecret(SECRET)
    from lightning_moshpit.security import _Warner

    averager._refusals = _Warner()
    averager._parent_pid = -1  # hivemind's __del__ shuts down only averagers this process started
    forged = wrap_gather(SwarmSecret("a-guess-that-is-wrong"), PEER_B, None)
    request = averaging_pb2.JoinRequest(gather=_serialized_gather(forged), group_key="run_grad_averager.0b")
    context = P2PContext(handle_name="join", local_id=PEER_A, remote_id=PEER_B)

    async def answers() -> list[averaging_pb2.MessageFromLeader]:
        return [message async for message in averager.rpc_join_group(request, context)]

    with caplog.at_level(logging.WARNING):
        messages = asyncio.run(answers())
    assert [message.code for message in messages] == [averaging_pb2.PROTOCOL_VIOLATION]
    assert f"join request from peer {PEER_B.to_base58()}" in caplog.text


def test_the_state_is_served_only_to_a_peer_that_proved_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    from lightning_moshpit.security import PrivateTrainingStateAverager, _Warner

    averager = PrivateTrainingStateAverager.__new__(PrivateTrainingStateAverager)  # the RPC handlers only: no process
    averager.swarm_secret, averager._refusals, averager._proven_until = SwarmSecret(SECRET), _Warner(), {}
    averager._parent_pid = -1  # hivemind's __del__ shuts down only averagers this process started
    served = [averaging_pb2.DownloadData(metadata=b"state")]

    async def stock_download(*_: Any) -> Any:  # what hivemind's rpc_download_state would stream
        for message in served:
            yield message

    def proof(secret: str, peer: PeerID) -> averaging_pb2.JoinRequest:
        return averaging_pb2.JoinRequest(gather=_serialized_gather(wrap_gather(SwarmSecret(secret), peer, None)))

    async def prove_then_download(secret: str, peer: PeerID) -> tuple[int, list]:
        context = P2PContext(handle_name="state", local_id=PEER_A, remote_id=peer)
        reply = await averager.rpc_prove_membership(proof(secret, peer), context)
        request = averaging_pb2.DownloadRequest()
        return reply.code, [message async for message in averager.rpc_download_state(request, context)]

    async def download_without_proof(peer: PeerID) -> list:
        context = P2PContext(handle_name="state", local_id=PEER_A, remote_id=peer)
        return [message async for message in averager.rpc_download_state(averaging_pb2.DownloadRequest(), context)]

    with mock.patch.object(DecentralizedAverager, "rpc_download_state", stock_download), caplog.at_level(logging.WARNING):
        assert asyncio.run(download_without_proof(PEER_B)) == []
        assert f"Refused a state download by peer {PEER_B.to_base58()}" in caplog.text
        assert asyncio.run(prove_then_download("a-guess-that-is-wrong", PEER_B)) == (averaging_pb2.PROTOCOL_VIOLATION, [])
        assert asyncio.run(prove_then_download(SECRET, PEER_B)) == (averaging_pb2.ACCEPTED, served)
        averager._proven_until[PEER_B] = time.monotonic() - 1.0  # PROOF_LIFETIME has passed: prove again first
        assert asyncio.run(download_without_proof(PEER_B)) == []
        # a tag made for another peer id proves nothing for this connection's peer
        context = P2PContext(handle_name="state", local_id=PEER_A, remote_id=PEER_A)
        stolen = averaging_pb2.JoinRequest(gather=_serialized_gather(wrap_gather(SwarmSecret(SECRET), PEER_B, None)))
        assert asyncio.run(averager.rpc_prove_membership(stolen, context)).code == averaging_pb2.PROTOCOL_VIOLATION
        assert asyncio.run(download_without_proof(PEER_A)) == []


# ------------------------------------------------------------------------------------------- plausibility bound
@pytest.mark.parametrize(
    ("samples", "speed", "plausible"),
    [(0, 0.0, True), (512, 300.0, True), (PLAUSIBLE_TARGET_FACTOR * 512, 0.0, True),
     (PLAUSIBLE_TARGET_FACTOR * 512 + 1, 0.0, False), (10**9, 100.0, False), (1, 10**9, True),
     (1, 3000.0, True), (1, float("inf"), False), (1, float("nan"), False), (1, -1.0, False)],
)  # fmt: skip
def test_progress_claims_over_the_bound_are_implausible(samples: int, speed: float, plausible: bool) -> None:
    """Absurd counts and malformed throughputs are rejected; a fast honest peer never is (make demo's 3000 samples/s)."""
    assert (implausible_progress(samples, speed, target_batch_size=512) is None) is plausible


class _FakeDHT:
    """Just enough of a DHT for a tracker that is never started."""

    client_mode = False

    def __init__(self) -> None:
        self.peer_id = PEER_A

    def add_validators(self, validators: Any) -> None:
        pass

    def get(self, *args: Any, **kwargs: Any) -> None:
        return None


def _progress(peer: PeerID, samples: int, speed: float = 100.0, epoch: int = 0, age: float = 0.0) -> ValueWithExpiration:
    value = LocalTrainingProgress(peer_id=peer.to_bytes(), epoch=epoch, samples_accumulated=samples,
                                  samples_per_second=speed, time=get_dht_time() - age, client_mode=False)  # fmt: skip
    return ValueWithExpiration(value.dict(), get_dht_time() + 30)


def test_the_tracker_ignores_a_bogus_count_and_names_the_peer(caplog: pytest.LogCaptureFixture) -> None:
    tracker = SwarmProgressTracker(_FakeDHT(), "run", target_batch_size=512, max_refresh_period=0.5, start=False)
    honest = PeerID.from_base58("QmVKDAAjZPKtWtjxgEqhaup3qAn6hYBCWkQK7Htvh24Vno")
    with caplog.at_level(logging.WARNING):
        progress = tracker._parse_swarm_progress_data({b"liar": _progress(PEER_B, 10**9), b"honest": _progress(honest, 100)})
    tracker.global_progress = progress  # what the tracker's thread does with each fetch
    assert progress.num_peers == 2  # the honest peer and this one; not the liar
    assert progress.samples_accumulated == 100
    assert not tracker.ready_to_update_epoch
    assert tracker.implausible_records == 1
    assert PEER_B.to_base58() in caplog.text and "1000000000 samples" in caplog.text


def test_a_record_dated_long_ago_is_extrapolated_by_at_most_the_horizon() -> None:
    """hivemind multiplies (now - record time) by the record's samples/s; an old date must not become many samples."""
    tracker = SwarmProgressTracker(_FakeDHT(), "run", target_batch_size=512, max_refresh_period=0.5, start=False)
    tracker.global_progress = tracker._parse_swarm_progress_data({b"old": _progress(PEER_B, 100, speed=200.0, age=10**6)})
    assert tracker.estimated_samples_accumulated <= 100 + 200.0 * 0.5 + 1e-6
    assert not tracker.ready_to_update_epoch


def test_a_fast_peer_counts_and_adds_at_most_what_is_left_of_the_target() -> None:
    """A peer reporting 10**6 samples/s is a peer, not a liar; its extrapolation stops at the target."""
    tracker = SwarmProgressTracker(_FakeDHT(), "run", target_batch_size=512, max_refresh_period=0.5, start=False)
    progress = tracker._parse_swarm_progress_data({b"fast": _progress(PEER_B, 64, speed=1e6, age=0.4)})
    tracker.global_progress = progress
    assert progress.num_peers == 2 and tracker.implausible_records == 0
    assert tracker.estimated_samples_accumulated == 512
    assert tracker.ready_to_update_epoch


def test_a_timed_out_progress_store_is_one_warning_line_and_other_loop_errors_keep_the_default_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tracker = SwarmProgressTracker(_FakeDHT(), "run", target_batch_size=512, max_refresh_period=0.5, start=False)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING):
            timeout = {"message": "Task exception was never retrieved", "exception": asyncio.TimeoutError()}
            tracker._report_store_timeouts_in_one_line(loop, timeout)
            assert "A progress report to the DHT timed out" in caplog.text and "Traceback" not in caplog.text
            caplog.clear()
            other = {"message": "Task exception was never retrieved", "exception": ValueError("boom")}
            tracker._report_store_timeouts_in_one_line(loop, other)
        assert "boom" in caplog.text and "A progress report" not in caplog.text
    finally:
        loop.close()
