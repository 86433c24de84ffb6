"""Private swarms: a shared secret that every member proves, on every layer an outsider could use to get in.

A swarm started with ``swarm_secret`` admits only peers that hold the same secret. hivemind offers the hooks; this
module fills them with an HMAC (a keyed SHA-256 hash) of the secret, so the secret itself never leaves the process:

1. **DHT requests** (:class:`SecretAuthorizer`, hivemind's ``TokenAuthorizerBase``). Every DHT request and response
   carries an access token: this peer's RSA public key and claimed peer id, tagged with the secret's HMAC. hivemind
   then signs each request with that RSA key and checks nonces and clocks, so a token cannot be replayed by someone
   else. A peer without the secret cannot even bootstrap: its pings are refused and it gets a ``ConnectionError``.
2. **DHT records** (:class:`SecretRecordValidator`, a ``RecordValidatorBase``). Every record this peer stores is
   tagged with an HMAC over (key, subkey, value, expiration); records without a valid tag are dropped when received,
   so an outsider's progress record never counts toward the swarm's batch.
3. **Averaging** (:class:`PrivateAveragerMixin`). Each averager sends an HMAC of its libp2p peer id with its join
   request (inside hivemind's ``gather`` payload). A leader refuses a join request whose tag does not match the
   peer id libp2p authenticated for that connection, and every member checks all its groupmates' tags before it
   sends a single tensor part. This covers an outsider that calls an insider's averager directly, without the DHT.

The secret is a *shared symmetric* key: every member can do everything any member can (see ``docs/security.md``),
and there is no revocation short of restarting the swarm with a new secret.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import time
from typing import Any, AsyncIterator, Optional  # typing's: hivemind's servicer tells streams by typing's name

from hivemind.averaging.averager import DecentralizedAverager
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey

log = logging.getLogger(__name__)

ENV_SWARM_SECRET = "MOSHPIT_SWARM_SECRET"
#: Shortest secret accepted: 16 characters (e.g. ``python -c "import secrets; print(secrets.token_urlsafe(24))"``).
MIN_SECRET_LENGTH = 16
#: Seconds an access token stays valid; peers re-issue theirs a minute before it ends.
TOKEN_LIFETIME = 600.0
#: A refused peer is named in a warning at most once per this many seconds (a refused peer retries often).
WARN_EVERY = 30.0
#: Seconds after proving the secret during which a peer may download another peer's state.
PROOF_LIFETIME = 300.0

_HMAC_FORMAT = b"[moshpit-hmac:_value_]"
_HMAC_RE = re.compile(re.escape(_HMAC_FORMAT).replace(b"_value_", rb"([0-9a-f]{64})"))
_JOIN_TAG = "moshpit_join_tag"


class SwarmSecret:
    """The swarm's shared secret, kept only as an HMAC key; ``repr`` and ``str`` never show it.

    Each use tags a different *label* (``b"dht-token"``, ``b"record"``, ``b"join"``), so a tag made for one purpose is
    never valid for another.
    """

    __slots__ = ("_key",)

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"lightning_moshpit swarm secret v1\x00" + secret.encode()).digest()

    def tag(self, label: bytes, *parts: bytes) -> bytes:
        """HMAC-SHA256 of ``label`` and ``parts`` (length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` differ)."""
        mac = hmac.new(self._key, label, hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()

    def verify(self, tag: Any, label: bytes, *parts: bytes) -> bool:
        """Whether ``tag`` is this secret's tag of ``label`` and ``parts`` (constant-time comparison)."""
        return isinstance(tag, bytes) and hmac.compare_digest(tag, self.tag(label, *parts))

    def __repr__(self) -> str:
        return "SwarmSecret(<hidden>)"

    __str__ = __repr__

    def __getstate__(self) -> bytes:  # hivemind may pickle validators and averagers into child processes
        return self._key

    def __setstate__(self, key: bytes) -> None:
        self._key = key


def resolve_swarm_secret(value: Optional[str]) -> Optional[SwarmSecret]:
    """The argument, else ``MOSHPIT_SWARM_SECRET``, else ``None`` (an open swarm). Errors never echo the secret."""
    source = "swarm_secret"
    if value is None:
        value = os.environ.get(ENV_SWARM_SECRET) or None
        source = ENV_SWARM_SECRET
        if value is None:
            return None
    if not isinstance(value, str):
        raise TypeError(f"`{source}` must be a string (a shared secret) or None, got {type(value).__name__}")
    if len(value) < MIN_SECRET_LENGTH or value != value.strip() or not value.isprintable():
        raise ValueError(
            f"`{source}` must be at least {MIN_SECRET_LENGTH} printable characters without leading or trailing "
            f"spaces (got {len(value)} characters; the value is not shown). Generate one with: "
            f"python -c \"import secrets; print(secrets.token_urlsafe(24))\""
        )
    return SwarmSecret(value)


class _Warner:
    """Logs a refusal once per peer and :data:`WARN_EVERY` seconds: a refused peer retries many times a second."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def warn(self, peer: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(peer, -float("inf")) >= WARN_EVERY:
            self._last[peer] = now
            log.warning(message)


# ---------------------------------------------------------------------------------------------------- DHT requests
class SecretAuthorizer(TokenAuthorizerBase):
    """hivemind's token authorizer with the swarm secret as the authority: a member issues its own token.

    A token names the holder's peer id (a *claim*, used in log messages) and RSA public key, and carries the secret's
    HMAC over both and an expiration time. hivemind signs every request and response with the holder's RSA key and
    rejects replays, so a token seen on the wire is useless without the private key that goes with it.
    """

    def __init__(self, secret: SwarmSecret, peer_id: str, local_private_key: Optional[RSAPrivateKey] = None) -> None:
        super().__init__(local_private_key)
        self.secret, self.peer_id = secret, peer_id
        self._warner = _Warner()

    def _token_tag(self, token: AccessToken) -> bytes:
        return self.secret.tag(b"dht-token", token.username.encode(), token.public_key, token.expiration_time.encode())

    async def get_token(self) -> AccessToken:
        token = AccessToken(
            username=self.peer_id,
            public_key=self.local_public_key.to_bytes(),
            expiration_time=repr(get_dht_time() + TOKEN_LIFETIME),
        )
        token.signature = self._token_tag(token)
        return token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        if not self.secret.verify(access_token.signature, b"dht-token", access_token.username.encode(),
                                  access_token.public_key, access_token.expiration_time.encode()):  # fmt: skip
            return False
        try:
            return float(access_token.expiration_time) > get_dht_time()
        except ValueError:
            return False

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return float(access_token.expiration_time) < get_dht_time() + 60.0

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        valid = await super().validate_request(request)
        if not valid:
            claimed = request.auth.client_access_token.username or "<no token>"
            self._warner.warn(
                claimed,
                f"Refused a DHT request from peer {claimed} (the peer id it claims): it does not prove this swarm's "
                f"secret. A peer without swarm_secret / {ENV_SWARM_SECRET}, or with another one, cannot join.",
            )
        return valid

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        valid = await super().validate_response(response, request)
        if not valid:
            claimed = response.auth.service_access_token.username or "<no token>"
            self._warner.warn(claimed, f"Ignored a DHT response from peer {claimed}: it does not prove this swarm's secret")
        return valid


# ----------------------------------------------------------------------------------------------------- DHT records
class SecretRecordValidator(RecordValidatorBase):
    """Tags every DHT record this peer stores with the secret's HMAC and drops received records without one.

    It has the highest priority, so it signs *last* (over the RSA signature hivemind's signed records already carry)
    and validates *first*: an outsider's record is dropped before anything tries to decode it.
    """

    def __init__(self, secret: SwarmSecret) -> None:
        self.secret = secret
        self._warner = _Warner()

    @staticmethod
    def _parts(record: DHTRecord) -> tuple[bytes, ...]:
        subkey = record.subkey if record.subkey is not None else b""
        return record.key, subkey, record.value, repr(float(record.expiration_time)).encode()

    def sign_value(self, record: DHTRecord) -> bytes:
        tag = self.secret.tag(b"record", *self._parts(record)).hex().encode()
        return record.value + _HMAC_FORMAT.replace(b"_value_", tag)

    def validate(self, record: DHTRecord) -> bool:
        tags = _HMAC_RE.findall(record.value)
        if len(tags) == 1:
            stripped = dataclasses.replace(record, value=self.strip_value(record))
            if self.secret.verify(bytes.fromhex(tags[0].decode()), b"record", *self._parts(stripped)):
                return True
        claimed = _claimed_peer_id(record.value)
        self._warner.warn(claimed, f"Ignored a DHT record from peer {claimed} (the peer id the record claims): it "
                                   f"carries no valid HMAC of this swarm's secret")  # fmt: skip
        return False

    def strip_value(self, record: DHTRecord) -> bytes:
        return _HMAC_RE.sub(b"", record.value)

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator (10): sign after it, validate before it

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def _claimed_peer_id(value: bytes) -> str:
    """Best effort: the ``peer_id`` a progress-like record claims, in base58, else ``"<unknown>"``."""
    try:
        decoded = MSGPackSerializer.loads(_HMAC_RE.sub(b"", value).split(b"[signature:")[0])
        if isinstance(decoded, dict) and isinstance(decoded.get("peer_id"), bytes):
            return PeerID(decoded["peer_id"]).to_base58()
    except Exception:  # an outsider's bytes may be anything; this only picks a name for the log line
        pass
    return "<unknown>"


# ------------------------------------------------------------------------------------------------------- averaging
def join_tag(secret: SwarmSecret, peer_id: PeerID) -> bytes:
    """The proof an averager sends with its join request: the secret's HMAC of its own libp2p peer id."""
    return secret.tag(b"join", peer_id.to_bytes())


def wrap_gather(secret: SwarmSecret, peer_id: PeerID, gather: Any) -> dict:
    """hivemind's per-peer ``gather`` payload with this peer's join tag added (undone by :func:`unwrap_gather`)."""
    return {_JOIN_TAG: join_tag(secret, peer_id), "data": gather}


def unwrap_gather(gathered: Any) -> Any:
    """The original ``gather`` value from a :func:`wrap_gather` payload."""
    return gathered.get("data") if isinstance(gathered, dict) and _JOIN_TAG in gathered else gathered


def gather_is_authentic(secret: SwarmSecret, peer_id: PeerID, serialized_gather: bytes) -> bool:
    """Whether the bytes an averager sent as its ``gather`` (hivemind's ``[bandwidth, mode, user bytes]``) carry a
    valid join tag for ``peer_id``. Malformed bytes are simply not authentic."""
    try:
        _bandwidth, _mode, user_bytes = MSGPackSerializer.loads(serialized_gather)
        payload = MSGPackSerializer.loads(user_bytes)
    except Exception:
        return False
    return isinstance(payload, dict) and secret.verify(payload.get(_JOIN_TAG), b"join", peer_id.to_bytes())


class PrivateAveragerMixin(DecentralizedAverager):
    """Makes a hivemind averager admit only groupmates that prove the swarm secret.

    Put it *after* the averager class: ``class PrivateGradientAverager(GradientAverager, PrivateAveragerMixin)``, so
    that the subclass's ``step`` reaches this class's ``step`` on its way to ``DecentralizedAverager.step``. Pass the
    secret as ``swarm_secret=``.
    """

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        # hivemind names RPC handlers after the class; keep the stock class's name (the first non-private one in the
        # MRO), so that a stock averager's join request reaches our check (and is refused with a warning naming it)
        # instead of failing with "no handler"; a stock averager's state download reaches our gate and gets nothing
        stock = next(base for base in cls.__mro__ if not issubclass(base, PrivateAveragerMixin))
        handle_name = f"{stock.__name__}.{method_name}"
        return f"{namespace}::{handle_name}" if namespace is not None else handle_name

    def __init__(self, *args: Any, swarm_secret: SwarmSecret, **kwargs: Any) -> None:
        self.swarm_secret = swarm_secret
        self._refusals = _Warner()
        self._proven_until: dict[PeerID, float] = {}  # peers that proved the secret, until when (time.monotonic)
        super().__init__(*args, **kwargs)

    def step(self, gather: Any = None, *args: Any, **kwargs: Any) -> Any:
        return super().step(wrap_gather(self.swarm_secret, self.peer_id, gather), *args, **kwargs)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """Refuse (``PROTOCOL_VIOLATION``) a join request without a valid tag for the requester's peer id."""
        if not gather_is_authentic(self.swarm_secret, context.remote_id, request.gather):
            peer = context.remote_id.to_base58()
            self._refusals.warn(peer, f"Refused an averaging join request from peer {peer}: it does not prove this "
                                      f"swarm's secret")  # fmt: skip
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    # -------------------------------------------------------------------------------------------- state downloads
    # hivemind's DownloadRequest is an empty message, so a downloader cannot carry a tag in it. It proves the secret in
    # a separate call first (a JoinRequest whose gather holds its join tag, checked against the peer id libp2p
    # authenticated); a state holder serves its state only to peers that did so in the last PROOF_LIFETIME seconds.
    async def rpc_prove_membership(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> averaging_pb2.MessageFromLeader:
        """Remember for :data:`PROOF_LIFETIME` seconds that the caller holds the secret (``ACCEPTED``), or refuse."""
        if not gather_is_authentic(self.swarm_secret, context.remote_id, request.gather):
            peer = context.remote_id.to_base58()
            self._refusals.warn(peer, f"Peer {peer} failed to prove this swarm's secret before downloading its state")
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        now = time.monotonic()
        self._proven_until = {peer: until for peer, until in self._proven_until.items() if until > now}
        self._proven_until[context.remote_id] = now + PROOF_LIFETIME
        return averaging_pb2.MessageFromLeader(code=averaging_pb2.ACCEPTED)

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """Serve the state (as hivemind does) only to a peer that proved the secret; send nothing to anyone else."""
        if self._proven_until.get(context.remote_id, -float("inf")) < time.monotonic():
            peer = context.remote_id.to_base58()
            self._refusals.warn(peer, f"Refused a state download by peer {peer}: it did not prove this swarm's secret")
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _load_state_from_peers(self, future: Any, timeout: Optional[float] = None) -> None:
        """Prove the secret to every peer that offers its state, then download as hivemind does."""
        try:
            await self._prove_membership_to_state_holders()
        except Exception as error:  # hivemind's download below always resolves the future; never leave it pending
            log.warning(f"Could not prove the swarm secret to the state holders ({error!r}); trying the download anyway")
        await super()._load_state_from_peers(future, timeout=timeout)

    async def _prove_membership_to_state_holders(self) -> None:
        # the same DHT entry hivemind's _load_state_from_peers picks its source from (records there carry the tag)
        holders, _ = self.dht.get(f"{self._matchmaking.group_key_manager.prefix}.all_averagers", latest=True) or ({}, None)
        if not isinstance(holders, dict):
            return  # hivemind's download finds no holder in it either
        peers = [PeerID(peer) for peer in holders if isinstance(peer, bytes) and PeerID(peer) != self.peer_id]
        user_bytes = self.serializer.dumps(wrap_gather(self.swarm_secret, self.peer_id, None))
        request = averaging_pb2.JoinRequest(gather=self.serializer.dumps([0.0, 0, user_bytes]))

        async def prove(peer: PeerID) -> None:
            try:
                stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                await asyncio.wait_for(stub.rpc_prove_membership(request), timeout=self.request_timeout)
            except Exception as error:  # that peer will refuse the download; hivemind then tries the next one
                log.debug(f"Could not prove the swarm secret to {peer}: {error!r}")

        await asyncio.gather(*(prove(peer) for peer in peers))

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        """Check every groupmate's tag before sending any tensor part, then hand back the original gathered data."""
        strangers = [
            peer.to_base58()
            for peer, gathered in zip(group_info.peer_ids, group_info.gathered)
            if not gather_is_authentic(self.swarm_secret, peer, gathered)
        ]
        if strangers:
            for peer in strangers:
                self._refusals.warn(peer, f"Left an averaging group that contains peer {peer}, which does not prove "
                                          f"this swarm's secret")  # fmt: skip
            raise MatchmakingException(f"group contains peers without the swarm secret: {strangers}")
        gathered = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        return {peer: unwrap_gather(value) for peer, value in gathered.items()}


# ------------------------------------------------------------------------------------------- progress plausibility
#: A peer may claim at most this many times ``target_batch_size`` samples toward one global step. An honest peer steps
#: as soon as the swarm reaches the target, so only a peer that trained alone while others joined overshoots it, by at
#: most one local batch.
PLAUSIBLE_TARGET_FACTOR = 2


def implausible_progress(samples_accumulated: int, samples_per_second: float, target_batch_size: int) -> Optional[str]:
    """Why a peer's progress claim cannot be true, or ``None`` if it is plausible.

    A record is rejected only for what no honest peer can send: more than ``PLAUSIBLE_TARGET_FACTOR *
    target_batch_size`` samples toward one step, or a throughput that is not a finite number >= 0. Speed alone is
    never a reason: hivemind measures ``samples_per_second`` on compute time only, so an honest GPU peer (or a small
    model on a CPU) reports thousands of samples per second. What a fast claim can *add* is bounded instead, where it
    is used: :class:`~lightning_moshpit.optimizer.SwarmProgressTracker` extrapolates a record to at most what is left
    of the target. A claim within the bound is accepted even if false (see ``docs/security.md``): the bound stops
    absurd counts, not careful liars, who could claim ``target_batch_size`` samples outright.
    """
    bound = PLAUSIBLE_TARGET_FACTOR * target_batch_size
    if samples_accumulated > bound:
        return f"claims {samples_accumulated} samples toward one step, over the bound {bound}"
    if not 0.0 <= samples_per_second < float("inf"):  # also catches NaN
        return f"claims a throughput of {samples_per_second} samples/s, not a finite number >= 0"
    return None


class PrivateGradientAverager(GradientAverager, PrivateAveragerMixin):
    """hivemind's ``GradientAverager`` that averages only with holders of the swarm secret."""

    _rpc_handlers = None  # collect this class's own handlers and stub
    _stub_type = None


class PrivateTrainingStateAverager(TrainingStateAverager, PrivateAveragerMixin):
    """hivemind's ``TrainingStateAverager`` that averages only with holders of the swarm secret."""

    _rpc_handlers = None
    _stub_type = None
