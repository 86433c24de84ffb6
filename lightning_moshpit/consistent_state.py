"""A training-state averager that never serves a state torn between two global steps.

hivemind 1.1.12's ``TrainingStateAverager.get_current_state`` runs in a background thread of the trainer's process
whenever another peer downloads the state. It holds ``lock_averaged_tensors``, but the optimizer step does not (unless
``reuse_tensors``), and ``step()`` increments ``local_epoch`` only after the update. So a download served during a
step could carry some tensors before the update and some after, or the new parameters with the old step's label. The
downloader then holds a state that no peer has, and stays that far from the swarm.

:class:`ConsistentStateMixin` makes a synchronous ``step()`` (optimizer step, averaging round, epoch increment) and
``get_current_state()`` mutually exclusive. A download that arrives during a step waits for it (at most one averaging
round). With delayed parameter updates the optimizer step runs later in hivemind's background executor, outside this
lock: waiting for it there would deadlock ``step(wait_for_delayed_updates=True)``, so that mode keeps hivemind's race.

It also refuses to apply a parameter round that mixed global steps. hivemind's state rounds gather each member's
global step but average whatever parameters the members bring. A peer that was paused (SIGSTOP, a closed laptop lid)
resumes with the round it had started before the pause; that round then matched the others' current round, and
every member received an average that pulled a third of the way back to the paused peer's parameters of 5-6 steps
before. The others applied it at their next batch; the paused peer loaded the swarm's state at about the same time,
from a peer that had not yet applied it, and so ended 1.08e-2 away from them (``tests/scenarios/test_pause.py`` in a
clean-clone run: the paused peer's parameters were exactly the swarm's at global step 9, 1.08e-2 away at step 10).
So a round whose members gathered different global steps is discarded by every member: each keeps its own
parameters, which are the swarm's for the members in step, and the one behind loads the swarm's state anyway. A
failed round is not applied either: hivemind copies the averaging buffers back even then, and after a partial
all-reduce they hold a partial average. With delayed parameter updates (``reuse_tensors``) the round writes into the
parameters directly and none of this applies.

Last, it bounds how long a parameter round looks for its group (:attr:`ConsistentStateMixin.search_bound`).
hivemind runs the round in the state averager's one background thread, after the optimizer step, and lets it search
until the round's whole timeout (``averaging_timeout``). The *next* optimizer step queues behind it in that thread, so
a round whose partner never came held the peer's next step, and with it the next gradient round, for that long. Seen
in a clean-clone run of the 4-peer ``group_size=2`` test: one peer's parameter round of step 2 found no group and
failed after 10 s; the peer's step 2 waited for it, so it missed the gradient round of step 3 (its grid partner
failed too), found itself a step behind and reloaded the swarm's state. Nothing is lost by giving up sooner: a missed
parameter round is made up by the next one.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, Optional

from hivemind.averaging.control import StepControl
from hivemind.optim.state_averager import TrainingStateAverager

log = logging.getLogger(__name__)

#: Key of the ``gather`` payload that marks a final parameter round (see ``SwarmOptimizer.average_final_state``).
FINAL_ROUND = "moshpit_final_round"


def is_global_step(value: Any) -> bool:
    """Whether a round's gathered value is a global step (an int; a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def gathered_steps(gathered: dict) -> set[int]:
    """The global steps that the members of a parameter round gathered: hivemind's state rounds gather the step
    itself, our final rounds ``{FINAL_ROUND: step}``; anything else (no step known) is left out."""
    steps = set()
    for value in gathered.values():
        if isinstance(value, dict):
            value = value.get(FINAL_ROUND)
        if is_global_step(value):
            steps.add(value)
    return steps


def round_outcome(control: Optional[StepControl]) -> Optional[str]:
    """Why the parameter round behind ``control`` must not be applied, or None if it may."""
    if control is None:
        return None  # not a round this averager ran (nothing to check)
    if not control.done() or control.cancelled() or control.exception() is not None:
        return "it failed"
    steps = gathered_steps(control.result())
    if len(steps) > 1:
        return f"its members were at different global steps ({', '.join(map(str, sorted(steps)))})"
    return None


