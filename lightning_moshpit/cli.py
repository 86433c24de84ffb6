"""The ``lightning-moshpit`` command (also ``python -m lightning_moshpit``).

Subcommands::

    bootstrap   a long-lived DHT peer that trains nothing: the address newcomers join through
                (--monitor: log the swarm's progress; --dashboard-port: serve the live page too)
    aux         an auxiliary peer: takes part in averaging rounds without computing gradients
    status      connect briefly and print the swarm's peers, throughput, global step and ETA
    local N     run N peers of a training command on 127.0.0.1 with the right environment
    dashboard   serve the live page for an existing swarm (--initial-peers)

See docs/cli.md for examples. Every subcommand that starts a DHT shuts it down (and its p2pd daemon) on Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import hivemind

from lightning_moshpit import swarm
from lightning_moshpit.security import resolve_swarm_secret

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


# ----------------------------------------------------------------------------------------------------------- helpers
class StopFlag:
    """A flag a signal handler may set: unlike ``threading.Event.set``, setting it takes no lock.

    (A handler runs between two bytecodes of the main thread; if that thread was inside ``Event.wait`` holding the
    event's lock, ``Event.set`` in the handler would deadlock.) ``wait`` polls in short sleeps, which signals
    interrupt.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: Optional[float] = None, poll: float = 0.1) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
        return self._set


