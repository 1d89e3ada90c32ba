"""What the machine offers right now: CPU idle and AC power, read through one seam.

Tests replace `SystemProbe` with their own object having the same `conditions()`;
nothing else in the daemon reads the sensors.
"""

from __future__ import annotations

import time

import psutil

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
