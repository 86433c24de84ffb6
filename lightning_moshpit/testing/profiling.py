"""Where a benchmark process's time goes: py-spy on a running process, CPU seconds per thread and process kind, and
summaries of py-spy's raw output.

Two views answer different questions:

- **Wall time of the training loop** (:func:`main_thread_phases`): py-spy samples the process's Python stacks from
  outside (no code changes) at a fixed rate. With ``idle=True`` it also keeps samples of threads that are blocked
  (waiting on a lock, a future or ``time.sleep``), so the main thread's samples add up to its wall time, and the
  innermost frame that names a phase (compute, waiting for an averaging round, a state download...) says where that
  time went.
- **CPU** (:func:`cpu_seconds_by_kind`): ``/proc`` counts the CPU time of the main thread, the training process's
  other threads, hivemind's child processes (averager, DHT) and the p2pd daemon, which py-spy cannot see (it is Go).

py-spy already does the sampling; this module only starts it, stops it and classifies what it wrote.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: Phases of the training loop's main thread, each named by substrings of a py-spy frame (``function (file:line)``).
#: A sample belongs to the phase of its innermost frame that matches; samples that match none are the Lightning loop.
MAIN_THREAD_PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("compute: forward and backward", ("training_step (", "backward (", "_engine_run_backward")),
    ("evaluation (benchmark only)", ("test_accuracy (",)),
    ("waiting for the gradient round (matchmaking + all-reduce)", ("_average_gradients_and_load_into_optimizer",)),
    ("state download (resynchronisation)", ("load_state_from_peers",)),
    # hivemind 1.1.12 (pinned below 1.2): the line where a step waits for the previous step's delayed update
    ("waiting for the previous step's delayed update (DPU)", ("TrainingStateAverager.step (hivemind/optim/state_averager.py:400)",)),
    ("start barrier", ("join_swarm",)),
    ("optimizer update and parameter averaging", ("TrainingStateAverager.step", "TrainingStateAverager._do")),
    ("booking the next round (DHT)", ("_maybe_schedule_gradient_averaging", "_maybe_schedule_state_averaging")),
    ("gradient accumulation", ("accumulate_grads_", "_check_and_accumulate_gradients")),
    ("progress refresh and checks", ("_resync_if_behind", "refresh_progress", "_drop_nonfinite_gradients")),
    ("DDP all-reduce and sync", ("DistributedDataParallel", "all_reduce", "_sync_buffers")),
    ("other optimizer.step work", ("Optimizer.step (", "optimizer_step (")),
)
LIGHTNING_LOOP = "Lightning loop, data loading and callbacks"
#: Frames of the benchmark's profiling callback (it sleeps while py-spy attaches): left out of every summary.
PROFILER_FRAME = "ProfileTraining."


#: Why a py-spy may fail to attach, for the warning a profiled process prints then.
PY_SPY_HINT = ("py-spy needs ptrace permission on the target (root, CAP_SYS_PTRACE, or "
               "/proc/sys/kernel/yama/ptrace_scope 0); run `py-spy record --pid PID` by hand to see its error")  # fmt: skip


def py_spy_executable() -> str:
    """The py-spy binary: on ``PATH``, or beside this interpreter (a virtual environment that was not activated)."""
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise FileNotFoundError("py-spy is not installed: `pip install py-spy` (it is in the dev and bench extras)")
    return found


def start_py_spy(pid: int, out: Path, *, rate: int = 50, idle: bool = False,
                 subprocesses: bool = False) -> subprocess.Popen:  # fmt: skip
    """Start sampling process ``pid`` into ``out`` (py-spy's raw format: one collapsed stack and its count per line).

    ``--nonblocking`` reads the target's memory without pausing it, so the profile does not slow the process it
    measures beyond the CPU py-spy itself takes. Stop it with :func:`stop_py_spy`, which makes it write ``out``.
    """
    command = [py_spy_executable(), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
               "--nonblocking", "-o", str(out)]  # fmt: skip
    if idle:
        command.append("--idle")
    if subprocesses:
        command.append("--subprocesses")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_py_spy(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Ask py-spy to finish (SIGINT makes it write its output) and wait; kill it if it does not end in ``timeout``."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds_by_kind(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by process ``root`` and all its live descendants, by kind.

    Kinds: ``main thread`` (the thread whose id is ``root``), ``other threads`` (the rest of ``root``'s threads, e.g.
    hivemind's progress tracker and delayed-update executor), ``python children`` (hivemind's averager and DHT
    processes), ``p2pd`` (the libp2p daemon) and ``profiler`` (a py-spy this process started, if any). Read from
    ``/proc``: Linux only, empty elsewhere.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parents: dict[int, int] = {}
    usage: dict[int, tuple[float, bool]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        kind = "p2pd" if b"p2pd" in cmdline else "profiler" if b"py-spy" in cmdline else "python children"
        usage[pid] = ((int(fields[11]) + int(fields[12])) / tick, kind)
    totals: collections.Counter[str] = collections.Counter()
    for pid, (seconds, kind) in usage.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if pid == root:
            main = _thread_cpu_seconds(root, root, tick)
            totals["main thread"] += main
            totals["other threads"] += max(0.0, seconds - main)
        elif ancestor == root:
            totals[kind] += seconds
    return dict(totals)


def _thread_cpu_seconds(pid: int, tid: int, tick: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick


@dataclasses.dataclass(frozen=True)
class Stack:
    """One line of py-spy's raw output: the process it was sampled in, its Python frames (outermost first), samples."""

    process: str
    frames: tuple[str, ...]
    count: int
    child: bool = False  #: sampled in a child of the profiled process (``--subprocesses``), not in the process itself


def read_raw_profile(path: Path) -> list[Stack]:
    """Parse py-spy's raw format. With ``--subprocesses`` a line starts with ``process PID:"cmdline"`` frames (the
    root, then the child it was sampled in); the innermost of those names the stack's process."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        processes = [frame for frame in frames if frame.startswith("process ")]
        process = processes[-1].split(":")[0] if processes else "process"
        frames_only = tuple(f for f in frames if not f.startswith("process "))
        stacks.append(Stack(process, frames_only, int(count), child=len(processes) > 1))
    return stacks


def leaf_shares(path: Path, top: int = 15) -> list[tuple[str, float]]:
    """Share of samples per process role and innermost Python frame (``--subprocesses`` profiles of averaging).

    C code (uvloop's socket I/O, ``bytes`` copies, protobuf) is charged to the Python line that called it. The role
    of a child process is guessed from its stacks: hivemind's averager runs ``DecentralizedAverager``, its DHT
    ``DHT.run``; the profiled process itself (all its threads) is the peer's main process.
    """
    stacks = read_raw_profile(path)
    roles: dict[str, str] = {}
    for stack in stacks:
        if not stack.child:
            continue  # the peer's own process also calls into its averagers (DecentralizedAverager.step)
        if any("DecentralizedAverager" in frame for frame in stack.frames):
            roles[stack.process] = "averager process"
        elif any("DHT.run" in frame for frame in stack.frames):
            roles.setdefault(stack.process, "DHT process")
    leaves: collections.Counter[str] = collections.Counter()
    for stack in stacks:
        leaf = stack.frames[-1] if stack.frames else "(no Python frame)"
        leaves[f"{roles.get(stack.process, 'peer main process')}: {leaf}"] += stack.count
    total = sum(leaves.values())
    return [(name, count / total) for name, count in leaves.most_common(top)] if total else []


def is_main_thread(frames: Sequence[str]) -> bool:
    """Whether a stack is the main thread's. Threads that ``threading`` started begin at ``Thread._bootstrap``; the
    main thread begins wherever the process did (``<module>``, runpy for ``python -m``, or the forkserver's loop for
    a forked test peer). Threads without Python frames (torch's, py-spy's idle natives) have no frames at all."""
    return bool(frames) and "_bootstrap (threading.py" not in frames[0]


def phase_of(frames: Sequence[str], phases: Sequence[tuple[str, Sequence[str]]] = MAIN_THREAD_PHASES) -> str:
    """The phase of the innermost frame that matches one, or :data:`LIGHTNING_LOOP`."""
    for frame in reversed(frames):
        for name, patterns in phases:
            if any(pattern in frame for pattern in patterns):
                return name
    return LIGHTNING_LOOP


def main_thread_stacks(path: Path) -> list[Stack]:
    """The main thread's stacks, less the profiler's own start-up (``ProfileTraining`` waits for py-spy to attach)."""
    return [
        stack for stack in read_raw_profile(path)
        if is_main_thread(stack.frames) and not any(frame.startswith(PROFILER_FRAME) for frame in stack.frames)
    ]  # fmt: skip


def main_thread_phases(path: Path, phases: Sequence[tuple[str, Sequence[str]]] = MAIN_THREAD_PHASES,
                       ) -> dict[str, float]:  # fmt: skip
    """Share of the main thread's samples per phase, largest first (of an ``idle=True`` profile: a share of wall
    time). Empty if the profile holds no main-thread sample."""
    counts: collections.Counter[str] = collections.Counter()
    for stack in main_thread_stacks(path):
        counts[phase_of(stack.frames, phases)] += stack.count
    return _shares(counts)


def main_thread_leaves(path: Path, top: int = 12) -> dict[str, float]:
    """Share of the main thread's samples per innermost Python frame: the detail under :func:`main_thread_phases`."""
    counts: collections.Counter[str] = collections.Counter()
    for stack in main_thread_stacks(path):
        counts[stack.frames[-1]] += stack.count
    return _shares(counts, top)


def _shares(counts: collections.Counter[str], top: int | None = None) -> dict[str, float]:
    total = sum(counts.values())
    return {name: count / total for name, count in counts.most_common(top)} if total else {}
