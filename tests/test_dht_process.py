"""``SwarmDHT``'s pipe wrapper (pure logic) and a real DHT process that survives a request from a vanished sender."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from lightning_moshpit.dht_process import SwarmDHT, _TolerantPipe


class _BrokenPipe:
    """What the DHT process sees when the sender's resource sharer is gone: recv raises while unpickling."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def recv(self) -> object:
        raise self.error

    def poll(self) -> bool:
        return True


@pytest.mark.parametrize("error", [EOFError(), FileNotFoundError(2, "No such file"), ConnectionResetError(104, "reset")])
def test_a_request_that_cannot_be_read_becomes_a_no_op(error: BaseException) -> None:
    pipe = _TolerantPipe(_BrokenPipe(error))
    assert pipe.recv() == ("_ignore_lost_request", [], {})
    assert pipe.poll() is True  # everything else is the wrapped connection's


@pytest.mark.timeout(60)
def test_the_dht_process_reads_on_after_a_lost_request(capfd: pytest.CaptureFixture[str]) -> None:
    """Stock hivemind.DHT logs a FileNotFoundError traceback here and sleeps 3 s before reading the next request."""
    dht = SwarmDHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
    try:
        # a sender that exits before the DHT process reads its request: its pipe's resource sharer goes with it
        def send_and_exit(outer: object) -> None:
            from hivemind.utils.mpfuture import MPFuture

            outer.send(("_get", [], dict(key="k", latest=False, future=MPFuture())))  # type: ignore[attr-defined]

        sender = mp.get_context("fork").Process(target=send_and_exit, args=(dht._outer_pipe,))
        sender.start()
        sender.join(10)
        assert dht.store("key", "value", expiration_time=10**10)  # the DHT still answers
        assert dht.get("key").value == "value"
        assert dht.is_alive()
    finally:
        dht.shutdown()
    assert not dht.is_alive()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "did not shut down" not in err, err[-3000:]
