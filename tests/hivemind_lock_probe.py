"""A stand-in peer for ``test_launch.py``, run as ``python -m hivemind_lock_probe MODE FLAG_FILE`` (or forked).

``hold``: take hivemind's process-wide ``SharedBytes`` lock, write ``FLAG_FILE``, and sleep holding it (the test then
kills this process). ``use``: create and resolve one ``MPFuture`` (which needs that lock), then write ``FLAG_FILE``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hivemind.utils.mpfuture import MPFuture, SharedBytes

if __name__ == "__main__":
    mode, flag = sys.argv[1], Path(sys.argv[2])
    if mode == "hold":
        SharedBytes._lock.acquire()
        flag.write_text("held")
        time.sleep(600)
    elif mode == "use":
        future: MPFuture = MPFuture()
        future.set_result(42)
        assert future.result(timeout=5) == 42
        flag.write_text("used")
    else:
        raise SystemExit(f"unknown mode {mode!r}; use 'hold' or 'use'")
