"""Streaming RPCs that deliver their last message: the reader closes a stream, never the writer.

The bug this fixes
------------------
hivemind 1.1.12 runs every streaming RPC (``rpc_join_group``, ``rpc_aggregate_part``, ``rpc_download_state``) over a
libp2p stream that its ``p2pd`` daemon pipes to a Unix socket (``P2P._add_protobuf_stream_handler`` and
``P2P._iterate_protobuf_stream_handler`` in ``hivemind/p2p/p2p_daemon.py``). The server side closes its socket as soon
as its handler returns, and the client reads until it sees the socket close.

``p2pd`` (learning-at-home/go-libp2p-daemon, ``stream.go: doStreamPipe``, on go-libp2p 0.32 / yamux v4) answers that
close with ``Stream.Close()``, which also closes the stream for *reading*. That interrupts the daemon's other pipe
goroutine, which then calls ``Stream.Reset()``. A reset discards whatever the far daemon has received but not yet
handed to its client. So when the server writes its last message and returns at once, that message is lost whenever
the client's daemon is a few milliseconds slow, as it is on a loaded 2-core machine.

What that did to a swarm (measured with DEBUG logs of ``make demo``, 3 peers):

- a leader yielded ``BEGIN_ALLREDUCE`` to a follower and returned; the follower got end-of-stream instead
  (``StopAsyncIteration`` in ``Matchmaking._request_join_group``). The leader ran the all-reduce with that follower in
  its group, so every other member saw its part missing ("sent 0 parts, but we expected 1", "received 85.2%
  results": a *partial* all-reduce), while the follower found no group for that round;
- a reducer's averaged parts never reached a sender ("sent 0 parts, but we expected 3"), 46 ms after the group
  formed.

The protocol here
-----------------
The server sends hivemind's own end-of-stream marker (``P2P.END_OF_STREAM``, the frame clients already send after
their last request) after its handler's last response, then keeps the socket open until the client closes it
(bounded by :data:`LINGER_TIMEOUT`). The client stops reading at that marker and closes first. The side that closes
is then always the side that has everything it wanted, so the reset that ``p2pd`` sends can no longer destroy data.
A server that closes without the marker (an older peer, or a crash) still ends the client's iteration, as before.

Leaving after a round
---------------------
A member's ``DecentralizedAverager.step`` returns as soon as *its own* averaged parts are in. The parts it reduced for
the others may still be on their way, in the streams it serves. hivemind's ``_shutdown`` then lets the averager process
exit at once, its socket closes, and ``p2pd`` resets those streams: a peer that leaves right after its last round cuts
its partners' results off. They log "Averaging: received 0.0% results" and keep their own tensors, while hivemind reports
the round as a success with the full group. It happened in CI to the 8-peer grid test (a partner's whole result lost,
its final value 1.5 instead of 3.5), and it is what a swarm's final parameter round risks whenever one member is a
little faster than the others. So :func:`install` also replaces the averager's ``_shutdown`` (:func:`_shutdown`, which
also repairs hivemind's cancellation of unfinished rounds): after it removed its handlers and cancelled its unfinished
rounds, it waits until the streams it was serving have been closed by their readers (:func:`drain`, at most
:data:`DRAIN_TIMEOUT` seconds and half the averager's ``shutdown_timeout``).

Every peer of a swarm must run this protocol: a peer on stock hivemind (or on an older lightning_moshpit) reads the
marker as an error from the handler and fails its rounds with peers that run it. Installation is global to the
process (:func:`install`, called when :mod:`lightning_moshpit` is imported, before any averager process forks), because
hivemind's averagers and ``DHT`` build their ``P2P`` objects themselves and take no class argument.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import closing, suppress
from typing import Any, AsyncIterator, Callable, Optional

from hivemind.averaging import DecentralizedAverager
from hivemind.p2p.p2p_daemon import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID, StreamInfo
from hivemind.proto.p2pd_pb2 import RPCError

logger = logging.getLogger(__name__)

#: Seconds a server keeps a finished stream open for its client to read the last response and close the stream.
#: A live client closes within milliseconds; the bound only matters for a client that hangs without closing.
LINGER_TIMEOUT = 5.0

#: Longest wait, when an averager shuts down, for the streams it serves to be read to their end (see :func:`drain`).
DRAIN_TIMEOUT = LINGER_TIMEOUT

#: The stream handlers this process is running, with the name of the RPC each one serves (asyncio tasks of one
#: event loop: each averager process serves its streams from one loop).
_serving: dict[asyncio.Task, str] = {}
os.register_at_fork(after_in_child=_serving.clear)  # a forked averager serves its own streams, not its parent's

_installed = False


def install() -> None:
    """Replace hivemind's streaming RPC server and client with the reader-closes protocol (idempotent)."""
    global _installed
    if _installed:
        return
    for owner, name in ((P2P, "_add_protobuf_stream_handler"), (P2P, "_iterate_protobuf_stream_handler"),
                        (P2P, "send_protobuf"), (DecentralizedAverager, "_shutdown")):  # fmt: skip
        if not hasattr(owner, name):  # a hivemind whose classes changed shape: do not patch blindly
            raise RuntimeError(f"hivemind's {owner.__name__} has no {name}; lightning_moshpit's stream fix supports "
                               f"hivemind 1.1.x")  # fmt: skip
    P2P._add_protobuf_stream_handler = _add_protobuf_stream_handler
    P2P._iterate_protobuf_stream_handler = _iterate_protobuf_stream_handler
    DecentralizedAverager._shutdown = _shutdown
    _installed = True


