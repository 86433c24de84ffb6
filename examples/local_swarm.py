"""Start a swarm of N peers on this machine (127.0.0.1) and stream their output: ``make demo``.

    python examples/local_swarm.py --peers 3
    python examples/local_swarm.py --peers 2 -- --max-global-steps 50     # arguments after -- go to every peer

What it does, in the order a real deployment would:

1. Peer 0 runs the peer script with no ``MOSHPIT_INITIAL_PEERS``, so it creates a new swarm, and writes its
   multiaddrs to a temporary ``--address-file`` as soon as its DHT is up.
2. Peers 1..N-1 join that swarm: they run the same script with ``MOSHPIT_INITIAL_PEERS`` set to those addresses.
   To save start-up time they are launched together with peer 0 and import torch, Lightning and hivemind while
   peer 0 starts; only then do they wait for the address file (see :func:`join_when_ready`).
3. Every peer gets the same fresh ``MOSHPIT_RUN_ID``, listens on ``/ip4/127.0.0.1/tcp/0`` (loopback, a free port)
   and is told ``--min-peers N``, so they begin training together rather than one by one.

Each line a peer prints is shown prefixed with ``[peer i]``. The launcher stops every peer when one fails, on Ctrl-C
or after ``--timeout`` seconds, and exits non-zero in each of those cases. Each peer runs in its own session (process
group), so stopping its group also stops the libp2p daemon (p2pd) and averager processes that hivemind starts under
it. Only torch's shared-memory manager, which detaches into its own session, may outlive the launcher, and it exits
by itself within seconds once its peer is gone.

The peer script (default: ``examples/digits.py``) must take its swarm settings from the ``MOSHPIT_*`` environment
variables and accept ``--min-peers`` and ``--address-file``.
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

DEFAULT_PEER_SCRIPT = Path(__file__).resolve().parent / "digits.py"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
POLL_SECONDS = 0.1
GRACE_SECONDS = 5.0  # after SIGTERM, how long a peer may take to leave the swarm before SIGKILL
SUMMARY_PATTERN = "held-out accuracy"  # each peer's last line containing this is repeated at the end
OUTPUT_DRAIN_SECONDS = 1.0  # after the kill, how long to wait for the peers' last output lines
JOIN_WHEN_READY = "--join-when-ready"  # internal: marks a joining peer's process (see join_when_ready)

_print_lock = threading.Lock()


def say(line: str) -> None:
    """Print one whole line; peers' reader threads share stdout, so lines must not interleave mid-line."""
    with _print_lock:
        print(line, flush=True)


class PeerFailed(RuntimeError):
    """A peer exited with a non-zero code."""


class Peer:
    """One peer process and the thread that relays its output, line by line, with a ``[peer i]`` prefix."""

    def __init__(self, index: int, command: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.summary: Optional[str] = None  # the last line containing SUMMARY_PATTERN
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killpg reaches its p2pd and averagers too
        )  # fmt: skip
        self.reader = threading.Thread(target=self._relay_output, name=f"peer{index}-output", daemon=True)
        self.reader.start()

    def _relay_output(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:  # ends when every process in the group has closed the pipe
            line = f"[peer {self.index}] {raw.decode(errors='replace').rstrip()}"
            if SUMMARY_PATTERN in line:
                self.summary = line
            say(line)

    @property
    def returncode(self) -> Optional[int]:
        """The exit code, or ``None`` while the peer runs."""
        return self.process.poll()

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the peer's whole process group: the peer, its averagers and its p2pd daemon."""
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is already gone


# ---------------------------------------------------------------------------------------------------- starting
def peer_environment(run_id: str) -> dict[str, str]:
    """The environment that puts a peer in this swarm: run id and a loopback listening address.

    ``MOSHPIT_INITIAL_PEERS`` is removed: peer 0 must start a new swarm, and joiners set it once peer 0 is up.
    """
    env = {**os.environ, "MOSHPIT_RUN_ID": run_id, "MOSHPIT_HOST_MADDRS": LOOPBACK, "PYTHONUNBUFFERED": "1"}
    env.pop("MOSHPIT_INITIAL_PEERS", None)
    return env


def start_peers(peers: list[Peer], script: Path, peer_args: list[str], count: int, workdir: Path, run_id: str,
                deadline: float) -> None:  # fmt: skip
    """Start peer 0 (a new swarm) and ``count - 1`` joiners that wait for its address file; append them to ``peers``.

    Appending one by one (rather than returning a list) lets the caller stop the peers already started if Ctrl-C
    arrives half-way.
    """
    address_file = workdir / "peer0.addr"
    env = peer_environment(run_id)
    peers.append(Peer(0, [sys.executable, str(script), *peer_args, "--address-file", str(address_file)], env))
    joiner = [sys.executable, str(Path(__file__).resolve()), JOIN_WHEN_READY, str(address_file), str(os.getpid()),
              str(deadline), str(script), *peer_args]  # fmt: skip
    for index in range(1, count):
        peers.append(Peer(index, joiner, env))


def join_when_ready(address_file: Path, launcher_pid: int, deadline: float, script: Path, args: list[str]) -> None:
    """Run in a joining peer's process: import the heavy libraries, wait for peer 0's address, then run ``script``.

    Importing torch, Lightning and hivemind takes several seconds; doing it while peer 0 starts its DHT, rather than
    after, shortens the demo's start-up. The script then runs exactly as if started with
    ``MOSHPIT_INITIAL_PEERS=<peer 0's addresses> python script args...``. The wait ends if the launcher dies or
    ``deadline`` (a ``time.time()`` value) passes, so an orphaned joiner never waits forever.
    """
    import lightning_moshpit  # noqa: F401  (pulls in torch, lightning and hivemind)

    while not address_file.exists():
        if os.getppid() != launcher_pid or time.time() > deadline:
            sys.exit(f"gave up waiting for peer 0's address in {address_file}")
        time.sleep(POLL_SECONDS)
    os.environ["MOSHPIT_INITIAL_PEERS"] = address_file.read_text().strip()
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))  # as `python script` would
    runpy.run_path(str(script), run_name="__main__")


