"""Installing the daemon as a service: a systemd system or user unit, or a launchd
LaunchAgent, written with the real executable path and the settings in effect
(SEMANTICA_*, and the OTEL_* variables tracing reads), plus the commands that enable
it. `semantica-cli service` drives this.

The files under `systemd/` and `launchd/` in the repository are what `render_*`
produce for the default paths; a test keeps them equal.
"""

from __future__ import annotations

import os
import plistlib
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

UNIT_NAME = "semantica.service"
LAUNCHD_LABEL = "com.semantica.daemon"
SYSTEM_USER = "semantica"
SYSTEM_HOME = "/var/lib/semantica"
DEFAULT_EXECUTABLE = "/usr/local/bin/semantica"
# A system service does not see these (ProtectHome=yes; PrivateTmp=yes gives it its
# own empty /tmp): its executable cannot live there.
HIDDEN_BY_PROTECT_HOME = ("/home/", "/root/", "/run/user/")
HIDDEN_BY_PRIVATE_TMP = ("/tmp/", "/var/tmp/")


class ServiceError(Exception):
    """What went wrong, and what to do instead."""


@dataclass
class ServicePlan:
    kind: str  # "systemd-system", "systemd-user" or "launchd"
    path: Path
    content: str
    commands: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _quote_env(name: str, value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{name}={escaped}"'


def _literal(value: str) -> str:
    """A value systemd must take as it is: `%` would start a specifier (%h, %i)."""
    return value.replace("%", "%%")


def _exec_start(executable: str) -> str:
    """ExecStart's command, quoted when it holds a space or a quote (systemd splits the
    line at whitespace), with `%` and `$` escaped (specifiers, variable expansion)."""
    escaped = _literal(executable).replace("$", "$$")
    if not any(c.isspace() or c in "\"'\\" for c in escaped):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Beside SEMANTICA_*, the daemon reads these (SPEC §2; semantica/tracing.py).
CARRIED_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
)


def _settings(env: Mapping[str, str], drop: tuple[str, ...]) -> dict[str, str]:
    """The settings in effect that the service should keep: SEMANTICA_* and the OTLP
    exporter's, nothing else of the environment (no secrets, no PATH)."""
    return {
        k: v
        for k, v in sorted(env.items())
        if (k.startswith("SEMANTICA_") or k in CARRIED_VARIABLES) and k not in drop
    }


def render_system_unit(executable: str, env: Mapping[str, str]) -> str:
    settings = {"SEMANTICA_HOME": SYSTEM_HOME, "SEMANTICA_RPC_PORT": "0"}
    settings |= {
        k: _literal(v)
        for k, v in _settings(
            env, drop=("SEMANTICA_HOME", "SEMANTICA_SOCKET_PATH", "SEMANTICA_DB_PATH")
        ).items()
    }
    environment = "\n".join(_quote_env(k, v) for k, v in settings.items())
    return f"""\
# Semantica as a hardened system service (semantica-cli service install --system).
# `systemd-analyze security semantica.service` rates it about 1.2 ("OK"): what is left
# open is what jobs need (network, setrlimit for their sandbox, JIT compilers).
[Unit]
Description=Semantica: a local task queue for AI coding agents
After=network.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={_exec_start(executable)}
{environment}
User={SYSTEM_USER}
Group={SYSTEM_USER}
StateDirectory=semantica
StateDirectoryMode=0700
# The daemon pings at half this interval; a hung daemon is restarted.
WatchdogSec=30
Restart=on-failure
RestartSec=2
# SIGTERM to the daemon only: it drains (running jobs get 10 s), then stops them.
KillMode=mixed
TimeoutStopSec=30
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={SYSTEM_HOME}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
PrivateUsers=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
# Other users' processes are invisible; /proc/stat (the CPU-idle probe) stays readable.
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
CapabilityBoundingSet=
AmbientCapabilities=
SystemCallArchitectures=native
# @system-service keeps setrlimit (each runner limits itself) and fork/exec for jobs.
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @mount @swap @reboot @raw-io @module
SystemCallFilter=~@obsolete @debug @cpu-emulation @clock
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_user_unit(executable: str, env: Mapping[str, str]) -> str:
    settings = {"SEMANTICA_HOME": "%h/.semantica"}  # %h: systemd's home of the user
    settings |= {k: _literal(v) for k, v in _settings(env, drop=()).items()}
    environment = "\n".join(_quote_env(k, v) for k, v in settings.items())
    return f"""\