def is_end_of_stream(error: RPCError) -> bool:
    """Whether an error frame is hivemind's end-of-stream marker (an ``RPCError`` with no message)."""
    return not error.message


# --------------------------------------------------------------------------------------------------------- server
async def _add_protobuf_stream_handler(
    self: P2P,
    name: str,
    handler: Callable[[AsyncIterator[Any], P2PContext], AsyncIterator[Any]],
    input_protobuf_type: type,
    max_prefetch: int = 5,
    balanced: bool = False,
) -> None:
    """hivemind 1.1.12's ``P2P._add_protobuf_stream_handler``, ending each stream with the marker and a linger."""

    async def _handle_stream(stream_info: StreamInfo, reader: asyncio.StreamReader, writer: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            _serving[task] = name
        try:
            await _serve_stream(stream_info, reader, writer)
        finally:
            _serving.pop(task, None)

    async def _serve_stream(stream_info: StreamInfo, reader: asyncio.StreamReader, writer: Any) -> None:
        context = P2PContext(handle_name=name, local_id=self.peer_id, remote_id=stream_info.peer_id)
        requests: asyncio.Queue = asyncio.Queue(max_prefetch)

        async def _read_stream() -> AsyncIterator[Any]:
            while True:
                request = await requests.get()
                if request is None:
                    break
                yield request

        processing_task = asyncio.create_task(_respond(handler(_read_stream(), context), writer))
        receive_task: Optional[asyncio.Task] = None
        with closing(writer):
            try:
                while not processing_task.done():
                    receive_task = asyncio.create_task(P2P.receive_protobuf(input_protobuf_type, reader))
                    await asyncio.wait({processing_task, receive_task}, return_when=asyncio.FIRST_COMPLETED)
                    if not receive_task.done():
                        break  # the handler finished first
                    try:
                        request, _ = receive_task.result()
                    except (asyncio.IncompleteReadError, ConnectionError):  # the client closed, was cancelled or died
                        return
                    receive_task = None
                    await _hand_over(requests, request, processing_task)  # None is the client's end-of-stream
                if processing_task.result():  # every response (or the handler's error) was written
                    await _linger_until_closed(reader, input_protobuf_type, receive_task)
            except Exception:
                logger.warning("Exception while receiving requests:", exc_info=True)
            finally:
                processing_task.cancel()
                if receive_task is not None:
                    receive_task.cancel()

    await self.add_binary_stream_handler(name, _handle_stream, balanced=balanced)


async def _respond(responses: AsyncIterator[Any], writer: Any) -> bool:
    """Write a handler's responses, then the end-of-stream marker; False if the connection broke on the way."""
    try:
        async for response in responses:
            if not await _send(response, writer):
                return False
        return await _send(P2P.END_OF_STREAM, writer)
    except Exception as error:
        logger.warning("Handler failed with the exception:", exc_info=True)
        # never an empty message: that would read as the end-of-stream marker
        with suppress(Exception):
            await P2P.send_protobuf(RPCError(message=str(error) or type(error).__name__), writer)
    return True


async def _send(message: Any, writer: Any) -> bool:
    try:
        await P2P.send_protobuf(message, writer)
        return True
    except Exception:  # the caller closed or the connection broke; the caller reports it
        logger.debug("Exception while sending response:", exc_info=True)
        return False


async def _hand_over(requests: asyncio.Queue, request: Any, processing_task: asyncio.Task) -> None:
    """Queue a request for the handler, unless the handler finishes first (then the request is not wanted)."""
    put = asyncio.ensure_future(requests.put(request))
    await asyncio.wait({put, processing_task}, return_when=asyncio.FIRST_COMPLETED)
    put.cancel()


async def _linger_until_closed(
    reader: asyncio.StreamReader, input_protobuf_type: type, pending: Optional[asyncio.Task]
) -> None:
    """Keep the stream open (discarding requests nobody reads) until the client closes it or LINGER_TIMEOUT."""

    async def _until_closed() -> None:
        with suppress(asyncio.IncompleteReadError, ConnectionError):
            if pending is not None:
                await pending
            while True:
                await P2P.receive_protobuf(input_protobuf_type, reader)

    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_until_closed(), LINGER_TIMEOUT)