def search_timeout(gather: Any, timeout: Optional[float], bound: Optional[float]) -> Optional[float]:
    """The timeout to book a parameter round with: ``timeout`` capped at ``bound`` (None: no cap) for a round of a
    global step (its ``gather`` is the step); other rounds (final rounds gather a tag) keep ``timeout``."""
    if bound is None or not is_global_step(gather):
        return timeout
    return bound if timeout is None else min(timeout, bound)


class ConsistentStateMixin(TrainingStateAverager):
    """Put it first in the bases: ``class X(ConsistentStateMixin, TrainingStateAverager)``."""

    #: Seconds a parameter round of a global step may look for its group before it fails, read when the round is
    #: booked (None: its whole timeout, as in hivemind). ``SwarmOptimizer`` gives its
    #: ``parameter_round_search_seconds``: ``matchmaking_time`` plus its matchmaking window, how far apart peers start
    #: the same round. It bounds the search only; the all-reduce keeps its own timeout.
    search_bound: Optional[Callable[[], float]] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # before super().__init__: it starts the thread that serves get_current_state
        self._state_lock = threading.RLock()
        self._state_round: Optional[StepControl] = None  # the control of the latest parameter round (see _do)
        super().__init__(*args, **kwargs)

    def _search_bound(self) -> Optional[float]:
        return None if self.search_bound is None else self.search_bound()

    def schedule_step(self, scheduled_time: Optional[float] = None, **kwargs: Any) -> StepControl:
        kwargs["timeout"] = search_timeout(kwargs.get("gather"), kwargs.get("timeout"), self._search_bound())
        return super().schedule_step(scheduled_time, **kwargs)

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        # hivemind names RPC handlers after the class: keep the name of the class this one wraps, so that stock
        # averagers (SwarmCheckpointer's, for instance) still reach this one's handlers
        wrapped = next(base for base in cls.__mro__ if not issubclass(base, ConsistentStateMixin))
        return wrapped._get_handle_name(namespace, method_name)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        with self._state_lock:
            return super().step(*args, **kwargs)

    def get_current_state(self) -> Any:
        with self._state_lock:
            return super().get_current_state()

    def _do(self, wait_for_trigger: Any, optimizer_step: bool, zero_grad: bool, averaging_round: bool,
            averaging_control: Optional[StepControl], *args: Any, timeout: Optional[float] = None,
            **kwargs: Any) -> Any:  # fmt: skip
        # hivemind's _do makes the round's control itself when none (or a used one) is given, and keeps it to itself;
        # make it here the same way (its `super().step` is the averager's step after TrainingStateAverager in this
        # class's MRO, e.g. the private averager's), so that _apply_averaging_results_ can read what was gathered
        if averaging_round:
            if averaging_control is None or averaging_control.triggered or averaging_control.done():
                # the control gets the bounded search; the wait for its result (in super()._do) keeps the whole timeout
                averaging_control = super(TrainingStateAverager, self).step(
                    gather=self.local_epoch, require_trigger=True, wait=False,
                    timeout=search_timeout(self.local_epoch, timeout, self._search_bound()), **kwargs,
                )  # fmt: skip
            self._state_round = averaging_control
        return super()._do(wait_for_trigger, optimizer_step, zero_grad, averaging_round, averaging_control, *args,
                           timeout=timeout, **kwargs)  # fmt: skip

    def _apply_averaging_results_(self) -> None:
        # the latest round's control: a newer round than the one that finished may already be loading the buffers,
        # which then hold no finished average, so "not done" reads as failed
        reason = round_outcome(self._state_round)
        if reason is not None:
            log.warning(f"Not applying a parameter round: {reason}; keeping this peer's parameters")
            return
        super()._apply_averaging_results_()


@functools.cache
def consistent(averager_class: type) -> type:
    """``averager_class`` (a ``TrainingStateAverager``) with :class:`ConsistentStateMixin`, under the same name."""
    return type(averager_class.__name__, (ConsistentStateMixin, averager_class), {"__module__": __name__})