# Semantica as a user service (semantica-cli service install).
[Unit]
Description=Semantica: a local task queue for AI coding agents

[Service]
Type=notify
NotifyAccess=main
ExecStart={_exec_start(executable)}
{environment}
WatchdogSec=30
Restart=on-failure
RestartSec=2
KillMode=mixed
TimeoutStopSec=30
UMask=0077
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native

[Install]
WantedBy=default.target
"""


def render_plist(executable: str, env: Mapping[str, str], home: Path) -> str:
    settings = {"SEMANTICA_HOME": str(home / ".semantica")} | _settings(env, drop=())
    log = str(Path(settings["SEMANTICA_HOME"]) / "daemon.log")
    plist = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [executable],
        "EnvironmentVariables": settings,
        "RunAtLoad": True,
        "KeepAlive": True,
        "ProcessType": "Background",
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "Umask": 0o077,
    }
    return plistlib.dumps(plist, sort_keys=False).decode()


def daemon_executable() -> str:
    """The `semantica` script of this installation."""
    beside = Path(sys.executable).with_name("semantica")
    if beside.exists():
        return str(beside)
    found = shutil.which("semantica")
    if found:
        return found
    raise ServiceError(
        "cannot find the `semantica` executable next to this Python or on PATH: "
        "install Semantica (make install, or pip install) first"
    )


def plan_install(
    *,
    system: bool,
    platform: str = sys.platform,
    executable: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    user_exists: Callable[[str], bool] | None = None,
) -> ServicePlan:
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    exe = executable or daemon_executable()
    if platform.startswith("linux"):
        if system:
            return _plan_system(exe, env, user_exists or _user_exists)
        path = home / ".config/systemd/user" / UNIT_NAME
        return ServicePlan(
            "systemd-user",
            path,
            render_user_unit(exe, env),
            [
                ["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", UNIT_NAME],
            ],
            ["to keep it running while you are logged out: loginctl enable-linger $USER"],
        )
    if platform == "darwin":
        if system:
            raise ServiceError("--system is for Linux (systemd); on macOS install a LaunchAgent")
        path = home / "Library/LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        return ServicePlan(
            "launchd",
            path,
            render_plist(exe, env, home),
            [["launchctl", "bootstrap", f"gui/{os.getuid()}", str(path)]],
        )
    raise ServiceError(
        f"no service manager support for {platform!r}: Linux (systemd) and macOS (launchd) "
        "are supported; run `semantica` under your own supervisor"
    )


def _interpreter_of(exe: str) -> str | None:
    """The interpreter a script's #! line names, if any."""
    try:
        with open(exe, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return words[0] if words else None


def _plan_system(
    exe: str, env: Mapping[str, str], user_exists: Callable[[str], bool]
) -> ServicePlan:
    needed = [exe, os.path.realpath(exe)]
    if (interpreter := _interpreter_of(exe)) is not None:
        needed.append(os.path.realpath(interpreter))
    for hiding, where, setting in (
        (HIDDEN_BY_PROTECT_HOME, "a home directory, which the unit hides", "ProtectHome=yes"),
        (
            HIDDEN_BY_PRIVATE_TMP,
            "a temporary directory, which the unit replaces with an empty one of its own",
            "PrivateTmp=yes",
        ),
    ):
        if hidden := [p for p in needed if p.startswith(hiding)]:
            raise ServiceError(
                f"{hidden[0]} (what {exe} runs) is under {where} ({setting}): install "
                "Semantica elsewhere with a Python from elsewhere, e.g. `/usr/bin/python3 -m "
                "venv /opt/semantica && /opt/semantica/bin/pip install <checkout> "
                "<checkout>/runners`, then run `/opt/semantica/bin/semantica-cli service "
                "install --system`"
            )
    commands = []
    if not user_exists(SYSTEM_USER):
        commands.append(
            [
                "useradd",
                "--system",
                "--home-dir",
                SYSTEM_HOME,
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ]
        )
    commands += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]]
    return ServicePlan(
        "systemd-system",
        Path("/etc/systemd/system") / UNIT_NAME,
        render_system_unit(exe, env),
        commands,
        [f"its jobs run as the `{SYSTEM_USER}` user, with {SYSTEM_HOME} as SEMANTICA_HOME"],
    )


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


