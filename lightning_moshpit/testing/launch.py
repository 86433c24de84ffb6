"""Start peer processes on 127.0.0.1 and make sure every one of them ends.

Each peer runs in its own process group, so stopping it also stops the p2pd daemon and averager processes that
hivemind starts under it. :class:`LocalSwarm` is a context manager: leaving the ``with`` block kills whatever is still
running, even when a test fails or times out.

Starting a peer the plain way (``python -m ...``) costs about 5 s of CPU just to import torch, Lightning and hivemind;
four peers starting together on a 2-core machine spend 10-20 s before their first step, and the scenario suite starts
dozens of them. So by default peers are forked from a :mod:`multiprocessing` *forkserver* that imported those modules
once (:func:`multiprocessing.set_forkserver_preload`). Each peer is still its own process with its own session, DHT,
p2pd and sockets; only the import work is shared. ``LocalSwarm(..., fast_start=False)`` (or the environment variable
``MOSHPIT_TEST_FAST_START=0``) starts real ``python -m`` subprocesses instead.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

PEER_MODULE = "lightning_moshpit.testing.peer"

#: What hivemind 1.1.12 logs when an all-reduce ends with parts missing (it still reports success): a partial round.
#: Before lightning_moshpit.p2p_streams, a follower that lost its leader's BEGIN_ALLREDUCE caused them.
PARTIAL_ALLREDUCE_WARNINGS = ("Averaging: received", "Reducer: received")


def partial_allreduce_lines(logs: str) -> list[str]:
    """The lines of ``logs`` in which hivemind reported a partial all-reduce (none in a healthy run)."""
    return [line for line in logs.splitlines() if any(warning in line for warning in PARTIAL_ALLREDUCE_WARNINGS)]

#: Modules the forkserver imports once so forked peers start without paying for them.
_PRELOAD = ["torch", "lightning", "hivemind", "lightning_moshpit", "lightning_moshpit.testing.attacks", "sklearn.datasets"]
_DEFAULT_START_METHOD = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
_FORKSERVER: Optional[multiprocessing.context.ForkServerContext] = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    """The process-wide forkserver context (started on first use; it exits with the process that started it)."""
    global _FORKSERVER
    if _FORKSERVER is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD)
        _FORKSERVER = context
    return _FORKSERVER


def _unshare_hivemind_locks() -> None:
    """Give this forked peer its own copies of hivemind's process-wide locks.

    hivemind creates several ``multiprocessing.Lock`` objects when it is imported (``MPFuture``'s initialisation and
    pipe locks, ``SharedBytes``' allocation lock, the async-context executor lock). They are semaphores in shared
    memory, meant to be shared by one peer and the DHT and averager processes it forks. Because the forkserver imported
    hivemind once for every peer, all peers forked from it would share the *same* semaphores: a peer killed with
    SIGKILL (or stopped with SIGSTOP) while holding one froze every other peer, and every peer started after it, at
    their next ``MPFuture``. A peer started with ``python -m`` creates its own locks at import; this restores that.
    """
    from hivemind.utils.asyncio import _AsyncContextWrapper
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()  # new MPFuture and SharedBytes locks; this process has no futures yet
    _AsyncContextWrapper.EXECUTOR_LOCK = multiprocessing.Lock()


def _run_module_as_peer(module: str, argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Body of a forked peer: behave like ``python -m module *argv`` in a new session, output going to ``log_path``."""
    os.setsid()  # its own session and process group, like ``Popen(start_new_session=True)``
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt, as in a fresh python
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # a forkserver child inherits "forkserver" as its default start method; hivemind's DHT and averagers expect the
    # platform default of a fresh interpreter, so restore it
    multiprocessing.set_start_method(_DEFAULT_START_METHOD, force=True)
    _unshare_hivemind_locks()
    os.environ.clear()
    os.environ.update(env)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.argv = [module, *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # multiprocessing ends a child with os._exit, which skips atexit (hivemind uses it)
        sys.stdout.flush()
        sys.stderr.flush()


class ForkedPeer:
    """The part of :class:`subprocess.Popen`'s interface the tests use, for a peer forked by the forkserver."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid: int = process.pid  # type: ignore[assignment]

    @property
    def returncode(self) -> Optional[int]:
        return self._process.exitcode

    def poll(self) -> Optional[int]:
        return self._process.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"peer {self.pid}", timeout or 0.0)
        return self._process.exitcode


PeerProcess = Union[subprocess.Popen, ForkedPeer]


def stop_swarms_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``) end this program like Ctrl-C does: by unwinding, so that every open
    ``with LocalSwarm(...)`` stops its peers.

    Python's default for SIGTERM is to die at once, without running ``finally`` blocks or ``__exit__``; the peers
    forked from the forkserver then lived on (found after a ``pkill -f soak.py``: 10 peer processes and their p2pd
    daemons, still running). For the main program of a benchmark; tests run under pytest, which stops swarms itself.
    """

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers never see a partial file: a temporary file named after this process
    (several processes may publish the same path at once, e.g. every DDP rank of a benchmark), then a rename."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def fast_start_default() -> bool:
    """Fork peers from the preloaded forkserver unless ``MOSHPIT_TEST_FAST_START=0``."""
    return os.environ.get("MOSHPIT_TEST_FAST_START", "1") != "0"


def start_module(
    module: str, argv: Sequence[str], env: dict[str, str], log_path: Path, fast_start: Optional[bool] = None
) -> PeerProcess:
    """Run ``python -m module *argv`` with exactly ``env`` in a new session, stdout and stderr to ``log_path``.

    With ``fast_start`` (default: :func:`fast_start_default`) the process is forked from the preloaded forkserver;
    otherwise it is a fresh interpreter. Either way it is its own process and session leader (its pid is its group).
    """
    log_path.write_bytes(b"")
    if fast_start_default() if fast_start is None else fast_start:
        process = _forkserver().Process(
            target=_run_module_as_peer, args=(module, list(argv), dict(env), str(log_path)), name=log_path.stem
        )
        process.start()
        return ForkedPeer(process)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


#: At most this many processes of a stuck peer get their Python stacks dumped by :meth:`LocalSwarm.diagnose`.
MAX_STACK_DUMPS = 5


def _run_quietly(command: list[str], timeout: float = 10.0) -> str:
    """A diagnostic command's output (stdout and stderr), or why it could not run; never raises."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"({command[0]} failed: {error})"
    return (result.stdout + result.stderr).strip()


class LocalSwarm:
    """Launches ``python -m lightning_moshpit.testing.peer`` processes that form one swarm on loopback.

    The first peer started writes its multiaddrs to a file; later peers read it and join through
    ``MOSHPIT_INITIAL_PEERS``. Logs go to ``<workdir>/peerN.log`` and reports to ``<workdir>/peerN.json``.
    """

    def __init__(
        self, workdir: Path, run_id: str, env: Optional[dict[str, str]] = None, fast_start: Optional[bool] = None
    ) -> None:
        self.workdir, self.run_id = Path(workdir), run_id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.fast_start = fast_start_default() if fast_start is None else fast_start
        self.processes: list[PeerProcess] = []
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
        module = module or PEER_MODULE
        argv = ["--out", str(self.report_path(index)), *args]
        if bootstrap:
            self.address_file.unlink(missing_ok=True)  # a restarted bootstrap peer listens on a new address
            self.bootstrap_index = index
            argv += ["--address-file", str(self.address_file)]
        else:
            env["MOSHPIT_INITIAL_PEERS"] = self.wait_for_bootstrap()
        log_path = self.workdir / f"peer{index}.log"
        self.processes.append(start_module(module, argv, env, log_path, self.fast_start))
        return index

    def wait_for_bootstrap(self, timeout: float = 60.0) -> str:
        """The bootstrap peer's multiaddrs, once it has written them."""
        deadline = time.monotonic() + timeout
        while not self.address_file.exists():
            if time.monotonic() > deadline:
                bootstrap = self.bootstrap_index
                raise TimeoutError(
                    f"bootstrap peer {bootstrap} wrote no address within {timeout} s:\n{self.diagnose(bootstrap)}"
                )
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
                raise TimeoutError(f"peer {index} still running after {timeout} s:\n{self.diagnose(index)}") from None
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

    def diagnose(self, index: int, log_chars: int = 3000) -> str:
        """Why is peer ``index`` not done? The end of its log, every process of its session as ``ps`` sees it (state,
        CPU time), and the Python stacks of those processes (``py-spy dump``, when py-spy is installed and may attach).

        Written for failures that only happen on a CI machine, where the peer's files are gone after the run.
        """
        if index >= len(self.processes):
            return f"--- peer {index} was never started ---"
        process = self.processes[index]
        parts = [f"--- peer {index} (pid {process.pid}) log, last {log_chars} characters ---", self.log(index)[-log_chars:]]
        alive = Path(f"/proc/{process.pid}").exists()
        parts.append(f"--- peer {index}: reported exit code {process.poll()}, /proc entry {'present' if alive else 'gone'} ---")
        listing = _run_quietly(["ps", "-o", "pid=,ppid=,stat=,etime=,time=,args=", "--sid", str(process.pid)])
        parts += ["--- processes of its session (pid ppid stat elapsed cpu args) ---", listing]
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if Path(py_spy).exists():
            pythons = [
                fields[0]
                for fields in (line.split(None, 5) for line in listing.splitlines())
                if len(fields) == 6 and ("python" in fields[5] or fields[0] == str(process.pid))
            ]
            for pid in pythons[:MAX_STACK_DUMPS]:  # the peer first, then its DHT and averager processes
                parts += [f"--- py-spy dump of {pid} ---", _run_quietly([py_spy, "dump", "--pid", pid])[-6000:]]
        return "\n".join(parts)

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
        pid = self.processes[index].pid
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:  # a forked peer killed before it called setsid() has no group of its own yet
            try:
                os.kill(pid, signum)
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

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
