"""Payload checks shared by the built-in runners: a bad payload fails the job at once."""

from __future__ import annotations

from typing import Any

from semantica.plugins import PermanentError


class PayloadError(PermanentError):
    """The payload does not fit what the runner takes; retrying cannot help."""


def optional_str(payload: dict[str, Any], key: str, runner: str) -> str | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, str):
        raise PayloadError(f"{runner}: {key!r} must be a string, got {value!r}")
    return value


def optional_number(payload: dict[str, Any], key: str, runner: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise PayloadError(f"{runner}: {key!r} must be a positive number, got {value!r}")
    return float(value)


def reject_unknown(payload: dict[str, Any], known: set[str], runner: str) -> None:
    unknown = sorted(set(payload) - known)
    if unknown:
        raise PayloadError(
            f"{runner}: unknown payload key(s) {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(sorted(known))}"
        )