Runner = Callable[..., subprocess.CompletedProcess]


def _run_all(commands: list[list[str]], run: Runner) -> None:
    for command in commands:
        try:
            done = run(command, capture_output=True, text=True)
        except FileNotFoundError:
            raise ServiceError(
                f"`{command[0]}` is not installed here: run the remaining commands by hand "
                "on a machine with it"
            ) from None
        if done.returncode != 0:
            raise ServiceError(
                f"`{' '.join(command)}` failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()}"
            )


def install(plan: ServicePlan, *, dry_run: bool, run: Runner = subprocess.run) -> None:
    """Write the file (0644) and run the commands; with `dry_run`, do nothing."""
    if dry_run:
        return
    if plan.path.exists() and plan.path.read_text() != plan.content:
        backup = plan.path.with_name(plan.path.name + ".bak")
        shutil.copy2(plan.path, backup)
        plan.notes.append(f"the previous file is kept as {backup}")
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.path.with_name(plan.path.name + ".tmp")
    tmp.write_text(plan.content)
    tmp.chmod(0o644)
    tmp.replace(plan.path)
    try:
        _run_all(plan.commands, run)
    except ServiceError as exc:
        raise ServiceError(
            f"{exc}\n{plan.path} is written; once that is fixed, run: "
            + "; ".join(" ".join(c) for c in plan.commands)
        ) from None


def plan_uninstall(
    *, system: bool, platform: str = sys.platform, home: Path | None = None
) -> ServicePlan:
    home = Path.home() if home is None else home
    if platform.startswith("linux"):
        ctl = ["systemctl"] if system else ["systemctl", "--user"]
        path = (
            Path("/etc/systemd/system") / UNIT_NAME
            if system
            else home / ".config/systemd/user" / UNIT_NAME
        )
        kind = "systemd-system" if system else "systemd-user"
        return ServicePlan(
            kind,
            path,
            "",
            [[*ctl, "disable", "--now", UNIT_NAME], [*ctl, "daemon-reload"]],
            [f"the data in {SYSTEM_HOME if system else _user_home_setting()} is kept"],
        )
    if platform == "darwin":
        path = home / "Library/LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        return ServicePlan(
            "launchd", path, "", [["launchctl", "bootout", f"gui/{os.getuid()}", str(path)]]
        )
    raise ServiceError(f"no service manager support for {platform!r}")


def _user_home_setting() -> str:
    return os.environ.get("SEMANTICA_HOME") or "~/.semantica"


def uninstall(plan: ServicePlan, *, dry_run: bool, run: Runner = subprocess.run) -> None:
    """Stop and disable the service, then remove its file: removed even when the
    service manager cannot be reached (no user bus), which the error then says."""
    if dry_run:
        return
    if not plan.path.exists():
        raise ServiceError(f"{plan.path} does not exist: the service is not installed there")
    try:
        _run_all(plan.commands[:1], run)  # stop and disable while the file is still there
    except ServiceError as exc:
        plan.path.unlink()
        raise ServiceError(
            f"{exc}\n{plan.path} is removed; if the daemon still runs, stop it with "
            "`semantica-cli shutdown`"
        ) from None
    plan.path.unlink()
    _run_all(plan.commands[1:], run)


def status_command(*, system: bool, platform: str = sys.platform) -> list[str]:
    if platform.startswith("linux"):
        return [*(["systemctl"] if system else ["systemctl", "--user"]), "status", UNIT_NAME]
    if platform == "darwin":
        return ["launchctl", "print", f"gui/{os.getuid()}/{LAUNCHD_LABEL}"]
    raise ServiceError(f"no service manager support for {platform!r}")


# The repository's copies, rendered for the default paths (`make service-files`).
REPO_FILES = {
    "systemd/semantica.service": lambda: render_system_unit(DEFAULT_EXECUTABLE, {}),
    "systemd/semantica-user.service": lambda: render_user_unit(DEFAULT_EXECUTABLE, {}),
    f"launchd/{LAUNCHD_LABEL}.plist": lambda: render_plist(
        DEFAULT_EXECUTABLE, {}, Path("/Users/USERNAME")
    ),
}

if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for name, render in REPO_FILES.items():
        (root / name).write_text(render())
        print(f"wrote {root / name}")
