"""Start peer processes on 127.0.0.1 and make sure every one of them ends.

Each peer runs in its own process group, so stopping it also stops the p2pd daemon and averager processes that
hivemind starts under it. :class:`LocalSwarm` is a context manager: leaving the ``with`` block kills whatever is still
running, even when a test fails or times out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Optional

PEER_MODULE = "lightning_moshpit.testing.peer"

#: hivemind 1.1.12 logs this when an all-reduce ends with parts missing yet reports success; tests that see it in a
#: failed run repeat that run once (see docs/benchmarks.md, "Known limits").
PARTIAL_ALLREDUCE_WARNING = "Averaging: received"


class LocalSwarm:
    """Launches ``python -m lightning_moshpit.testing.peer`` processes that form one swarm on loopback.

    The first peer started writes its multiaddrs to a file; later peers read it and join through
    ``MOSHPIT_INITIAL_PEERS``. Logs go to ``<workdir>/peerN.log`` and reports to ``<workdir>/peerN.json``.
    """

    def __init__(self, workdir: Path, run_id: str, env: Optional[dict[str, str]] = None) -> None:
        self.workdir, self.run_id = Path(workdir), run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.processes: list[subprocess.Popen] = []
        self._logs: list[IO[bytes]] = []
        self.address_file = self.workdir / "bootstrap.addr"
        self.bootstrap_index = 0  # the peer whose address the others join through (the latest started bootstrap)

    def start_peer(
        self,
        args: Sequence[str] = (),
        bootstrap: Optional[bool] = None,
        env: Optional[dict[str, str]] = None,
        module: Optional[str] = None,
    ) -> int:
        """Start one peer; the first becomes the bootstrap peer unless ``bootstrap`` says otherwise. Returns its index.

        ``env`` adds environment variables for this peer only (e.g. another ``MOSHPIT_SWARM_SECRET``); ``module`` runs
        another peer program that takes the same ``--out`` argument (default: :data:`PEER_MODULE`, read at call time
        so a test can point every peer elsewhere).
        """
        index = len(self.processes)
        bootstrap = index == 0 if bootstrap is None else bootstrap
        peer_env = {**os.environ, "MOSHPIT_RUN_ID": self.run_id, "MOSHPIT_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0"}
        peer_env.update(self.env)
        peer_env.update(env or {})
        peer_env.pop("MOSHPIT_INITIAL_PEERS", None)
        env = peer_env
        command = [sys.executable, "-m", module or PEER_MODULE, "--out", str(self.report_path(index)), *args]
        if bootstrap:
            self.address_file.unlink(missing_ok=True)  # a restarted bootstrap peer listens on a new address
            self.bootstrap_index = index
            command += ["--address-file", str(self.address_file)]
        else:
            env["MOSHPIT_INITIAL_PEERS"] = self.wait_for_bootstrap()
        log = open(self.workdir / f"peer{index}.log", "wb")
        self._logs.append(log)
        self.processes.append(
            subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        return index

    def wait_for_bootstrap(self, timeout: float = 60.0) -> str:
        """The bootstrap peer's multiaddrs, once it has written them."""
        deadline = time.monotonic() + timeout
        while not self.address_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"bootstrap peer wrote no address within {timeout} s; see {self.workdir}/peer0.log")
            bootstrap = self.bootstrap_index
            if bootstrap < len(self.processes) and self.processes[bootstrap].poll() is not None:
                raise RuntimeError(f"bootstrap peer exited early: {self.log(bootstrap)[-3000:]}")
            time.sleep(0.1)
        return self.address_file.read_text()

    def report_path(self, index: int) -> Path:
        return self.workdir / f"peer{index}.json"

    def log(self, index: int) -> str:
        return (self.workdir / f"peer{index}.log").read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        """Wait for every peer to exit (raising ``TimeoutError`` after ``timeout`` s); returns exit codes."""
        deadline = time.monotonic() + timeout
        codes = []
        for index, process in enumerate(self.processes):
            try:
                codes.append(process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise TimeoutError(
                    f"peer {index} still running after {timeout} s:\n{self.log(index)[-3000:]}"
                ) from None
        return codes

    def wait_for_global_step(self, progress_file: Path, step: int, timeout: float) -> int:
        """Block until a peer started with ``--progress-file progress_file`` reports global step >= ``step``."""
        deadline = time.monotonic() + timeout
        current = -1
        while time.monotonic() < deadline:
            try:
                current = int(progress_file.read_text())
            except (FileNotFoundError, ValueError):
                pass
            if current >= step:
                return current
            time.sleep(0.1)
        raise TimeoutError(f"{progress_file} reached global step {current}, not {step}, within {timeout} s")

    def exit_codes(self) -> list[Optional[int]]:
        """Each peer's exit code so far (``None`` while it runs; negative: killed by that signal)."""
        return [process.poll() for process in self.processes]

    def leftover_processes(self, indices: Optional[Sequence[int]] = None) -> list[str]:
        """Command lines of processes still alive in the sessions of these peers (default: all of them), the peer's
        averagers, DHT process and p2pd included."""
        alive = []
        chosen = range(len(self.processes)) if indices is None else indices
        for process in (self.processes[i] for i in chosen):
            result = subprocess.run(
                ["ps", "-o", "pid=,stat=,args=", "--sid", str(process.pid)], capture_output=True, text=True
            )
            for line in result.stdout.splitlines():
                fields = line.split(None, 2)
                if len(fields) == 3 and not fields[1].startswith("Z"):  # a zombie has exited; init reaps it
                    alive.append(f"{fields[0]} {fields[2]}")
        return alive

    def signal_peer(self, index: int, signum: int) -> None:
        """Send ``signum`` to a peer's whole process group (the peer, its averagers and its p2pd)."""
        try:
            os.killpg(self.processes[index].pid, signum)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Kill every peer's process group that is still alive, then reap them."""
        for index, process in enumerate(self.processes):
            if process.poll() is None:
                self.signal_peer(index, signal.SIGCONT)
                self.signal_peer(index, signal.SIGKILL)
            else:  # the peer exited; its children (p2pd) must not outlive it
                self.signal_peer(index, signal.SIGKILL)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
