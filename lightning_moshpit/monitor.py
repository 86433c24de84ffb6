"""Reading a swarm's state from the DHT: who trains, how fast, at which global step, and with what loss.

Every training peer already publishes a *progress record*: hivemind's ``ProgressTracker`` stores a
``LocalTrainingProgress`` (peer id, local epoch = global step, samples accumulated towards the next step, samples/s,
client mode) under the DHT key ``f"{run_id}_progress"``, one signed subkey per peer. Nobody else has to train to read
them: any DHT peer that joins the swarm (even in client mode) can ``get`` that key.

Loss is not part of hivemind's record, so this module adds a second, equally signed record under
``f"{run_id}_metrics"`` (:class:`PeerMetrics`, written by :func:`publish_metrics` or :class:`MetricsPublisher`).
Both keys are *signed*: the subkey holds the writer's RSA public key and the value carries its signature, so one peer
cannot overwrite another's numbers. A reader must install the same validators (:func:`add_monitor_validators`) or the
values cannot be decoded.

:func:`read_swarm` turns both records into one :class:`SwarmSnapshot`; :class:`SwarmMonitor` polls it in a thread,
keeps a history and hands each new snapshot to listeners (a Lightning logger, the dashboard).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Dict, Optional

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.utils import ValueWithExpiration, get_dht_time
from pydantic.v1 import BaseModel, StrictFloat, StrictStr, ValidationError, confloat, conint

from lightning_moshpit.security import implausible_progress

#: Roles a peer can announce in its metrics record; a peer without one counts as "trainer" (or "client").
ROLES = ("trainer", "client", "aux", "monitor")


class PeerMetrics(BaseModel):
    """What a peer adds to its progress record: the last loss it saw and the role it plays."""

    peer_id: bytes
    step: conint(ge=0, strict=True)  # type: ignore[valid-type]
    time: StrictFloat
    loss: Optional[StrictFloat] = None
    samples_per_second: Optional[confloat(ge=0.0, strict=True)] = None  # type: ignore[valid-type]
    target_batch_size: Optional[conint(ge=1, strict=True)] = None  # type: ignore[valid-type]
    role: Optional[StrictStr] = None


class MetricsSchema(BaseModel):
    """DHT schema of ``f"{run_id}_metrics"``: one signed subkey (the writer's public key) per peer."""

    metrics: Dict[BytesWithPublicKey, Optional[PeerMetrics]]


def progress_key(run_id: str) -> str:
    """The DHT key under which hivemind's ProgressTracker keeps every peer's progress."""
    return f"{run_id}_progress"


def metrics_key(run_id: str) -> str:
    """The DHT key under which :func:`publish_metrics` keeps every peer's metrics."""
    return f"{run_id}_metrics"


def add_monitor_validators(dht: hivemind.DHT, run_id: str) -> RSASignatureValidator:
    """Teach ``dht`` to check and decode the signed progress and metrics records of ``run_id``.

    Returns the signature validator, whose ``local_public_key`` is this process's subkey for signed records (hivemind
    uses one RSA key per process, so it is the same key the strategy's ProgressTracker signs with).
    """
    signature_validator = RSASignatureValidator()
    dht.add_validators(
        [
            SchemaValidator(TrainingProgressSchema, prefix=run_id),
            SchemaValidator(MetricsSchema, prefix=run_id),
            signature_validator,
        ]
    )
    return signature_validator


class MetricsPublisher:
    """Publishes this peer's metrics (loss, step, samples/s, role) as a signed DHT record for monitors to read.

    Create it once per DHT (it installs the validators), then call :meth:`publish` as often as you like; each call
    replaces this peer's previous record, which expires ``expiration`` seconds later unless refreshed.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, expiration: float = 60.0) -> None:
        self.dht, self.run_id, self.expiration = dht, run_id, expiration
        self._public_key = add_monitor_validators(dht, run_id).local_public_key
        self._peer_id = dht.peer_id.to_bytes()

    def publish(
        self,
        step: int,
        loss: Optional[float] = None,
        samples_per_second: Optional[float] = None,
        target_batch_size: Optional[int] = None,
        role: Optional[str] = None,
        wait: bool = False,
    ) -> Future:
        """Store the record; with ``wait=False`` (the default) this returns at once and never blocks training.

        Returns the store's future (``True`` once stored), for callers that want to wait later.
        """
        if role is not None and role not in ROLES:
            raise ValueError(f"`role` must be one of {ROLES}, got {role!r}")
        record = PeerMetrics(
            peer_id=self._peer_id,
            step=int(step),
            time=float(get_dht_time()),
            loss=None if loss is None or not math.isfinite(loss) else float(loss),
            samples_per_second=None if samples_per_second is None else float(samples_per_second),
            target_batch_size=None if target_batch_size is None else int(target_batch_size),
            role=role,
        )
        future = self.dht.store(
            key=metrics_key(self.run_id),
            subkey=self._public_key,
            value=record.dict(),
            expiration_time=get_dht_time() + self.expiration,
            return_future=True,
        )
        if wait:
            future.result(timeout=self.expiration)
        return future


_publishers: dict[tuple[int, str], MetricsPublisher] = {}


def publish_metrics(dht: hivemind.DHT, run_id: str, metrics: Mapping[str, Any], expiration: float = 60.0) -> None:
    """One-call form of :class:`MetricsPublisher`: ``publish_metrics(dht, "my_run", {"step": 3, "loss": 0.7})``.

    Accepted keys are :meth:`MetricsPublisher.publish`'s arguments (``step`` is required).
    """
    publisher = _publishers.get((id(dht), run_id))
    if publisher is None or publisher.dht is not dht:
        publisher = _publishers[(id(dht), run_id)] = MetricsPublisher(dht, run_id, expiration)
    if "step" not in metrics:
        raise ValueError(f"`metrics` must contain 'step' (the global step), got keys {sorted(metrics)}")
    publisher.publish(**dict(metrics))


@dataclasses.dataclass
class PeerState:
    """One peer as a monitor sees it."""

    peer_id: str
    step: int
    samples_accumulated: int
    samples_per_second: float
    client_mode: bool
    role: str
    loss: Optional[float]
    last_seen: float


@dataclasses.dataclass
class SwarmSnapshot:
    """The swarm at one moment: its peers and the numbers derived from them."""

    run_id: str
    time: float
    peers: list[PeerState]
    target_batch_size: Optional[int]

    @property
    def global_step(self) -> int:
        """The highest step a training peer reports (peers behind it catch up by downloading the state).

        Auxiliary peers follow the trainers and may count a step a moment early, so they only count when no trainer
        reports.
        """
        trainers = [peer.step for peer in self.peers if peer.role != "aux"]
        return max(trainers or [peer.step for peer in self.peers], default=0)

    @property
    def samples_accumulated(self) -> int:
        """Samples gathered towards the next global step by the peers that are at the current one."""
        return sum(p.samples_accumulated for p in self.peers if p.step == self.global_step)

    @property
    def samples_per_second(self) -> float:
        return sum(peer.samples_per_second for peer in self.peers)

    @property
    def loss(self) -> Optional[float]:
        """Mean of the losses peers published (None when no peer publishes metrics)."""
        losses = [peer.loss for peer in self.peers if peer.loss is not None]
        return sum(losses) / len(losses) if losses else None

    @property
    def eta_seconds(self) -> Optional[float]:
        """Seconds until the swarm gathers ``target_batch_size`` samples at the current throughput, if known."""
        if self.target_batch_size is None or self.samples_per_second <= 0:
            return None
        return max(0.0, self.target_batch_size - self.samples_accumulated) / self.samples_per_second

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (used by the dashboard)."""
        return {
            "run_id": self.run_id,
            "time": self.time,
            "global_step": self.global_step,
            "num_peers": len(self.peers),
            "samples_accumulated": self.samples_accumulated,
            "samples_per_second": self.samples_per_second,
            "target_batch_size": self.target_batch_size,
            "eta_seconds": self.eta_seconds,
            "loss": self.loss,
            "peers": [dataclasses.asdict(peer) for peer in self.peers],
        }


def _records(found: Any, model: type[BaseModel]) -> dict[bytes, Any]:
    """Decode ``dht.get(key, latest=True)``'s answer into ``{subkey: model}``, dropping malformed or deleted ones."""
    value = found.value if isinstance(found, ValueWithExpiration) else None
    if not isinstance(value, dict):
        return {}
    records = {}
    for subkey, item in value.items():
        raw = item.value if isinstance(item, ValueWithExpiration) else item
        if raw is None:  # a peer that left stores None
            continue
        try:
            records[subkey] = model.parse_obj(raw)
        except ValidationError:
            continue
    return records


def read_swarm(
    dht: hivemind.DHT, run_id: str, target_batch_size: Optional[int] = None, timeout: float = 10.0
) -> SwarmSnapshot:
    """Fetch both records once and merge them per peer. Needs :func:`add_monitor_validators` on ``dht`` first.

    ``target_batch_size`` (for the ETA) defaults to the value peers publish in their metrics, if any.
    """
    progress_future = dht.get(progress_key(run_id), latest=True, return_future=True)
    metrics_future = dht.get(metrics_key(run_id), latest=True, return_future=True)
    progress: dict[bytes, LocalTrainingProgress] = _records(progress_future.result(timeout=timeout), LocalTrainingProgress)
    metrics: dict[bytes, PeerMetrics] = _records(metrics_future.result(timeout=timeout), PeerMetrics)
    metrics_by_peer = {record.peer_id: record for record in metrics.values()}
    if target_batch_size is None:
        published = [m.target_batch_size for m in metrics.values() if m.target_batch_size]
        target_batch_size = max(published) if published else None
    if target_batch_size is not None:
        # the peers' trackers ignore these records (SwarmProgressTracker): count the swarm as the optimizer does
        progress = {key: record for key, record in progress.items()
                    if implausible_progress(record.samples_accumulated, record.samples_per_second, target_batch_size)
                    is None}  # fmt: skip
    peers: list[PeerState] = []
    for record in progress.values():
        extra = metrics_by_peer.pop(record.peer_id, None)
        peers.append(_peer_state(record.peer_id, record, extra))
    for peer_id, extra in metrics_by_peer.items():  # e.g. auxiliary peers: metrics without progress
        peers.append(_peer_state(peer_id, None, extra))
    peers.sort(key=lambda peer: peer.peer_id)
    return SwarmSnapshot(run_id=run_id, time=time.time(), peers=peers, target_batch_size=target_batch_size)


def _peer_state(peer_id: bytes, progress: Optional[LocalTrainingProgress], extra: Optional[PeerMetrics]) -> PeerState:
    from hivemind.p2p import PeerID

    client_mode = bool(progress.client_mode) if progress is not None else False
    role = extra.role if extra is not None and extra.role else ("client" if client_mode else "trainer")
    sps = progress.samples_per_second if progress is not None else (extra.samples_per_second if extra else None)
    return PeerState(
        peer_id=str(PeerID(peer_id)),
        step=progress.epoch if progress is not None else (extra.step if extra is not None else 0),
        samples_accumulated=progress.samples_accumulated if progress is not None else 0,
        samples_per_second=float(sps or 0.0),
        client_mode=client_mode,
        role=role,
        loss=extra.loss if extra is not None else None,
        last_seen=max(progress.time if progress is not None else 0.0, extra.time if extra is not None else 0.0),
    )


Listener = Callable[[SwarmSnapshot], None]


class SwarmMonitor:
    """Polls :func:`read_swarm` every ``period`` seconds in a daemon thread and keeps the snapshots.

    ``history`` keeps one entry per poll (bounded by ``max_history``); each listener is called with every new snapshot,
    from the monitor thread. A failing poll (e.g. a DHT timeout) is counted in ``errors`` and retried next period.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        period: float = 2.0,
        target_batch_size: Optional[int] = None,
        max_history: int = 10_000,
    ) -> None:
        if period <= 0:
            raise ValueError(f"`period` must be a positive number of seconds, got {period!r}")
        self.dht, self.run_id, self.period = dht, run_id, period
        self.target_batch_size, self.max_history = target_batch_size, max_history
        self.history: list[SwarmSnapshot] = []
        self.listeners: list[Listener] = []
        #: called once by :meth:`stop` after the polling thread ended (e.g. a checkpointer's shutdown)
        self.on_stop: list[Callable[[], None]] = []
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"SwarmMonitor({run_id})", daemon=True)
        add_monitor_validators(dht, run_id)

    @property
    def latest(self) -> Optional[SwarmSnapshot]:
        with self._lock:
            return self.history[-1] if self.history else None

    def snapshots(self) -> list[SwarmSnapshot]:
        with self._lock:
            return list(self.history)

    def poll_once(self) -> SwarmSnapshot:
        snapshot = read_swarm(self.dht, self.run_id, self.target_batch_size, timeout=max(5.0, self.period))
        with self._lock:
            self.history.append(snapshot)
            del self.history[: -self.max_history]
        for listener in list(self.listeners):
            listener(snapshot)
        return snapshot

    def start(self) -> "SwarmMonitor":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while self.on_stop:
            self.on_stop.pop()()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a DHT hiccup must not kill the monitor; the next poll retries
                self.errors += 1
            self._stop.wait(self.period)


class LoggerListener:
    """Writes one row per new global step to a Lightning logger (``CSVLogger``, ``TensorBoardLogger``, ...).

    Columns: ``global_step``, ``peers``, ``samples_per_second``, ``samples_accumulated`` and, when peers publish it,
    ``loss``. ``logger.save()`` runs after each row so the file is readable while the run goes on.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self._last_step: Optional[int] = None

    def __call__(self, snapshot: SwarmSnapshot) -> None:
        # Only forward: when the peer at the highest step leaves, the swarm's step as seen from the records can fall
        # back by one until the others catch up, and a logger's steps must not go back
        if not snapshot.peers or (self._last_step is not None and snapshot.global_step <= self._last_step):
            return
        self._last_step = snapshot.global_step
        row: dict[str, float] = {
            "peers": float(len(snapshot.peers)),
            "samples_per_second": snapshot.samples_per_second,
            "samples_accumulated": float(snapshot.samples_accumulated),
        }
        if snapshot.loss is not None:
            row["loss"] = snapshot.loss
        self.logger.log_metrics(row, step=snapshot.global_step)
        self.logger.save()
