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
