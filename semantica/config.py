"""Configuration: SPEC §2 environment variables, each overridable by a daemon flag."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from semantica.domain import DEFAULT_ENV_ALLOWLIST, ENV_NAME_PATTERN

LOG_FORMATS = ("pretty", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A setting has a value the daemon cannot use; the message names the variable."""


class Config(msgspec.Struct, kw_only=True, frozen=True):
    home: Path
    db_path: Path
    socket_path: Path
    rpc_port: int = 9527
    rpc_host: str = "127.0.0.1"
    log_format: str = "pretty"
    log_level: str = "info"
    workers: int = 1
    retention_days: float = 7.0
    max_db_size_mb: int = 1000
    synchronous: str = "FULL"
    env_allowlist: frozenset[str] = DEFAULT_ENV_ALLOWLIST
    max_message_bytes: int = 16 * 1024 * 1024
    max_connections: int = 512
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 30.0
    rate_per_s: float = 20_000.0
    rate_burst: float = 5_000.0
    cpu_idle_percent: float = 30.0
    maintenance_hours: float = 24.0
    warm_max_jobs: int = 1000
    warm_max_rss_mb: int = 512
    zygote: bool = True
    runner_memory_mb: int = 8192
    runner_max_files: int = 1024
    runner_max_processes: int = 4096
    conditions_file: Path | None = None

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def token_path(self) -> Path:
        return self.home / "token"

    @property
    def lock_path(self) -> Path:
        return self.db_path.with_name(self.db_path.name + ".lock")


LOOPBACK = "127.0.0.1"


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range: use {low}..{high}")
    return value


def _choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r} is not one of: {', '.join(choices)}")
    return value


def load(
    env: Mapping[str, str] | None = None, overrides: Mapping[str, str | None] | None = None
) -> Config:
    """Build the configuration from `env` (default: os.environ) and flag `overrides`.

    `overrides` uses the variable names (`SEMANTICA_HOME`, ...); a None value means
    the flag was not given. Paths are made absolute; nothing is created here.
    """
    source = dict(os.environ if env is None else env)
    # The TCP listener binds 127.0.0.1 unless a flag asks otherwise: an address from
    # the environment (inherited, perhaps unnoticed) would expose the daemon.
    if source.pop("SEMANTICA_RPC_HOST", "") not in ("", LOOPBACK):
        raise ConfigError(
            "SEMANTICA_RPC_HOST is not read from the environment: the TCP listener binds "
            f"{LOOPBACK} unless you pass --rpc-host ADDRESS to the daemon on purpose"
        )
    for name, value in (overrides or {}).items():
        if value is not None:
            source[name] = str(value)

    def get(name: str, default: str) -> str:
        value = source.get(name, "")
        return value if value != "" else default

    home = Path(get("SEMANTICA_HOME", str(Path.home() / ".semantica"))).expanduser().absolute()
    allowlist = set(DEFAULT_ENV_ALLOWLIST)
    for name in filter(None, (n.strip() for n in get("SEMANTICA_ENV_ALLOWLIST", "").split(","))):
        if not ENV_NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"SEMANTICA_ENV_ALLOWLIST: {name!r} is not a variable name")
        if name.startswith("SEMANTICA_"):  # the runners' own set-up: never a job's to set
            raise ConfigError(
                f"SEMANTICA_ENV_ALLOWLIST: {name} is reserved for Semantica's runners; "
                "a job may not set SEMANTICA_* variables"
            )
        allowlist.add(name)

    def number(name: str, default: str, low: float, high: float) -> float:
        raw = get(name, default)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not low <= value <= high:
            raise ConfigError(f"{name}={raw} is out of range: use {low:g}..{high:g}")
        return value

    return Config(
        home=home,
        db_path=Path(get("SEMANTICA_DB_PATH", str(home / "meta.db"))).expanduser().absolute(),
        socket_path=Path(get("SEMANTICA_SOCKET_PATH", str(home / "semantica.sock")))
        .expanduser()
        .absolute(),
        rpc_port=_int("SEMANTICA_RPC_PORT", get("SEMANTICA_RPC_PORT", "9527"), 0, 65535),
        log_format=_choice(
            "SEMANTICA_LOG_FORMAT", get("SEMANTICA_LOG_FORMAT", "pretty"), LOG_FORMATS
        ),
        log_level=_choice("SEMANTICA_LOG_LEVEL", get("SEMANTICA_LOG_LEVEL", "info"), LOG_LEVELS),
        workers=_int(
            "SEMANTICA_WORKERS", get("SEMANTICA_WORKERS", str(os.cpu_count() or 1)), 1, 4096
        ),
        rpc_host=get("SEMANTICA_RPC_HOST", LOOPBACK),
        retention_days=number("SEMANTICA_RETENTION_DAYS", "7", 0, 36500),
        max_db_size_mb=_int(
            "SEMANTICA_MAX_DB_SIZE_MB", get("SEMANTICA_MAX_DB_SIZE_MB", "1000"), 1, 10**7
        ),
        synchronous=_choice(
            "SEMANTICA_SYNCHRONOUS",
            get("SEMANTICA_SYNCHRONOUS", "full"),
            ("normal", "full", "extra"),
        ).upper(),
        env_allowlist=frozenset(allowlist),
        max_message_bytes=_int(
            "SEMANTICA_MAX_MESSAGE_BYTES",
            get("SEMANTICA_MAX_MESSAGE_BYTES", str(16 * 2**20)),
            1024,
            2**31,
        ),
        max_connections=_int(
            "SEMANTICA_MAX_CONNECTIONS", get("SEMANTICA_MAX_CONNECTIONS", "512"), 1, 100_000
        ),
        idle_timeout_s=number("SEMANTICA_IDLE_TIMEOUT_S", "300", 0.01, 86400),
        request_timeout_s=number("SEMANTICA_REQUEST_TIMEOUT_S", "30", 0.01, 3600),
        rate_per_s=number("SEMANTICA_RATE_LIMIT", "20000", 0.001, 1e9),
        rate_burst=number("SEMANTICA_RATE_BURST", "5000", 1, 1e9),
        warm_max_jobs=_int(
            "SEMANTICA_WARM_MAX_JOBS", get("SEMANTICA_WARM_MAX_JOBS", "1000"), 1, 10**9
        ),
        warm_max_rss_mb=_int(
            "SEMANTICA_WARM_MAX_RSS_MB", get("SEMANTICA_WARM_MAX_RSS_MB", "512"), 1, 10**7
        ),
        runner_memory_mb=_int(
            "SEMANTICA_RUNNER_MEMORY_MB", get("SEMANTICA_RUNNER_MEMORY_MB", "8192"), 64, 10**8
        ),
        runner_max_files=_int(
            "SEMANTICA_RUNNER_MAX_FILES", get("SEMANTICA_RUNNER_MAX_FILES", "1024"), 16, 10**7
        ),
        runner_max_processes=_int(
            "SEMANTICA_RUNNER_MAX_PROCESSES",
            get("SEMANTICA_RUNNER_MAX_PROCESSES", "4096"),
            1,
            10**7,
        ),
        zygote=_choice("SEMANTICA_ZYGOTE", get("SEMANTICA_ZYGOTE", "on"), ("on", "off")) == "on",
        maintenance_hours=number("SEMANTICA_MAINTENANCE_HOURS", "24", 0.001, 8760),
        cpu_idle_percent=number("SEMANTICA_CPU_IDLE_PERCENT", "30", 0.1, 100),
        conditions_file=Path(raw).expanduser().absolute()
        if (raw := get("SEMANTICA_CONDITIONS_FILE", ""))
        else None,
    )
