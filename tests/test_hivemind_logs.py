"""The filter that logs an expected failed averaging round as one warning line instead of a traceback."""

from __future__ import annotations

import logging

import pytest
from hivemind.averaging.partition import AllreduceException

from lightning_moshpit.hivemind_logs import ExpectedRoundFailureFilter


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        import sys

        return logging.LogRecord("hivemind.averaging.averager", logging.ERROR, __file__, 1, error, None, sys.exc_info())


def test_a_round_that_found_no_group_is_one_warning_line() -> None:
    record = _record(AllreduceException("Averaging step failed: could not find a group"))
    assert ExpectedRoundFailureFilter().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "Averaging round failed: AllreduceException: Averaging step failed: could not find a group"
    assert "Traceback" not in logging.Formatter().format(record)


@pytest.mark.parametrize("error", [ValueError("a bug"), RuntimeError("boom")])
def test_other_errors_keep_their_traceback(error: BaseException) -> None:
    record = _record(error)
    assert ExpectedRoundFailureFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)