# ---------------------------------------------------------------------------------------------------- watching
def watch(peers: list[Peer], deadline: float) -> None:
    """Return once every peer exited with code 0; raise ``PeerFailed`` or ``TimeoutError`` otherwise."""
    while True:
        codes = [peer.returncode for peer in peers]
        failed = [
            f"peer {peer.index} exited with code {code}" for peer, code in zip(peers, codes) if code not in (None, 0)
        ]
        if failed:
            raise PeerFailed(", ".join(failed))
        if all(code == 0 for code in codes):
            return
        if time.time() > deadline:
            running = [peer.index for peer, code in zip(peers, codes) if code is None]
            raise TimeoutError(f"peers {running} still running")
        time.sleep(POLL_SECONDS)


def stop_all(peers: list[Peer], grace: float = GRACE_SECONDS) -> None:
    """Stop every peer: SIGTERM to each running peer, up to ``grace`` s to leave, then SIGKILL to every group.

    SIGTERM goes to the peer's main process only: Lightning then stops after the current batch and the strategy's
    teardown says goodbye to the swarm and shuts hivemind's processes down in order. Whatever is left after
    ``grace`` seconds, and the groups of peers that already exited (a p2pd daemon whose parent died), get SIGKILL.
    Further Ctrl-C or SIGTERM are ignored meanwhile, so the cleanup is never cut short.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for peer in peers:
        if peer.returncode is None:
            peer.process.send_signal(signal.SIGTERM)
    give_up = time.monotonic() + grace
    for peer in peers:
        try:
            peer.process.wait(timeout=max(0.0, give_up - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for peer in peers:
        peer.signal_group(signal.SIGKILL)
        peer.process.wait()
    # torch's shared-memory manager detaches into its own session, holds our stdout pipe, and exits by itself
    # shortly after its clients are gone; so do not wait for end-of-output long.
    drained = time.monotonic() + OUTPUT_DRAIN_SECONDS
    for peer in peers:
        peer.reader.join(timeout=max(0.0, drained - time.monotonic()))


def describe_exit(returncode: Optional[int]) -> str:
    """``subprocess`` reports death by signal N as ``-N``; say so in words."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"stopped by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: treat ``kill <launcher>`` like Ctrl-C, so the ``finally`` block cleans up."""
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------- main
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every option's default."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--peers", type=int, default=3, help="how many peers to start")
    parser.add_argument("--timeout", type=float, default=240.0, help="stop everything after this many seconds")
    parser.add_argument("--script", type=Path, default=DEFAULT_PEER_SCRIPT, help="peer program, run with this Python")
    parser.add_argument(
        "peer_args", nargs=argparse.REMAINDER, help="after '--': extra arguments for every peer (default: none)"
    )
    args = parser.parse_args(argv)
    if args.peers < 1:
        parser.error(f"--peers must be at least 1, got {args.peers}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.peer_args[:1] == ["--"]:
        args.peer_args = args.peer_args[1:]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the swarm; return 0 if every peer succeeded, 1 if one failed, 124 on timeout, 130 on Ctrl-C."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    started, deadline = time.monotonic(), time.time() + args.timeout
    run_id = f"local-swarm-{uuid.uuid4().hex[:8]}"
    peer_args = ["--min-peers", str(args.peers), *args.peer_args]
    say(f"Starting {args.peers} peer(s) on 127.0.0.1, run_id={run_id}: {args.script.name} {' '.join(peer_args)}")
    peers: list[Peer] = []
    exit_code = 1
    with tempfile.TemporaryDirectory(prefix="moshpit-swarm-") as workdir:
        try:
            start_peers(peers, args.script, peer_args, args.peers, Path(workdir), run_id, deadline)
            watch(peers, deadline)
            exit_code = 0
        except KeyboardInterrupt:
            say("Interrupted: stopping all peers")
            exit_code = 130
        except PeerFailed as error:
            say(f"A peer failed ({error}): stopping all peers")
        except TimeoutError as error:
            say(f"Timed out after {args.timeout:.0f} s ({error}): stopping all peers")
            exit_code = 124
        finally:
            stop_all(peers)
    outcome = "all peers finished" if exit_code == 0 else f"exit code {exit_code}"
    say(f"Local swarm done in {time.monotonic() - started:.1f} s: {outcome}")
    for peer in peers:
        say(peer.summary or f"[peer {peer.index}] no result ({describe_exit(peer.returncode)})")
    return exit_code


if __name__ == "__main__":
    if sys.argv[1:2] == [JOIN_WHEN_READY]:
        address_file, launcher_pid, deadline, script, *script_args = sys.argv[2:]
        join_when_ready(Path(address_file), int(launcher_pid), float(deadline), Path(script), script_args)
    else:
        sys.exit(main())
