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
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Optional

from hivemind.optim.state_averager import TrainingStateAverager


class ConsistentStateMixin(TrainingStateAverager):
    """Put it first in the bases: ``class X(ConsistentStateMixin, TrainingStateAverager)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # before super().__init__: it starts the thread that serves get_current_state
        self._state_lock = threading.RLock()
        super().__init__(*args, **kwargs)

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


@functools.cache
def consistent(averager_class: type) -> type:
    """``averager_class`` (a ``TrainingStateAverager``) with :class:`ConsistentStateMixin`, under the same name."""
    return type(averager_class.__name__, (ConsistentStateMixin, averager_class), {"__module__": __name__})
