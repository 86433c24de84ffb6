"""``SwarmProgressTracker``'s fetch loop with a stand-in DHT whose lookups are slow (one process, no network).

hivemind's tracker held ``lock_global_progress`` while it waited for the DHT, and the training loop takes that lock to
start every global step, so each step could wait for a network round trip. Ours takes the lock only to parse.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hivemind.p2p import PeerID

from lightning_moshpit.optimizer import SwarmProgressTracker

LOOKUP_SECONDS = 4.0


class SlowLookupDHT:
    """Just enough of a DHT for a started tracker: every background lookup takes :data:`LOOKUP_SECONDS`."""

    client_mode = False
    peer_id = PeerID.from_base58("QmQNbAKVBXMHicxrgxwufHKSCSnTRJfwgwhcdqL2z3xhm4")

    def __init__(self) -> None:
        self.lookup_started = threading.Event()

    def add_validators(self, validators: Any) -> None:
        pass

    def get(self, *args: Any, return_future: bool = False, **kwargs: Any) -> Any:
        if not return_future:
            return None  # the tracker's first, synchronous lookup in __init__

        async def slow_lookup() -> None:
            self.lookup_started.set()
            await asyncio.sleep(LOOKUP_SECONDS)
            return None  # no records: this peer is alone

        return slow_lookup()

    def store(self, *args: Any, return_future: bool = False, **kwargs: Any) -> Any:
        return Stored() if return_future else True


class Stored:
    """An awaitable that is done at once (not a coroutine: shutdown() drops it without awaiting, which is fine)."""

    def __await__(self) -> Iterator[None]:
        if False:  # pragma: no cover - makes this a generator
            yield
        return True


@pytest.fixture
def tracker() -> Iterator[SwarmProgressTracker]:
    # a refresh period far longer than the tests: every lookup in them is one the tracker was asked for, or made due
    tracker = SwarmProgressTracker(SlowLookupDHT(), "run", target_batch_size=512, start=True,
                                   default_refresh_period=60.0, min_refresh_period=60.0, max_refresh_period=60.0)  # fmt: skip
    yield tracker
    tracker.shutdown(timeout=LOOKUP_SECONDS + 5)
    assert tracker.shutdown_complete.is_set(), "the tracker's thread did not stop"


def test_starting_a_global_step_does_not_wait_for_a_dht_lookup_in_flight(tracker: SwarmProgressTracker) -> None:
    dht = tracker.dht
    assert isinstance(dht, SlowLookupDHT)
    tracker.fetched_global_progress_this_epoch.clear()
    tracker.global_progress.next_fetch_time = 0.0
    tracker.global_state_updated.set()  # fetch now
    assert dht.lookup_started.wait(10), "the tracker never looked up the swarm's progress"

    started = time.monotonic()
    with tracker.pause_updates():  # what the optimizer does to move to the next global step
        waited = time.monotonic() - started
    assert waited < LOOKUP_SECONDS / 2, f"pause_updates() waited {waited:.2f} s for the lookup in flight"

    # and the lookup still lands: parsed under the lock once it returns, counted as this step's fetch
    assert tracker.fetched_global_progress_this_epoch.wait(LOOKUP_SECONDS + 5)
    assert tracker.global_progress.num_peers == 0


def test_a_lookup_that_started_before_a_step_is_not_this_steps_fetch(tracker: SwarmProgressTracker) -> None:
    dht = tracker.dht
    assert isinstance(dht, SlowLookupDHT)
    tracker.fetched_global_progress_this_epoch.clear()
    tracker.global_progress.next_fetch_time = 0.0
    tracker.global_state_updated.set()
    assert dht.lookup_started.wait(10)
    with tracker.pause_updates():
        tracker.update_epoch(1)  # this peer steps while the lookup runs
    dht.lookup_started.clear()
    # the stale lookup does not mark step 1 as fetched; a new lookup starts right after it
    assert dht.lookup_started.wait(LOOKUP_SECONDS + 5), "no fresh lookup after the step"
    assert not tracker.fetched_global_progress_this_epoch.is_set()
    assert tracker.global_epoch == 1


def test_a_refresh_is_not_answered_by_a_lookup_that_was_already_in_flight(tracker: SwarmProgressTracker) -> None:
    # a paused peer resumes with a lookup from before the pause in flight; its records must not pass for fresh ones
    dht = tracker.dht
    assert isinstance(dht, SlowLookupDHT)
    tracker.request_refresh()
    assert dht.lookup_started.wait(10)
    dht.lookup_started.clear()
    tracker.request_refresh()  # asked while that lookup runs
    assert dht.lookup_started.wait(LOOKUP_SECONDS + 5), "no fresh lookup after the refresh request"
    assert not tracker.fetched_global_progress_this_epoch.is_set(), "the stale lookup answered the refresh"
    assert tracker.fetched_global_progress_this_epoch.wait(LOOKUP_SECONDS + 5), "the fresh lookup never landed"
