"""``lightning-moshpit local N -- <command>``: run N peers of one training command on this machine.

How the peers find each other: the launcher itself starts a small bootstrap DHT peer on 127.0.0.1 (it trains
nothing) and gives its address to every command through ``MOSHPIT_INITIAL_PEERS``. So all N peers are equal: any of
them may fail or finish first without cutting the others off. Each command also gets ``MOSHPIT_RUN_ID``,
``MOSHPIT_HOST_MADDRS=/ip4/127.0.0.1/tcp/0`` (loopback only) and ``MOSHPIT_PEER_INDEX`` (0 .. N-1), and any
``{peer}`` in its arguments is replaced by the peer index (``--out report{peer}.json``).

Each peer runs in its own process group, so stopping it also stops the p2pd daemon and helper processes hivemind
starts under it. Their output is printed line by line with a ``[peerI]`` prefix. When one peer fails (non-zero exit)
or the launcher gets Ctrl-C / SIGTERM, every peer gets SIGTERM, then SIGKILL after ``grace`` seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Optional, Protocol

import hivemind
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from lightning_moshpit import swarm
from lightning_moshpit.security import SwarmSecret

LOOPBACK_MADDRS = "/ip4/127.0.0.1/tcp/0"
#: Seconds between two checks that the launcher's bootstrap peer still answers.
BOOTSTRAP_CHECK_PERIOD = 2.0


class StopRequest(Protocol):
    """Anything with ``wait(timeout) -> bool`` that turns true when the user asks to stop (threading.Event too)."""

    def wait(self, timeout: Optional[float] = None) -> bool: ...


ENV_PEER_INDEX = "MOSHPIT_PEER_INDEX"


class LocalLauncher:
    """Starts, watches and stops N peer processes that share one swarm.

    Args:
        num_peers: How many copies of ``command`` to run (at least 1).
        command: The program and its arguments; ``{peer}`` in an argument becomes the peer index.
        initial_peers: Multiaddrs the peers join through (normally the launcher's own bootstrap DHT).
        run_id: Swarm namespace passed as ``MOSHPIT_RUN_ID``.
        grace: Seconds between SIGTERM and SIGKILL when stopping peers.
        output: Where prefixed lines go (default: this process's stdout).
    """

    def __init__(
        self,
        num_peers: int,
        command: Sequence[str],
        initial_peers: Sequence[str],
        run_id: str,
        grace: float = 10.0,
        output: Optional[IO[str]] = None,
    ) -> None:
        if num_peers < 1:
            raise ValueError(f"`num_peers` must be at least 1, got {num_peers!r}")
        if not command:
            raise ValueError("`command` is empty: give the program to run after `--`, e.g. `local 2 -- python train.py`")
        self.num_peers, self.command, self.run_id = num_peers, list(command), run_id
        self.initial_peers, self.grace = list(initial_peers), grace
        self.output = output if output is not None else sys.stdout
        self.processes: list[subprocess.Popen] = []
        self._readers: list[threading.Thread] = []
        self._write_lock = threading.Lock()

    def peer_env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                swarm.ENV_INITIAL_PEERS: ",".join(self.initial_peers),
                swarm.ENV_RUN_ID: self.run_id,
                swarm.ENV_HOST_MADDRS: LOOPBACK_MADDRS,
                ENV_PEER_INDEX: str(index),
                "PYTHONUNBUFFERED": "1",  # so prefixed lines appear as they are printed
            }
        )
        return env

    def start(self) -> None:
        for index in range(self.num_peers):
            argv = [arg.replace("{peer}", str(index)) for arg in self.command]
            process = subprocess.Popen(
                argv,
                env=self.peer_env(index),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches its p2pd too
            )
            self.processes.append(process)
            reader = threading.Thread(target=self._pump, args=(index, process.stdout), daemon=True)
            reader.start()
            self._readers.append(reader)

    def _pump(self, index: int, stream: Optional[IO[bytes]]) -> None:
        assert stream is not None
        prefix = f"[peer{index}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._write_lock:
                self.output.write(prefix + line + "\n")
                self.output.flush()
        stream.close()

    def wait(self, stop_requested: StopRequest, poll: float = 0.2, on_poll: Optional[Callable[[], object]] = None) -> int:
        """Block until every peer exits 0 (returns 0), one fails, or ``stop_requested`` is set (stops all).

        ``on_poll`` runs at every poll (``lightning-moshpit local`` checks its bootstrap peer there).
        """
        while True:
            if on_poll is not None:
                on_poll()
            codes = [process.poll() for process in self.processes]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, code = failed[0]
                self._say(f"peer{index} exited with code {code}; stopping the other peers")
                self.stop()
                return code if code > 0 else 128 - code
            if all(code == 0 for code in codes):
                self.stop()  # reap leftovers (a p2pd the peer did not close) in the peers' groups
                return 0
            if stop_requested.wait(poll):
                self._say("interrupted; stopping every peer")
                self.stop()
                return 130

    def stop(self) -> None:
        """SIGTERM every peer's process group, SIGKILL what is left after ``grace`` seconds, then reap."""
        for process in self.processes:
            if process.poll() is None:
                _killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:  # the group may hold children that outlived their parent
            _killpg(process.pid, signal.SIGKILL)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for reader in self._readers:
            reader.join(timeout=5)

    def _say(self, message: str) -> None:
        with self._write_lock:
            self.output.write(f"[local] {message}\n")
            self.output.flush()


class LocalBootstrap:
    """The launcher's own bootstrap DHT peer on 127.0.0.1, started again at the same address if its daemon dies.

    Peers need the bootstrap peer only to join; afterwards they reach each other directly. But if something kills
    its p2pd daemon before every peer has joined (an out-of-memory killer, a broad ``pkill``, a test fixture that
    kills every p2pd on the machine: that last one happened here), the late peers fail with "failed to connect to
    bootstrap peers". So :meth:`keep_alive` checks every :data:`BOOTSTRAP_CHECK_PERIOD` seconds that the address
    still accepts TCP connections and, if not, starts a new DHT with the same identity key on the same port: the
    address the peers were given stays valid.

    Args:
        startup_timeout: Seconds the DHT may take to start.
        swarm_secret: The private swarm's secret, if any (the bootstrap peer must prove it too).
        say: Where to report a restart (a line of text).
    """

    def __init__(
        self, startup_timeout: float, swarm_secret: Optional[SwarmSecret] = None, say: Callable[[str], None] = print
    ) -> None:
        self.startup_timeout, self.swarm_secret, self.say = startup_timeout, swarm_secret, say
        self._scratch = tempfile.TemporaryDirectory(prefix="moshpit_local_")
        self._identity = os.path.join(self._scratch.name, "bootstrap.key")
        P2P.generate_identity(self._identity)  # the key a restart reuses, so the peer id in the address stays
        self.dht: Optional[hivemind.DHT] = None
        self.addresses: list[str] = []
        self.port = 0
        self.restarts = 0
        self._checked_at = time.monotonic()

    def start(self) -> list[str]:
        """Start the DHT (the first time on a free port, later on the same one) and return its addresses."""
        self.dht = swarm.start_dht(
            initial_peers=[],
            host_maddrs=[f"/ip4/127.0.0.1/tcp/{self.port}"],
            announce_maddrs=[],
            client_mode=False,
            identity_path=self._identity,
            startup_timeout=self.startup_timeout,
            swarm_secret=self.swarm_secret,
        )
        self.addresses = swarm.visible_addresses(self.dht)
        self.port = int(Multiaddr(self.addresses[0])["tcp"])
        return self.addresses

    def answers(self, timeout: float = 1.0) -> bool:
        """Whether the bootstrap address still accepts TCP connections (its p2pd daemon is listening)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def keep_alive(self) -> None:
        """At most every :data:`BOOTSTRAP_CHECK_PERIOD` seconds: if the address does not answer, start it again."""
        if self.dht is None or time.monotonic() - self._checked_at < BOOTSTRAP_CHECK_PERIOD:
            return
        self._checked_at = time.monotonic()
        if self.answers():
            return
        self.say(f"the bootstrap peer stopped answering at 127.0.0.1:{self.port} (its p2pd daemon was killed?); "
                 f"starting it again at the same address")  # fmt: skip
        self.dht.shutdown()
        self.dht = None
        self.start()
        self.restarts += 1
        self.say(f"bootstrap peer restarted: {','.join(self.addresses)}")

    def shutdown(self) -> None:
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None
        self._scratch.cleanup()


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
