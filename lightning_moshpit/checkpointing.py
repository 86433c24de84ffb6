"""Swarm checkpoints from the monitor: keep the swarm's state on disk, so nothing is lost if every trainer leaves.

A swarm has no chief: its state (parameters, buffers, optimizer statistics and the global step) lives only in the
training peers' memory. When the last of them leaves, a run that nobody checkpointed is gone. The bootstrap peer is
the one process that stays up, so ``lightning-moshpit bootstrap --monitor --checkpoint-every N --model ...`` makes it
download the state every ``N`` global steps and save it.

It downloads through hivemind itself: the training peers' state averager serves its state to anybody who asks under
``<run_id>_state_averager`` (the same path a late joiner uses). :class:`SwarmCheckpointer` builds a client-mode
``TrainingStateAverager`` with the same tensors as the trainers' (so it needs the same LightningModule), calls
``load_state_from_peers`` and writes the result in Lightning's checkpoint format. A peer restarted with
``trainer.fit(model, ckpt_path="step_000120.ckpt")`` gets the parameters and optimizer state from it, and the swarm's
global step: the strategy rejoins at that step, or at the running swarm's if that is ahead.

The checkpointer never averages and never reports progress, so it does not count as a peer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Optional

import hivemind
import lightning
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from lightning_moshpit.adapters import optimizer_factory
from lightning_moshpit.reducers import AGGREGATION_NAMES, CLIP_PREFIX_SUFFIX
from lightning_moshpit.security import PrivateTrainingStateAverager, resolve_swarm_secret

log = logging.getLogger(__name__)


def _first_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
    from lightning_moshpit.auxiliary import first_optimizer

    return first_optimizer(module)


class SwarmCheckpointer:
    """A monitor listener that saves the swarm's state every ``every`` global steps under ``directory``.

    Args:
        dht: the monitor's DHT (the bootstrap peer's).
        run_id: the swarm's run id.
        module: a fresh instance of the training peers' LightningModule (same architecture; its weights are replaced
            by the swarm's at each checkpoint).
        directory: where ``step_<global step>.ckpt`` files and ``last.ckpt`` go; created if missing.
        every: save once in every window of this many global steps (see below).
        timeout: seconds one download may take before that checkpoint is skipped (with a warning).
        aggregation: the trainers' ``aggregation`` (``"centered_clip"`` swarms keep their state under another prefix).

    A checkpoint is due when the swarm's global step reaches a positive multiple ``k * every``. The monitor only
    *downloads* the state, while the trainers go on stepping, so what arrives is the state of whatever step the
    serving trainer is at: usually ``k * every``, on a fast swarm a step or two later, and sometimes a step *earlier*
    (a trainer publishes its progress before its state averager has applied the step). The file is always named by
    the step it holds. A state older than ``k * every`` is not saved: the next snapshot downloads again. A state at
    or after it is saved and closes the window: at most one checkpoint per window ``[k * every, (k + 1) * every)``.

    Saving runs in a background thread, so a slow download never delays the monitor's logging; a checkpoint that is
    due while another is still downloading waits for the next snapshot.
    """

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        module: torch.nn.Module,
        directory: Path,
        every: int,
        timeout: float = 60.0,
        aggregation: str = "mean",
    ) -> None:
        if every < 1:
            raise ValueError(f"`--checkpoint-every` must be a positive number of global steps, got {every}")
        self.module, self.directory, self.every, self.timeout = module, Path(directory), every, timeout
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dht, self.run_id = dht, run_id
        if aggregation not in AGGREGATION_NAMES:
            raise ValueError(f"`--aggregation` must be one of {AGGREGATION_NAMES}, got {aggregation!r}")
        self.prefix = f"{run_id}_state_averager" + (CLIP_PREFIX_SUFFIX if aggregation == "centered_clip" else "")
        # Built now, in the main thread: hivemind installs a signal handler when an averager starts
        self.averager = self._make_averager()
        self.saved: list[Path] = []
        self._saved_step = 0  # the global step of the last checkpoint written (0: none yet)
        self._thread: Optional[threading.Thread] = None

    def __call__(self, snapshot: Any) -> None:
        """Called by :class:`~lightning_moshpit.monitor.SwarmMonitor` with each new snapshot of the swarm."""
        step = snapshot.global_step
        due = step - step % self.every
        if not snapshot.peers or due < self.every or due <= self._saved_step:
            return  # nobody to download from, no multiple reached yet, or this window already has its checkpoint
        if self._thread is not None and self._thread.is_alive():
            return  # still saving the previous one
        self._thread = threading.Thread(target=self.save, kwargs={"due": due}, name="moshpit-checkpoint", daemon=True)
        self._thread.start()

    def _make_averager(self) -> TrainingStateAverager:
        """A client-mode state averager with the trainers' tensors, under their state averagers' DHT prefix."""
        module = self.module
        optimizer = _first_optimizer(module)
        buffers = [buffer for _, buffer in module.named_buffers() if buffer.is_floating_point()]
        # The same tensors, in the same order, as the training peers' state averager (see
        # MoshpitStrategy.build_swarm_optimizer): parameters by optimizer group, then floating-point buffers. In a
        # private swarm (MOSHPIT_SWARM_SECRET, as for the bootstrap's DHT) it proves the secret like the trainers do.
        secret = resolve_swarm_secret(None)
        private = {} if secret is None else {"swarm_secret": secret}
        averager_class = TrainingStateAverager if secret is None else PrivateTrainingStateAverager
        in_main_thread = threading.current_thread() is threading.main_thread()
        sigint_before = signal.getsignal(signal.SIGINT) if in_main_thread else None
        averager = averager_class(
            dht=self.dht,
            optimizer=optimizer_factory(optimizer),
            params=[dict(group) for group in optimizer.param_groups],
            extra_tensors=buffers,
            prefix=self.prefix,
            client_mode=True,
            start=True,
            **private,
        )
        if sigint_before is not None:  # hivemind's averager sets SIGINT to SIG_IGN; Ctrl-C must still stop the peer
            signal.signal(signal.SIGINT, sigint_before)
        return averager

    def save(self, due: int = 0) -> Optional[Path]:
        """Download the swarm's current state and write it; returns the file, or None if nothing was saved.

        Args:
            due: the multiple of ``every`` this checkpoint is for; a state served from an earlier global step is not
                saved (None), so the caller downloads again at its next snapshot. 0 saves any state newer than the
                last checkpoint.
        """
        try:
            self.averager.load_state_from_peers(timeout=self.timeout)
        except Exception as error:  # a peer leaving mid-download, a shape mismatch: skip this one, keep monitoring
            log.warning(f"[moshpit] checkpoint skipped: downloading the swarm's state failed: {error!r}")
            return None
        step = self.averager.local_epoch
        if step < due:  # the serving trainer has not applied step `due` yet (or nobody answered): try again later
            log.info(f"[moshpit] checkpoint for global step {due}: the state served is at step {step}, retrying")
            return None
        if step <= self._saved_step:  # hivemind logs why (no peer answered, a tensor mismatch)
            log.warning(f"[moshpit] checkpoint skipped: no peer served a state newer than global step {self._saved_step}")
            return None
        path = self.directory / f"step_{step:06d}.ckpt"
        optimizer_state = self.averager.optimizer.state_dict()
        optimizer_state["state"]["local_epoch"] = step  # what SwarmOptimizer.load_state_dict reads back
        checkpoint = {
            # Lightning's checkpoint keys. "global_step" is Lightning's own count of local steps, which a monitor
            # cannot know: it starts at 0 and the swarm's step travels in the optimizer state.
            "epoch": 0,
            "global_step": 0,
            "pytorch-lightning_version": lightning.__version__,
            "state_dict": self.module.state_dict(),
            "optimizer_states": [optimizer_state],
            "lr_schedulers": [],
            "moshpit_global_step": step,
        }
        _atomic_save(checkpoint, path)
        _atomic_save(checkpoint, self.directory / "last.ckpt")
        self._saved_step = step
        self.saved.append(path)
        log.info(f"[moshpit] checkpoint of global step {step}: {path}")
        print(f"[moshpit] checkpoint of global step {step}: {path}", flush=True)
        return path

    def shutdown(self) -> None:
        """Wait for a save in progress (up to ``timeout``) and stop the averager."""
        if self._thread is not None:
            self._thread.join(self.timeout)
        self.averager.shutdown()


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a reader never sees half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
