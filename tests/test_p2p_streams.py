"""The reader-closes stream protocol (lightning_moshpit.p2p_streams) between two real p2pd daemons on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.proto import test_pb2

import lightning_moshpit  # noqa: F401  (installs the protocol)
from lightning_moshpit import p2p_streams

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def _pair() -> tuple[P2P, P2P]:
    server = await P2P.create(host_maddrs=LOOPBACK)
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=await server.get_visible_maddrs())
    return server, client


def test_install_replaced_hiveminds_stream_methods() -> None:
    assert P2P._add_protobuf_stream_handler is p2p_streams._add_protobuf_stream_handler
    assert P2P._iterate_protobuf_stream_handler is p2p_streams._iterate_protobuf_stream_handler


def test_every_response_arrives_and_the_server_ends_when_the_client_closes() -> None:
    """100 streams of 3 messages each: all 300 arrive, in order, and each server task ends within a second."""
    handler_ended: list[float] = []

    async def handler(requests: AsyncIterator[test_pb2.TestRequest], _: P2PContext) -> AsyncIterator:
        async for request in requests:
            for k in range(3):
                yield test_pb2.TestResponse(number=request.number * 10 + k)
        handler_ended.append(time.monotonic())

    async def scenario() -> list[list[int]]:
        server, client = await _pair()
        try:
            await server.add_protobuf_handler("three", handler, test_pb2.TestRequest, stream_input=True,
                                              stream_output=True)  # fmt: skip
            results = []
            for number in range(100):
                responses = await client.iterate_protobuf_handler(
                    server.peer_id, "three", p2p_streams_requests(number), test_pb2.TestResponse
                )
                results.append([response.number async for response in responses])
            return results
        finally:
            await client.shutdown()
            await server.shutdown()

    began = time.monotonic()
    results = asyncio.run(scenario())
    assert results == [[n * 10, n * 10 + 1, n * 10 + 2] for n in range(100)]
    assert len(handler_ended) == 100
    # a client that waited for the server's linger would take LINGER_TIMEOUT per stream
    assert time.monotonic() - began < 100 * p2p_streams.LINGER_TIMEOUT / 10


async def p2p_streams_requests(number: int) -> AsyncIterator[test_pb2.TestRequest]:
    yield test_pb2.TestRequest(number=number)


@pytest.mark.parametrize("message", ["it broke", ""])
def test_a_handler_error_reaches_the_client_as_an_error_not_as_the_end(message: str) -> None:
    async def handler(requests: AsyncIterator[test_pb2.TestRequest], _: P2PContext) -> AsyncIterator:
        async for _request in requests:
            yield test_pb2.TestResponse(number=1)
            raise ValueError(message)

    async def scenario() -> list[int]:
        server, client = await _pair()
        received: list[int] = []
        try:
            await server.add_protobuf_handler("fails", handler, test_pb2.TestRequest, stream_input=True,
                                              stream_output=True)  # fmt: skip
            responses = await client.iterate_protobuf_handler(
                server.peer_id, "fails", p2p_streams_requests(1), test_pb2.TestResponse
            )
            with pytest.raises(P2PHandlerError, match=message or "ValueError"):
                async for response in responses:
                    received.append(response.number)
            return received
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario()) == [1]


def test_a_client_that_stops_reading_early_releases_the_server() -> None:
    """A client that closes after the first of many responses: the server's handler is cancelled, not left waiting."""

    async def scenario() -> bool:
        server, client = await _pair()
        handler_cancelled = asyncio.Event()

        async def endless(requests: AsyncIterator[test_pb2.TestRequest], _: P2PContext) -> AsyncIterator:
            try:
                number = 0
                while True:
                    yield test_pb2.TestResponse(number=number)
                    number += 1
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise

        try:
            await server.add_protobuf_handler("endless", endless, test_pb2.TestRequest, stream_input=True,
                                              stream_output=True)  # fmt: skip
            responses = await client.iterate_protobuf_handler(
                server.peer_id, "endless", p2p_streams_requests(0), test_pb2.TestResponse
            )
            async for _response in responses:
                break
            await responses.aclose()
            await asyncio.wait_for(handler_cancelled.wait(), timeout=5)
            return handler_cancelled.is_set()
        finally:
            await client.shutdown()
            await server.shutdown()

    assert asyncio.run(scenario())
