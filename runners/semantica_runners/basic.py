"""Runners for tests, benchmarks and smoke checks: noop, sleep, fail.

Each is a plain callable taking the job context, exactly as a third-party plugin
would be written. They import only `semantica.plugins` (the contract), never the
daemon.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from semantica.plugins import JobContext, PermanentError
from semantica_runners._payload import PayloadError

__all__ = ["FAIL_MODES", "PayloadError", "fail", "noop", "sleep"]

FAIL_MODES = ("exception", "permanent", "exit", "signal", "hang", "memory", "fork")


def noop(ctx: JobContext) -> dict[str, Any]:
    """Do nothing, successfully. The floor for throughput measurements."""
    return {"ok": True}


def sleep(ctx: JobContext) -> dict[str, Any]:
    """Sleep `{"seconds": float}` (0 to 86400), waking early if the job is cancelled."""
    seconds = ctx.payload.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise PayloadError(f"sleep: 'seconds' must be a number, got {seconds!r}")
    if not 0 <= seconds <= 86400:
        raise PayloadError(f"sleep: 'seconds' must be between 0 and 86400, got {seconds}")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if ctx.cancelled():
            return {"slept": seconds - left, "cancelled": True}
        time.sleep(min(left, 0.05))
    return {"slept": seconds}


def fail(ctx: JobContext) -> None:
    """Fail on purpose, in the way `{"mode": ...}` names; see FAIL_MODES."""
    mode = ctx.payload.get("mode", "exception")
    if mode == "exception":
        raise RuntimeError("fail runner: raising as asked (mode=exception)")
    if mode == "permanent":
        raise PermanentError("fail runner: permanent failure as asked (mode=permanent)")
    if mode == "exit":
        os._exit(int(ctx.payload.get("code", 3)))
    if mode == "signal":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if mode == "memory":
        hog = []
        while True:
            hog.append(bytearray(64 * 1024 * 1024))
    if mode == "fork":
        # Children sleep rather than fork again: growth is linear, and the sandbox's
        # process limit (not this cap) is what is expected to stop it.
        for _ in range(int(ctx.payload.get("max", 10_000))):
            if os.fork() == 0:
                time.sleep(3600)
                os._exit(0)
        raise RuntimeError("fail runner: the process limit never stopped the fork loop")
    raise PayloadError(f"fail: unknown mode {mode!r}; use one of {', '.join(FAIL_MODES)}")
