"""Starting and joining a swarm: configuration from arguments or the environment, and the hivemind DHT.

A *swarm* is the set of peers that share a ``run_id`` and can reach each other through hivemind's DHT. The first
peer starts a new DHT; every later peer passes the multiaddrs of any running peer as ``initial_peers``. This module
keeps all of that behind a few functions so that :mod:`lightning_moshpit.strategy` reads like a Lightning strategy.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional, Union

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from lightning_moshpit.dht_process import SwarmDHT
from lightning_moshpit.security import ENV_SWARM_SECRET, SecretAuthorizer, SecretRecordValidator, SwarmSecret

ENV_INITIAL_PEERS = "MOSHPIT_INITIAL_PEERS"
ENV_RUN_ID = "MOSHPIT_RUN_ID"
ENV_TARGET_BATCH_SIZE = "MOSHPIT_TARGET_BATCH_SIZE"
ENV_HOST_MADDRS = "MOSHPIT_HOST_MADDRS"
ENV_MAX_GLOBAL_STEPS = "MOSHPIT_MAX_GLOBAL_STEPS"

DEFAULT_RUN_ID = "moshpit"
DEFAULT_TARGET_BATCH_SIZE = 4096
DEFAULT_HOST_MADDRS = ("/ip4/0.0.0.0/tcp/0",)

_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

MaddrsArg = Optional[Union[str, Sequence[str]]]


def check_platform(platform: str = sys.platform) -> None:
    """Raise if this platform cannot run hivemind's bundled libp2p daemon (it ships a Linux binary only)."""
    if not platform.startswith("linux"):
        raise RuntimeError(
            f"MoshpitStrategy needs Linux: hivemind's p2pd daemon is shipped for Linux only, but this platform is "
            f"{platform!r}. Run the peer in a Linux machine, container or WSL2."
        )


def parse_maddrs(value: MaddrsArg, name: str) -> list[str]:
    """Turn a comma-separated string or a list of multiaddrs into a validated list of strings.

    ``name`` is the argument name used in error messages, e.g. ``"initial_peers"``.
    """
    if value is None:
        return []
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, Sequence):
        items = [str(part).strip() for part in value]
    else:
        raise TypeError(
            f"`{name}` must be a comma-separated string or a list of multiaddrs, got {type(value).__name__}"
        )
    items = [item for item in items if item]
    for item in items:
        try:
            Multiaddr(item)
        except Exception as error:  # hivemind's multiaddr raises several parse error types
            raise ValueError(
                f"`{name}` holds a malformed multiaddr {item!r} ({error}). Expected something like "
                f"'/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...' (comma-separated or a list)."
            ) from None
    return items


def _resolve_positive_int(value: Optional[int], name: str, env: str, default: Optional[int], meaning: str) -> Optional[int]:
    """The argument ``name``, else the environment variable ``env``, else ``default``; a positive int when set."""
    source = name
    if value is None:
        raw = os.environ.get(env) or None
        if raw is None:
            return default
        source = env
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env}={raw!r} is not an integer; expected a positive integer ({meaning})") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{source}` must be a positive integer ({meaning}), got {value!r}")
    return value


def resolve_target_batch_size(value: Optional[int]) -> int:
    """The argument, else ``MOSHPIT_TARGET_BATCH_SIZE``, else the default; always a positive int."""
    resolved = _resolve_positive_int(value, "target_batch_size", ENV_TARGET_BATCH_SIZE, DEFAULT_TARGET_BATCH_SIZE,
                                     "samples per global step")  # fmt: skip
    assert resolved is not None
    return resolved


def resolve_max_global_steps(value: Optional[int]) -> Optional[int]:
    """The argument, else ``MOSHPIT_MAX_GLOBAL_STEPS``, else ``None`` (no limit); a positive int when set."""
    return _resolve_positive_int(value, "max_global_steps", ENV_MAX_GLOBAL_STEPS, None,
                                 "the swarm global step at which every peer stops")  # fmt: skip


def resolve_run_id(value: Optional[str]) -> str:
    """The argument, else ``MOSHPIT_RUN_ID``, else ``"moshpit"``; letters, digits, ``_`` and ``-`` only."""
    source = "run_id"
    if value is None:
        value = os.environ.get(ENV_RUN_ID) or None
        source = ENV_RUN_ID
        if value is None:
            return DEFAULT_RUN_ID
    if not isinstance(value, str) or not _RUN_ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"`{source}` must be a non-empty string of letters, digits, '_' or '-' (it prefixes DHT keys), got {value!r}"
        )
    return value


def resolve_initial_peers(value: MaddrsArg) -> list[str]:
    """The argument, else ``MOSHPIT_INITIAL_PEERS`` (comma-separated); empty means: start a new swarm."""
    if value is None:
        return parse_maddrs(os.environ.get(ENV_INITIAL_PEERS), ENV_INITIAL_PEERS)
    return parse_maddrs(value, "initial_peers")


