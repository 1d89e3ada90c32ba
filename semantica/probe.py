"""What the machine offers right now: CPU idle and AC power, read through one seam.

`SystemProbe` reads psutil; `FileProbe` reads a JSON file instead
(`SEMANTICA_CONDITIONS_FILE`), which is how tests flip the conditions of a real
daemon while jobs wait, and how an operator can hold gated jobs by hand. Nothing
else in the daemon reads the sensors, and the dispatcher asks only while a queued
job waits on a condition.
"""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import psutil

from semantica import log
from semantica.store import Conditions

CPU_IDLE_BELOW_PERCENT = 30.0
SAMPLE_EVERY_S = 1.0


class SystemProbe:
    """psutil readings, cached for `SAMPLE_EVERY_S` so a busy dispatcher reads rarely."""

    def __init__(self, idle_below_percent: float = CPU_IDLE_BELOW_PERCENT) -> None:
        self.idle_below_percent = idle_below_percent
        self._read_at = -SAMPLE_EVERY_S
        self._cached = Conditions(cpu_idle=True, on_ac_power=True)
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    def conditions(self) -> Conditions:
        now = time.monotonic()
        if now - self._read_at >= SAMPLE_EVERY_S:
            battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
            self._cached = Conditions(
                cpu_idle=psutil.cpu_percent(interval=None) < self.idle_below_percent,
                on_ac_power=battery is None or bool(battery.power_plugged),
            )
            self._read_at = now
        return self._cached


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