# --------------------------------------------------------------------------------------------------------- leaving
async def drain(timeout: float) -> int:
    """Wait until the streams this process serves now have ended, or ``timeout`` seconds; how many were still open.

    A served stream ends when its client closed it, that is, after the client read the last response (the protocol
    above). Matchmaking streams (``rpc_join_group``) are not waited for: a peer that is leaving forms no more groups,
    and its would-be followers give up on their own.
    """
    loop = asyncio.get_running_loop()
    waited = [task for task, name in _serving.items()
              if not name.endswith(".rpc_join_group") and task.get_loop() is loop and task is not asyncio.current_task()]  # fmt: skip
    if not waited:
        return 0
    _, still_open = await asyncio.wait(waited, timeout=timeout)
    if still_open:
        logger.debug(f"Left {len(still_open)} stream(s) unfinished after waiting {timeout:.1f} s for their readers")
    return len(still_open)


async def _shutdown(self: DecentralizedAverager, timeout: Optional[float]) -> None:
    """``DecentralizedAverager._shutdown`` of hivemind 1.1.12, repaired, then :func:`drain`.

    hivemind's version removes the averager's handlers, then calls ``finalize(cancel=True)`` on every registered round
    and gathers what that returns. But it holds a *future* of each round's ``AllReduceRunner`` (whose ``finalize``
    returns nothing), so with any round registered, that is, whenever a peer left in the middle of a round, it raised
    ``AttributeError`` and the averager's thread died with a traceback. Here a running round's runner is cancelled
    (its members see this peer leave) and a round still being set up is cancelled before it starts.
    """
    # half of ``timeout`` at most, counted from here: hivemind's shutdown() waits ``timeout`` for the whole exit
    deadline = time.monotonic() + (DRAIN_TIMEOUT if timeout is None else min(DRAIN_TIMEOUT, timeout / 2))
    try:
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for group in list(self._running_groups.values()):
            if group.done() and not group.cancelled() and group.exception() is None:
                group.result().finalize(cancel=True)
            else:
                group.cancel()
    finally:
        await drain(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------------------------- client
async def _iterate_protobuf_stream_handler(
    self: P2P, peer_id: PeerID, name: str, requests: AsyncIterator[Any], output_protobuf_type: type
) -> AsyncIterator[Any]:
    """hivemind 1.1.12's ``P2P._iterate_protobuf_stream_handler``, stopping at the server's end-of-stream marker."""
    _, reader, writer = await self.call_binary_stream_handler(peer_id, name)

    async def _write_to_stream() -> None:
        async for request in requests:
            await P2P.send_protobuf(request, writer)
        await P2P.send_protobuf(P2P.END_OF_STREAM, writer)

    async def _read_from_stream() -> AsyncIterator[Any]:
        with closing(writer):  # closing here, after the marker, is what lets the server's daemon close safely
            try:
                while True:
                    try:
                        response, error = await P2P.receive_protobuf(output_protobuf_type, reader)
                    except asyncio.IncompleteReadError:  # closed without a marker: a crash, or an older server
                        await writing_task
                        return
                    if error is not None:
                        if is_end_of_stream(error):
                            break
                        raise P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {error.message}")
                    yield response
                if writing_task.done():  # surface an error of the request iterator; never wait on unsent requests
                    await writing_task
            finally:
                writing_task.cancel()

    writing_task = asyncio.create_task(_write_to_stream())
    return _read_from_stream()