@contextmanager
def _stop_on_signals() -> Iterator[StopFlag]:
    """An event set by SIGINT or SIGTERM (restoring the previous handlers afterwards).

    hivemind forks its DHT process from this one, so that process inherits the handler. There it must not swallow the
    SIGTERM that ``DHT.shutdown`` sends when a graceful stop fails; and a terminal's Ctrl-C, which reaches the whole
    process group, must not kill it half-way through start-up: the parent shuts it down.
    """
    event = StopFlag()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked child (hivemind's DHT process): its parent stops it
            if signum == signal.SIGTERM:  # DHT.shutdown's last resort must still kill it
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return  # Ctrl-C reaches the whole process group; the child ignores it, as hivemind's DHT does
        event.set()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _make_logger(kind: str, log_dir: Path, run_id: str) -> Any:
    """A Lightning logger for the monitor: ``csv`` (always available) or ``tensorboard`` (if installed)."""
    from lightning.pytorch import loggers

    if kind == "tensorboard":
        try:
            return loggers.TensorBoardLogger(save_dir=str(log_dir), name=run_id)
        except ModuleNotFoundError as error:
            raise SystemExit(f"--logger tensorboard needs the tensorboard package ({error}); use --logger csv") from None
    return loggers.CSVLogger(save_dir=str(log_dir), name=run_id)


# ------------------------------------------------------------------------------------------------------- subcommands
def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Start a DHT peer, print how to join it, and serve until Ctrl-C / SIGTERM."""
    run_id = swarm.resolve_run_id(args.run_id)
    swarm.check_platform()
    module = _checkpoint_module(args)
    with _stop_on_signals() as stop:  # from the start: a signal during start-up must still shut the DHT down
        dht = swarm.start_dht(
            initial_peers=swarm.parse_maddrs(args.initial_peers, "--initial-peers"),
            host_maddrs=swarm.parse_maddrs(args.host_maddrs, "--host-maddrs"),
            announce_maddrs=swarm.parse_maddrs(args.announce_maddrs, "--announce-maddrs"),
            client_mode=False,
            identity_path=args.identity_path,
            startup_timeout=args.startup_timeout,
            swarm_secret=resolve_swarm_secret(None),  # MOSHPIT_SWARM_SECRET: a private swarm's peers need it
        )
        monitor, server = None, None
        try:
            addresses = swarm.visible_addresses(dht)
            command = swarm.join_command(addresses, run_id)
            _print(
                f"[moshpit] bootstrap peer {dht.peer_id} is up for run_id={run_id}",
                f"{swarm.ENV_INITIAL_PEERS}={','.join(addresses)}",
                f"To join: {command}",
            )
            if args.monitor or args.dashboard_port is not None or module is not None:
                monitor, server = _start_monitor(args, dht, run_id, command, module)
            _print("[moshpit] serving; Ctrl-C or SIGTERM stops this peer")
            stop.wait()
            _print("[moshpit] shutting down")
        finally:
            if server is not None:
                server.stop()
            if monitor is not None:
                monitor.stop()
            dht.shutdown()
    return 0


def _checkpoint_module(args: argparse.Namespace) -> Optional[Any]:
    """The model ``--checkpoint-every`` saves (built before any DHT starts, so a bad ``--model`` fails fast)."""
    if args.checkpoint_every is None:
        if args.model is not None:
            raise ValueError("`--model` is used by `--checkpoint-every` only: pass both, or neither")
        return None
    if args.checkpoint_every < 1:
        raise ValueError(f"`--checkpoint-every` must be a positive number of global steps, got {args.checkpoint_every}")
    if args.model is None:
        raise ValueError("`--checkpoint-every` needs `--model package.module:ClassOrFactory` (the peers' model)")
    from lightning_moshpit.auxiliary import load_module

    return load_module(args.model, args.model_args)


def _start_monitor(
    args: argparse.Namespace, dht: hivemind.DHT, run_id: str, command: str, module: Optional[Any] = None
) -> tuple[Any, Any]:
    """The bootstrap peer's monitor (``--monitor``: a logger), dashboard (``--dashboard-port``) and checkpoints."""
    from lightning_moshpit.monitor import LoggerListener, SwarmMonitor

    monitor = SwarmMonitor(dht, run_id, period=args.period, target_batch_size=args.target_batch_size)
    server = None
    if module is not None:
        from lightning_moshpit.checkpointing import SwarmCheckpointer

        directory = Path(args.checkpoint_dir) / run_id
        checkpointer = SwarmCheckpointer(
            dht, run_id, module, directory, every=args.checkpoint_every, aggregation=args.aggregation
        )
        monitor.listeners.append(checkpointer)
        monitor.on_stop.append(checkpointer.shutdown)
        _print(f"[moshpit] checkpoints: every {args.checkpoint_every} global steps to {directory}")
    if args.monitor:
        logger = _make_logger(args.logger, Path(args.log_dir), run_id)
        monitor.listeners.append(LoggerListener(logger))
        _print(f"[moshpit] monitor: logging the swarm's progress to {logger.log_dir}")
    if args.dashboard_port is not None:
        from lightning_moshpit.dashboard import DashboardServer

        server = DashboardServer(monitor, join_command=command, port=args.dashboard_port).start()
        _print(f"[moshpit] dashboard: {server.url}")
    monitor.start()
    return monitor, server


def _client_dht(initial_peers: list[str], timeout: float) -> hivemind.DHT:
    """A short-lived client-mode DHT (it listens nowhere useful and stores nothing for others)."""
    if not initial_peers:
        raise SystemExit(
            f"error: no initial peers: pass --initial-peers or set {swarm.ENV_INITIAL_PEERS} (the address a "
            f"bootstrap peer prints)"
        )
    try:
        dht = swarm.start_dht(
            initial_peers=initial_peers,
            host_maddrs=[LOOPBACK],
            announce_maddrs=[],
            client_mode=True,
            identity_path=None,
            startup_timeout=timeout,
            swarm_secret=resolve_swarm_secret(None),
        )
    except Exception as error:
        raise SystemExit(f"error: no swarm answered at {','.join(initial_peers)} within {timeout:g} s: {error}") from None
    return dht


def format_status(snapshot: Any) -> str:
    """The swarm's state as a plain-text table (rich renders it in colour when installed and on a terminal)."""
    from lightning_moshpit.monitor import SwarmSnapshot

    assert isinstance(snapshot, SwarmSnapshot)
    eta = "unknown" if snapshot.eta_seconds is None else f"{snapshot.eta_seconds:.1f} s"
    target = snapshot.target_batch_size if snapshot.target_batch_size is not None else "?"
    loss = "-" if snapshot.loss is None else f"{snapshot.loss:.4f}"
    header = (
        f"run_id={snapshot.run_id}  peers={len(snapshot.peers)}  global_step={snapshot.global_step}  "
        f"samples={snapshot.samples_accumulated}/{target}  samples/s={snapshot.samples_per_second:.1f}  "
        f"eta_next_step={eta}  loss={loss}"
    )
    columns = ("peer", "role", "client_mode", "step", "samples", "samples/s", "loss")
    rows = [
        (
            peer.peer_id,
            peer.role,
            "yes" if peer.client_mode else "no",
            str(peer.step),
            str(peer.samples_accumulated),
            f"{peer.samples_per_second:.1f}",
            "-" if peer.loss is None else f"{peer.loss:.4f}",
        )
        for peer in snapshot.peers
    ]
    widths = [max(len(col), *(len(row[i]) for row in rows)) if rows else len(col) for i, col in enumerate(columns)]
    lines = [header, "  ".join(col.ljust(w) for col, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if not rows:
        lines.append("(no training peer has reported progress yet)")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    """Connect, read the progress and metrics records once, print the table and leave."""
    from lightning_moshpit.monitor import add_monitor_validators, read_swarm

    run_id = swarm.resolve_run_id(args.run_id)
    dht = _client_dht(swarm.resolve_initial_peers(args.initial_peers), args.timeout)
    try:
        add_monitor_validators(dht, run_id)
        try:
            snapshot = read_swarm(dht, run_id, args.target_batch_size, timeout=args.timeout)
        except Exception as error:
            raise SystemExit(f"error: the swarm did not answer within {args.timeout:g} s: {error!r}") from None
        _print(format_status(snapshot))
    finally:
        dht.shutdown()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the live page for a swarm this process joins as a client."""
    from lightning_moshpit.dashboard import DashboardServer
    from lightning_moshpit.monitor import SwarmMonitor

    run_id = swarm.resolve_run_id(args.run_id)
    initial_peers = swarm.resolve_initial_peers(args.initial_peers)
    with _stop_on_signals() as stop:
        dht = _client_dht(initial_peers, args.timeout)
        try:
            monitor = SwarmMonitor(dht, run_id, period=args.period, target_batch_size=args.target_batch_size)
            server = DashboardServer(monitor, join_command=swarm.join_command(initial_peers, run_id), port=args.port)
            try:
                server.start()
                monitor.start()
                _print(f"[moshpit] dashboard for run_id={run_id}: {server.url}")
                stop.wait()
            finally:
                server.stop()
                monitor.stop()
        finally:
            dht.shutdown()
    return 0


def cmd_aux(args: argparse.Namespace) -> int:
    """Join the swarm as an auxiliary peer (averaging only) with the training peers' model and settings."""
    from lightning_moshpit.auxiliary import load_module, run_auxiliary
    from lightning_moshpit.strategy import MoshpitStrategy

    module = load_module(args.model, args.model_args)
    strategy = MoshpitStrategy(
        target_batch_size=args.target_batch_size,
        run_id=args.run_id,
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity_path,
        matchmaking_time=args.matchmaking_time,
        averaging_timeout=args.averaging_timeout,
        group_size=args.group_size,
        compression=args.compression,
        aggregation=args.aggregation,
    )
    if not strategy.initial_peers:
        raise ValueError(
            f"an auxiliary peer joins a running swarm: pass --initial-peers or set {swarm.ENV_INITIAL_PEERS}"
        )
    with _stop_on_signals() as stop:
        _print(f"[moshpit] auxiliary peer for run_id={strategy.run_id}; joining through {strategy.initial_peers[0]}")
        report = run_auxiliary(module, strategy, stop)
    _print(
        f"[moshpit] auxiliary peer done: swarm at global step {report.global_step}, "
        f"{report.rounds}/{report.attempts} gradient rounds"
    )
    return 0


def cmd_local(args: argparse.Namespace) -> int:
    """Start a loopback bootstrap DHT, run N copies of the command joined to it, stop everything at the end."""
    from lightning_moshpit.launcher import LocalBootstrap, LocalLauncher

    command = list(args.command)
    if not command:
        raise SystemExit("error: local needs a command, e.g. `lightning-moshpit local 2 -- python train.py`")
    run_id = swarm.resolve_run_id(args.run_id)
    joined = swarm.parse_maddrs(args.initial_peers, "--initial-peers")
    with _stop_on_signals() as stop:
        bootstrap = None
        if not joined:  # our own bootstrap DHT, so that every peer is equal and any may leave first
            bootstrap = LocalBootstrap(args.startup_timeout, resolve_swarm_secret(None), say=lambda m: _print(f"[local] {m}"))
        try:
            addresses = joined or bootstrap.start()
            _print(f"[local] run_id={run_id}; {args.num_peers} peers join through {','.join(addresses)}")
            launcher = LocalLauncher(args.num_peers, command, addresses, run_id, grace=args.grace)
            try:
                launcher.start()
                code = launcher.wait(stop, on_poll=bootstrap.keep_alive if bootstrap is not None else None)
            finally:
                launcher.stop()  # also on errors: no peer outlives the launcher
            _print(f"[local] done: exit code {code}")
            return code
        finally:
            if bootstrap is not None:
                bootstrap.shutdown()


# ------------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moshpit", description="Start, join, watch and launch lightning_moshpit swarms."
    )
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    def add_run_id(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run-id", default=None, help=f"swarm namespace (default: ${swarm.ENV_RUN_ID} or 'moshpit')")

    def add_monitor_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--period", type=float, default=2.0, help="seconds between two reads of the swarm's records")
        p.add_argument("--target-batch-size", type=int, default=None,
                       help="global batch for the ETA (default: what peers publish)")  # fmt: skip

    def add_model_options(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--model", required=required,
                       help="the peers' LightningModule as 'package.module:ClassOrFactory' (same parameters and optimizer)")  # fmt: skip
        p.add_argument("--model-args", default=None, help='JSON keyword arguments for --model, e.g. \'{"hidden": 32}\'')

    boot = sub.add_parser("bootstrap", help="a long-lived DHT peer newcomers join through (trains nothing)")
    add_run_id(boot)
    boot.add_argument("--host-maddrs", default="/ip4/0.0.0.0/tcp/0",
                      help="where to listen (comma-separated multiaddrs); pin a port so the address stays the same")  # fmt: skip
    boot.add_argument("--announce-maddrs", default=None, help="public addresses to advertise (behind NAT/port forward)")
    boot.add_argument("--initial-peers", default=None, help="join an existing swarm instead of starting one")
    boot.add_argument("--identity-path", default=None,
                      help="private key file; the peer id (and join address) survives restarts. Created if missing")  # fmt: skip
    boot.add_argument("--startup-timeout", type=float, default=30.0)
    boot.add_argument("--monitor", action="store_true", help="log peers, global step, samples/s and loss")
    boot.add_argument("--logger", choices=("csv", "tensorboard"), default="csv")
    boot.add_argument("--log-dir", default="moshpit_logs", help="where the monitor's logger writes")
    boot.add_argument("--dashboard-port", type=int, default=None, help="also serve the dashboard on 127.0.0.1:PORT")
    boot.add_argument("--checkpoint-every", type=int, default=None,
                      help="save the swarm's state every N global steps (needs --model)")  # fmt: skip
    boot.add_argument("--checkpoint-dir", default="moshpit_checkpoints",
                      help="where checkpoints go (a <run_id> folder is made inside)")  # fmt: skip
    add_model_options(boot, required=False)
    boot.add_argument("--aggregation", default="mean", help="the trainers' aggregation, for --checkpoint-every")
    add_monitor_options(boot)
    boot.set_defaults(func=cmd_bootstrap)

    status = sub.add_parser("status", help="print the swarm's peers, throughput, global step and ETA, then exit")
    add_run_id(status)
    status.add_argument("--initial-peers", default=None, help=f"any peer's multiaddrs (default: ${swarm.ENV_INITIAL_PEERS})")
    status.add_argument("--timeout", type=float, default=20.0, help="give up (exit 1) after this many seconds")
    status.add_argument("--target-batch-size", type=int, default=None)
    status.set_defaults(func=cmd_status)

    aux = sub.add_parser("aux", help="an auxiliary peer: averages with the swarm, computes no gradients")
    add_run_id(aux)
    add_model_options(aux, required=True)
    aux.add_argument("--initial-peers", default=None, help=f"any peer's multiaddrs (default: ${swarm.ENV_INITIAL_PEERS})")
    aux.add_argument("--target-batch-size", type=int, default=None,
                     help=f"the swarm's target batch size (default: ${swarm.ENV_TARGET_BATCH_SIZE})")  # fmt: skip
    aux.add_argument("--matchmaking-time", type=float, default=5.0, help="must equal the training peers' setting")
    aux.add_argument("--averaging-timeout", type=float, default=30.0, help="must equal the training peers' setting")
    aux.add_argument("--group-size", type=int, default=16, help="must equal the training peers' setting")
    aux.add_argument("--compression", default="none", help="must equal the training peers' setting")
    aux.add_argument("--aggregation", default="mean", help="must equal the training peers' setting")
    aux.add_argument("--host-maddrs", default=None, help="where to listen (default: $MOSHPIT_HOST_MADDRS or any port)")
    aux.add_argument("--announce-maddrs", default=None, help="public addresses to advertise")
    aux.add_argument("--identity-path", default=None, help="private key file (a stable peer id)")
    aux.set_defaults(func=cmd_aux)

    local = sub.add_parser(
        "local",
        help="run N peers of a command on 127.0.0.1 (local 2 -- python train.py)",
        usage="lightning-moshpit local N [options] -- COMMAND [ARGS...]   ({peer} in ARGS becomes the peer index)",
    )
    local.add_argument("num_peers", type=int, help="how many peers")
    add_run_id(local)
    local.add_argument("--initial-peers", default=None,
                       help="join this existing swarm (e.g. a `bootstrap --monitor` peer) instead of starting one")  # fmt: skip
    local.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
    local.add_argument("--startup-timeout", type=float, default=30.0)
    local.set_defaults(func=cmd_local, command=[])

    dash = sub.add_parser("dashboard", help="serve a live page for an existing swarm on 127.0.0.1")
    add_run_id(dash)
    dash.add_argument("--initial-peers", default=None, help=f"any peer's multiaddrs (default: ${swarm.ENV_INITIAL_PEERS})")
    dash.add_argument("--port", type=int, default=8787, help="port on 127.0.0.1 (0: any free port)")
    dash.add_argument("--timeout", type=float, default=20.0, help="give up if no peer answers within this")
    add_monitor_options(dash)
    dash.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``lightning-moshpit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command: Optional[list[str]] = None
    parser = build_parser()
    if argv and argv[0] == "local" and "--" in argv:  # options before `--` are ours, the rest is the peer command
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    elif argv and argv[0] == "local" and not {"-h", "--help"} & set(argv):
        parser.error("local needs `--` before the peer command, e.g. `lightning-moshpit local 2 -- python train.py`")
    args = parser.parse_args(argv)
    if command is not None:
        args.command = command
    try:
        return int(args.func(args))
    except (ValueError, ConnectionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
