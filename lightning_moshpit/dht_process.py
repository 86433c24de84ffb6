"""``SwarmDHT``: hivemind's ``DHT`` whose background process survives a request that cannot be unpickled.

Why a subclass? Every call on a ``hivemind.DHT`` (``get``, ``store``, ``run_coroutine``) sends a message to the DHT's
background process through a pipe. The message carries an ``MPFuture``, and pickling that future pickles the caller's
result pipe. Outside a spawning context, ``multiprocessing`` sends such a pipe through the *sender's* resource-sharer
thread: the receiver connects to a Unix socket owned by the sender and asks for the file descriptor. If the sender
exits (or closes its sharer) before the DHT process reads the message, unpickling fails in the DHT process with
``FileNotFoundError``, ``ConnectionResetError`` or ``EOFError``. That happens at every normal teardown: the averager
processes send their last DHT requests and exit a moment later.

hivemind 1.1.12 (``hivemind/dht/dht.py``, ``DHT._run``) handles this badly:

- it logs ``OSError``/``ConnectionError`` with a full traceback and then sleeps ``wait_timeout`` (3 s) before reading
  the next message, so a ``shutdown()`` sent meanwhile is not read within its grace period: "DHT did not shut down
  within the grace period; terminating it the hard way", then "Task was destroyed but it is pending!";
- ``EOFError`` is not caught at all: the DHT process dies mid-run, and the next ``DHT.store`` from the trainer blocks
  forever on a pipe nobody reads (seen in ``benchmarks/resist.py``).

The fix wraps the DHT process's end of the pipe: a message that cannot be unpickled is dropped with a DEBUG line
(its sender is gone, so nobody waits for its answer), and the process goes straight on to the next one.
"""

from __future__ import annotations

import logging
from typing import Any

import hivemind

log = logging.getLogger(__name__)

#: Errors unpickling a request whose sender's resource sharer is gone (see the module docstring).
LOST_SENDER_ERRORS = (EOFError, OSError, ConnectionError)


class _TolerantPipe:
    """The DHT process's end of its request pipe; ``recv`` turns a request from a vanished sender into a no-op."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def recv(self) -> Any:
        try:
            return self._pipe.recv()
        except LOST_SENDER_ERRORS as error:
            log.debug(f"Dropped a DHT request whose sender exited before it was read: {error!r}")
            return ("_ignore_lost_request", [], {})

    def __getattr__(self, name: str) -> Any:  # poll, send, close, fileno: as the wrapped connection
        return getattr(self._pipe, name)


class SwarmDHT(hivemind.DHT):
    """A ``hivemind.DHT`` that drops requests from processes that exited instead of stalling or dying on them."""

    def __init__(self, *args: Any, start: bool = False, await_ready: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, start=False, await_ready=await_ready, **kwargs)
        self._inner_pipe = _TolerantPipe(self._inner_pipe)  # only the DHT process reads it (the process is forked)
        if start:
            self.run_in_background(await_ready=await_ready)

    async def _ignore_lost_request(self) -> None:
        """The no-op that :class:`_TolerantPipe` substitutes for a request that could not be read."""
