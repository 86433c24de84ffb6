"""Running ``python -m lightning_moshpit ...`` in tests: a background process whose output lines can be awaited."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
#: The training peer program every swarm test runs (its own model and data; see lightning_moshpit.testing.peer).
PEER = ["-m", "lightning_moshpit.testing.peer"]


#: Every process this test run starts inherits this variable, p2pd daemons included (hivemind hands its environment
#: to the daemon), so the leftover check can tell this run's daemons from those of other runs on the same machine.
TEST_RUN_VARIABLE = "LIGHTNING_MOSHPIT_TEST_RUN"
os.environ.setdefault(TEST_RUN_VARIABLE, uuid.uuid4().hex)


def p2pd_pids() -> set[int]:
    """PIDs of every running hivemind p2pd daemon on this machine (hivemind ships the binary as hivemind_cli/p2pd)."""
    result = subprocess.run(["pgrep", "-f", "hivemind_cli/p2pd"], capture_output=True, text=True)
    return {int(pid) for pid in result.stdout.split()}


def own_p2pd_pids() -> set[int]:
    """The p2pd daemons started by this test run (this process or anything it launched), and no one else's.

    A daemon belongs to this run when its environment holds this run's :data:`TEST_RUN_VARIABLE`. That also finds a
    daemon whose peer process died and left it to init, which a walk up the process tree would miss. Counting every
    p2pd on the machine instead (as this check once did) killed the daemons of other test runs and of
    ``lightning-moshpit local`` runs sharing the machine: their peers then failed with "failed to connect to bootstrap
    peers".
    """
    tag = f"{TEST_RUN_VARIABLE}={os.environ[TEST_RUN_VARIABLE]}".encode()
    pids = set()
    for pid in p2pd_pids():
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone already, or another user's process
            continue
        if tag in environment:
            pids.add(pid)
    return pids


def check_no_leftover_p2pd() -> Iterator[None]:
    """Fixture body: fail a test that leaves one of its own p2pd daemons running (after a grace period)."""
    before = own_p2pd_pids()
    yield
    deadline = time.monotonic() + 15
    leftover = own_p2pd_pids() - before
    while leftover and time.monotonic() < deadline:
        time.sleep(0.25)
        leftover = own_p2pd_pids() - before
    for pid in leftover:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leftover, f"p2pd daemons left running after the test: {sorted(leftover)}"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSHPIT_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(args: Sequence[str], timeout: float, cwd: Optional[Path] = None, **env: str) -> subprocess.CompletedProcess:
    """Run the command to the end (in its own session, killed with its group on timeout)."""
    with CliProcess(args, cwd=cwd, **env) as process:
        code = process.wait(timeout)
        return subprocess.CompletedProcess(process.args, code, process.output(), "")


class CliProcess:
    """``python -m lightning_moshpit <args>`` in its own process group, with stdout+stderr collected line by line."""

    def __init__(self, args: Sequence[str], cwd: Optional[Path] = None, **env: str) -> None:
        self.args = [sys.executable, "-m", "lightning_moshpit", *args]
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            self.args, cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in iter(self.process.stdout.readline, b""):
            with self._lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching ``pattern`` (a regex), waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            with self._lock:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
            if self.process.poll() is not None:
                self._reader.join(2)
                with self._lock:
                    if not any(regex.search(line) for line in self.lines):
                        raise AssertionError(f"exited ({self.process.returncode}) before printing {pattern!r}:\n"
                                             f"{self.output()[-4000:]}")  # fmt: skip
                continue
            time.sleep(0.1)
        raise TimeoutError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    def signal(self, signum: int) -> None:
        """Signal the command itself (not its group): what a user's Ctrl-C or a service manager's stop does."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"still running after {timeout} s:\n{self.output()[-4000:]}") from None
        self._reader.join(5)
        return code

    def leftover_processes(self) -> list[str]:
        """Live processes left in the command's session (its DHT process, p2pd, peers)."""
        result = subprocess.run(["ps", "-ww", "-o", "pid=,stat=,args=", "--sid", str(self.process.pid)],
                                capture_output=True, text=True)  # fmt: skip
        alive = []
        for line in result.stdout.splitlines():
            fields = line.split(None, 2)
            if len(fields) == 3 and not fields[1].startswith("Z"):
                alive.append(f"{fields[0]} {fields[2]}")
        return alive

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "CliProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()