def resolve_host_maddrs(value: MaddrsArg) -> list[str]:
    """The argument, else ``MOSHPIT_HOST_MADDRS``, else listen on every interface on a free TCP port."""
    if value is None:
        env = os.environ.get(ENV_HOST_MADDRS)
        return parse_maddrs(env, ENV_HOST_MADDRS) if env else list(DEFAULT_HOST_MADDRS)
    maddrs = parse_maddrs(value, "host_maddrs")
    if not maddrs:
        raise ValueError("`host_maddrs` must name at least one address to listen on, e.g. ['/ip4/0.0.0.0/tcp/0']")
    return maddrs


def start_dht(
    *,
    initial_peers: list[str],
    host_maddrs: list[str],
    announce_maddrs: list[str],
    client_mode: bool,
    identity_path: Optional[str],
    startup_timeout: float,
    swarm_secret: Optional[SwarmSecret] = None,
) -> hivemind.DHT:
    """Start a DHT peer in a background process, joining ``initial_peers`` if any.

    An unreachable bootstrap peer raises :class:`ConnectionError` that names the addresses tried; hivemind's own
    error would only say that the daemon failed to start. With ``swarm_secret`` the DHT is private (see
    :mod:`lightning_moshpit.security`): every request, response and record must prove the secret.
    """
    kwargs: dict[str, Any] = dict(
        initial_peers=initial_peers,
        host_maddrs=host_maddrs,
        client_mode=client_mode,
        startup_timeout=startup_timeout,
        start=True,
    )
    if announce_maddrs:
        kwargs["announce_maddrs"] = announce_maddrs
    peer_id: Optional[str] = None
    with tempfile.TemporaryDirectory(prefix="moshpit_identity_") as scratch:  # p2pd reads a key file at start only
        if swarm_secret is not None:
            # the token names this peer's id, so the id must be known before the daemon starts: fix it with a key file
            fresh = identity_path is None or not os.path.isfile(identity_path)
            identity_path = os.path.join(scratch, "identity.key") if identity_path is None else identity_path
            if fresh:
                P2P.generate_identity(identity_path)
            with open(identity_path, "rb") as file:
                peer_id = PeerID.from_identity(file.read()).to_base58()
            kwargs["authorizer"] = SecretAuthorizer(swarm_secret, peer_id)
            kwargs["record_validators"] = [SecretRecordValidator(swarm_secret)]
            kwargs["check_if_identity_free"] = not fresh  # a key made a moment ago cannot be in use elsewhere
        if identity_path is not None:
            kwargs["identity_path"] = identity_path
        try:
            return SwarmDHT(**kwargs)
        except Exception as error:
            if initial_peers:
                private_hint = (
                    f" This peer (id {peer_id}) runs a private swarm: if the peers there answered but refused it, "
                    f"its swarm_secret / {ENV_SWARM_SECRET} differs from theirs."
                    if peer_id is not None
                    else ""
                )
                raise ConnectionError(
                    f"Could not join the swarm through initial_peers={initial_peers} within {startup_timeout:.0f} s: "
                    f"{error}. Check that a peer is running there and that the address (including /p2p/<peer id>) "
                    f"was copied exactly.{private_hint}"
                ) from error
            raise


def visible_addresses(dht: hivemind.DHT) -> list[str]:
    """Multiaddrs (with ``/p2p/<peer id>``) that other peers can pass as ``initial_peers``."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]


def join_command(
    addresses: Sequence[str], run_id: str, program: str = "python train.py", target_batch_size: Optional[int] = None
) -> str:
    """The shell line a newcomer runs to join: ``MOSHPIT_RUN_ID=... MOSHPIT_INITIAL_PEERS=... <program>``.

    Pass ``target_batch_size`` when this peer took it from ``MOSHPIT_TARGET_BATCH_SIZE``: the newcomer needs the same
    value, and ``program`` alone would not give it. The swarm secret is never included: pass it another way.
    """
    variables = [f"{ENV_RUN_ID}={run_id}", f"{ENV_INITIAL_PEERS}={','.join(addresses)}"]
    if target_batch_size is not None:
        variables.append(f"{ENV_TARGET_BATCH_SIZE}={target_batch_size}")
    return " ".join([*variables, program])


def join_command_hint(
    addresses: Sequence[str], run_id: str, program: Optional[str] = None, target_batch_size: Optional[int] = None
) -> str:
    """``To join this swarm: <join_command>``; without ``program`` it ends in the placeholder ``python <your script>``."""
    return f"To join this swarm: {join_command(addresses, run_id, program or 'python <your script>', target_batch_size)}"
