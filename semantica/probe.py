"""What the machine offers right now: CPU idle and AC power, read through one seam.

`SystemProbe` reads psutil; `FileProbe` reads a JSON file instead
(`SEMANTICA_CONDITIONS_FILE`), which is how tests flip the conditions of a real
daemon while jobs wait, and how an operator can hold gated jobs by hand. Nothing
else in the daemon reads the sensors, and the dispatcher asks only while a queued
job waits on a condition.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import psutil

from semantica import log
from semantica.store import Conditions

CPU_IDLE_BELOW_PERCENT = 30.0
SAMPLE_EVERY_S = 1.0  # how often the dispatcher asks again while a gated job waits
# A reading is reused for a little less than SAMPLE_EVERY_S: the dispatcher's clock and
# this one differ by a few milliseconds, and its look one interval later must measure.
CLOCK_SLACK_S = 0.05
FRESH_FOR_S = SAMPLE_EVERY_S - CLOCK_SLACK_S


class Sensors(Protocol):
    """The two psutil functions the probe reads (the `psutil` module is one)."""

    def cpu_percent(self, interval: float | None = None) -> float: ...

    def sensors_battery(self) -> Any: ...


class SystemProbe:
    """psutil readings, cached for `FRESH_FOR_S` so a busy dispatcher reads rarely.

    `sensors` and `clock` (seconds) are the seam tests replace; the daemon uses psutil
    and `time.monotonic`.
    """

    def __init__(
        self,
        idle_below_percent: float = CPU_IDLE_BELOW_PERCENT,
        *,
        sensors: Sensors = psutil,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_below_percent = idle_below_percent
        self._sensors = sensors
        self._clock = clock
        self._read_at = -math.inf
        self._cached = Conditions(cpu_idle=True, on_ac_power=True)
        sensors.cpu_percent(interval=None)  # the first call only starts the measurement

    def conditions(self) -> Conditions:
        now = self._clock()
        if now - self._read_at >= FRESH_FOR_S:
            self._cached = Conditions(
                cpu_idle=self._sensors.cpu_percent(interval=None) < self.idle_below_percent,
                on_ac_power=self._on_ac_power(),
            )
            self._read_at = now
        return self._cached

    def resample(self) -> None:
        """An idle-gated job was just admitted, and its load is in no reading yet: start
        a new measurement now, and count the CPU as busy until it has run a full
        interval. So the next idle-gated job is judged with the first one running."""
        self._sensors.cpu_percent(interval=None)  # the next reading covers from now on
        self._cached = msgspec.structs.replace(self._cached, cpu_idle=False)
        self._read_at = self._clock()

    def _on_ac_power(self) -> bool:
        sensors_battery = getattr(self._sensors, "sensors_battery", None)
        battery = sensors_battery() if sensors_battery is not None else None
        # No battery is on AC (SPEC §3); psutil's None (it cannot tell) is treated alike,
        # or require_charging jobs would wait forever on such a machine.
        return battery is None or battery.power_plugged is not False


class _ConditionsFile(msgspec.Struct, forbid_unknown_fields=True):
    cpu_idle: bool = True
    on_ac_power: bool = True


class FileProbe:
    """Conditions from a JSON file like `{"cpu_idle": false, "on_ac_power": true}`,
    read again whenever it changes. A missing or unreadable file offers everything
    (and says so in the log once per change), like a machine without sensors."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._broken = False
        self._cached = Conditions(cpu_idle=True, on_ac_power=True)

    def conditions(self) -> Conditions:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                read = msgspec.json.decode(self.path.read_bytes(), type=_ConditionsFile)
                self._cached = Conditions(cpu_idle=read.cpu_idle, on_ac_power=read.on_ac_power)
                self._stamp = stamp
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if not self._broken:
                log.warning("conditions_file_unreadable", path=str(self.path), error=str(exc))
            self._broken = True
            self._stamp = None
            self._cached = Conditions(cpu_idle=True, on_ac_power=True)
        else:
            self._broken = False
        return self._cached
