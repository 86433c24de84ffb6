"""One line, not a traceback, for an averaging round that failed the way rounds in a swarm are expected to fail.

hivemind 1.1.12's ``DecentralizedAverager._step`` (``hivemind/averaging/averager.py``) reports a round that found no
group, or whose all-reduce broke off, with ``logger.exception``: an ERROR line followed by a full traceback from
inside hivemind. In a decentralized swarm that is an expected event (a peer was late, a leader left), which the
strategy already records (:class:`~lightning_moshpit.optimizer.AveragingRound`, ``moshpit/averaging_success_rate``)
and survives by stepping with local gradients. A user reading the traceback cannot tell it from a crash.

:func:`quiet_expected_round_failures` adds a logging filter to hivemind's averager logger that turns such records into
one WARNING line with the exception's message. Any other exception keeps its traceback. The filter must be installed
before the averager processes fork (they inherit the logger); :class:`~lightning_moshpit.optimizer.SwarmOptimizer`
does that when it is built.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing

from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import AllreduceException

#: The logger of ``hivemind/averaging/averager.py`` (hivemind names its loggers by module).
AVERAGER_LOGGER = "hivemind.averaging.averager"
#: Exceptions with which a round ends when the swarm, not this process, went wrong.
EXPECTED_ROUND_FAILURES = (AllreduceException, MatchmakingException, StopAsyncIteration, asyncio.TimeoutError)


class ExpectedRoundFailureFilter(logging.Filter):
    """Strip the traceback from a record of an expected round failure and log it as a one-line warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, EXPECTED_ROUND_FAILURES):
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = f"Averaging round failed: {type(error).__name__}: {error}", None
        return True


def quiet_expected_round_failures() -> None:
    """Install :class:`ExpectedRoundFailureFilter` on hivemind's averager logger (once per process)."""
    logger = logging.getLogger(AVERAGER_LOGGER)
    if not any(isinstance(existing, ExpectedRoundFailureFilter) for existing in logger.filters):
        logger.addFilter(ExpectedRoundFailureFilter())


#: The logger of ``hivemind/averaging/partition.py``, which reports a partial all-reduce (and nothing else does).
PARTITION_LOGGER = "hivemind.averaging.partition"
#: Its two warnings: as a sender (some reducers sent nothing back) and as a reducer (some senders sent nothing).
PARTIAL_ROUND_WARNINGS = ("Averaging: received", "Reducer: received")


class PartialRoundCounter(logging.Filter):
    """Counts the partial all-reduces of one peer's averager processes, for its main process to read.

    hivemind 1.1.12 ends an all-reduce in which some members sent nothing with one of
    :data:`PARTIAL_ROUND_WARNINGS` and reports the round as a success (``StepControl.result()`` lists the full group).
    Its members then hold different averages. The warning is logged in the averager *process*, so the count lives
    in shared memory (a ``multiprocessing.Value``): :meth:`attach` before the averagers fork (they inherit the
    filter), :meth:`detach` after (so that averagers forked later, for another optimizer, do not count here), and
    :meth:`take` from the main process after each round.
    """

    def __init__(self) -> None:
        super().__init__()
        self._count = multiprocessing.Value("i", 0)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(PARTIAL_ROUND_WARNINGS):
            with self._count.get_lock():
                self._count.value += 1
        return True

    def attach(self) -> None:
        logging.getLogger(PARTITION_LOGGER).addFilter(self)

    def detach(self) -> None:
        logging.getLogger(PARTITION_LOGGER).removeFilter(self)

    def take(self) -> int:
        """Partial all-reduces counted since the last call."""
        with self._count.get_lock():
            count, self._count.value = self._count.value, 0
        return count
