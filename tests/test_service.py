"""The service files and `semantica-cli service`: systemd units checked by
systemd-analyze (verify, and the system unit's security exposure), the LaunchAgent
parsed with plistlib, and install/uninstall with the commands they would run."""

from __future__ import annotations

import json
import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semantica import service

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("semantica-cli"))
EXPOSURE_LIMIT = 2.0


def analyzer() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: `make test` installs it (Debian: systemd)")
    return found


def rendered(tmp_path: Path) -> tuple[Path, Path]:
    system = tmp_path / "semantica.service"
    user = tmp_path / "semantica-user.service"
    system.write_text(service.render_system_unit("/bin/true", {"SEMANTICA_WORKERS": "4"}))
    user.write_text(service.render_user_unit("/bin/true", {}))
    return system, user


def test_the_repositorys_files_are_what_the_installer_writes():
    for name, render in service.REPO_FILES.items():
        assert (REPO / name).read_text() == render(), f"{name}: run `make service-files`"


def test_both_units_pass_systemd_analyze_verify(tmp_path):
    system, user = rendered(tmp_path)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    for unit, extra in ((system, []), (user, ["--user"])):
        done = subprocess.run(
            [analyzer(), "verify", *extra, unit.name],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and done.stderr == "", (unit.name, done.stderr)


def test_the_system_unit_is_rated_ok_by_systemd_analyze_security(tmp_path):
    system, _user = rendered(tmp_path)
    done = subprocess.run(
        [analyzer(), "security", "--offline=yes", system.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for semantica\.service: ([\d.]+)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr
    assert float(found.group(1)) <= EXPOSURE_LIMIT


def test_the_system_unit_keeps_what_jobs_need(tmp_path):
    unit = service.render_system_unit("/bin/true", {})
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "UMask=0077" in unit
    assert "SystemCallFilter=@system-service" in unit  # keeps setrlimit, fork, execve
    assert "@resources" not in unit  # runners set their own resource limits
    assert "MemoryDenyWriteExecute" not in unit  # JIT compilers in jobs (node, java)
    assert "ProcSubset=pid" not in unit  # /proc/stat feeds the CPU-idle probe
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in unit


def test_the_launch_agent_parses_and_has_its_keys():
    plist = plistlib.loads((REPO / "launchd/com.semantica.daemon.plist").read_bytes())
    assert plist["Label"] == "com.semantica.daemon"
    assert plist["ProgramArguments"] == [service.DEFAULT_EXECUTABLE]
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["StandardOutPath"].endswith("/.semantica/daemon.log")
    assert plist["StandardErrorPath"] == plist["StandardOutPath"]
    assert plist["EnvironmentVariables"]["SEMANTICA_HOME"].endswith("/.semantica")


def test_plans_for_each_platform(tmp_path):
    env = {"SEMANTICA_WORKERS": "3", "HOME": "/x", "SECRET": "no"}
    user = service.plan_install(
        system=False, platform="linux", executable="/opt/s/bin/semantica", env=env, home=tmp_path
    )
    assert user.path == tmp_path / ".config/systemd/user/semantica.service"
    assert "ExecStart=/opt/s/bin/semantica" in user.content
    assert 'Environment="SEMANTICA_WORKERS=3"' in user.content and "SECRET" not in user.content
    assert ["systemctl", "--user", "enable", "--now", "semantica.service"] in user.commands

    system = service.plan_install(
        system=True,
        platform="linux",
        executable="/bin/true",
        env=env,
        user_exists=lambda name: False,
    )
    assert system.path == Path("/etc/systemd/system/semantica.service")
    assert system.commands[0][:2] == ["useradd", "--system"]
    assert 'Environment="SEMANTICA_HOME=/var/lib/semantica"' in system.content

    mac = service.plan_install(
        system=False, platform="darwin", executable="/bin/true", env={}, home=tmp_path
    )
    assert mac.path == tmp_path / "Library/LaunchAgents/com.semantica.daemon.plist"
    assert plistlib.loads(mac.content.encode())["ProgramArguments"] == ["/bin/true"]
    assert mac.commands[0][:2] == ["launchctl", "bootstrap"]

    with pytest.raises(service.ServiceError, match=r"Linux \(systemd\) and macOS"):
        service.plan_install(system=False, platform="win32", executable="/bin/true")


def test_a_system_unit_refuses_an_executable_the_unit_would_hide(tmp_path):
    script = tmp_path / "semantica"
    script.write_text("#!/root/venv/bin/python\n")
    with pytest.raises(service.ServiceError, match=r"ProtectHome=yes.*/usr/bin/python3 -m venv"):
        service.plan_install(system=True, platform="linux", executable=str(script), env={})


@pytest.mark.parametrize("place", ["/tmp/venv/bin/semantica", "/var/tmp/q/bin/semantica"])
def test_a_system_unit_refuses_an_executable_under_a_private_tmp(place):
    with pytest.raises(service.ServiceError, match=r"PrivateTmp=yes.*/opt/semantica"):
        service.plan_install(system=True, platform="linux", executable=place, env={})


def test_install_writes_the_file_and_runs_the_commands(tmp_path):
    plan = service.plan_install(
        system=False, platform="linux", executable="/bin/true", env={}, home=tmp_path
    )
    ran = []

    def run(command, **kw):
        ran.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    service.install(plan, dry_run=True, run=run)
    assert not plan.path.exists() and ran == []
    service.install(plan, dry_run=False, run=run)
    assert plan.path.read_text() == plan.content and ran == plan.commands
    assert oct(plan.path.stat().st_mode & 0o777) == "0o644"

    def failing(command, **kw):
        return subprocess.CompletedProcess(command, 1, "", "Failed to connect to bus")

    gone = service.plan_uninstall(system=False, platform="linux", home=tmp_path)
    ran.clear()
    service.uninstall(gone, dry_run=False, run=run)
    assert not plan.path.exists() and ran == gone.commands

    # No user bus (ssh without linger, a container): install says the file is written
    # and what is left to run; uninstall still removes it (it was left behind before).
    with pytest.raises(service.ServiceError) as info:
        service.install(plan, dry_run=False, run=failing)
    assert "failed (1): Failed to connect to bus" in str(info.value)
    assert f"{plan.path} is written; once that is fixed, run: systemctl --user" in str(info.value)
    assert plan.path.exists()
    with pytest.raises(service.ServiceError, match=f"{plan.path} is removed"):
        service.uninstall(gone, dry_run=False, run=failing)
    assert not plan.path.exists()


def test_the_data_kept_on_uninstall_is_where_semantica_home_says(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTICA_HOME", "/srv/queue")
    gone = service.plan_uninstall(system=False, platform="linux", home=tmp_path)
    assert gone.notes == ["the data in /srv/queue is kept"]


def test_a_path_with_a_space_or_a_percent_sign_survives_systemd(tmp_path):
    """ExecStart was not quoted (systemd split it at the space) and `%` in a setting
    was taken for a specifier."""
    place = tmp_path / "with space"
    place.mkdir()
    exe = place / "semantica"
    exe.symlink_to("/bin/true")
    unit = tmp_path / "semantica.service"
    unit.write_text(service.render_user_unit(str(exe), {"SEMANTICA_HOME": "/srv/50%/q"}))
    text = unit.read_text()
    assert f'ExecStart="{exe}"' in text and 'Environment="SEMANTICA_HOME=/srv/50%%/q"' in text
    done = subprocess.run(
        [analyzer(), "verify", "--user", unit.name],
        cwd=tmp_path,
        env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_cli_service_install_dry_run_prints_the_plan_and_changes_nothing(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        [CLI, "service", "install", "--dry-run", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["kind"] == "systemd-user"
    assert plan["path"] == str(tmp_path / ".config/systemd/user/semantica.service")
    assert f"ExecStart={Path(sys.executable).with_name('semantica')}" in plan["content"]
    assert "systemctl --user enable --now semantica.service" in plan["commands"]
    assert not (tmp_path / ".config").exists()
    human = subprocess.run(
        [CLI, "service", "install", "--dry-run"], capture_output=True, text=True, env=env
    )
    assert "would write" in human.stdout and "commands to run:" in human.stdout


def fake_systemctl(tmp_path: Path, exit_code: int) -> tuple[dict[str, str], Path]:
    """A PATH whose `systemctl` records its arguments and exits `exit_code`."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "systemctl-calls"
    bin_dir.mkdir()
    script = bin_dir / "systemctl"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\necho "semantica.service - inactive (fake)"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return env, calls


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=30)


def test_cli_service_uninstall_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    env, calls = fake_systemctl(tmp_path, 0)
    unit = tmp_path / ".config/systemd/user/semantica.service"
    unit.parent.mkdir(parents=True)
    unit.write_text("[Service]\n")
    done = run_cli(env, "service", "uninstall", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["kind"] == "systemd-user" and plan["path"] == str(unit)
    assert plan["commands"] == [
        "systemctl --user disable --now semantica.service",
        "systemctl --user daemon-reload",
    ]
    human = run_cli(env, "service", "uninstall", "--dry-run")
    assert human.returncode == 0, human.stderr
    assert f"would remove {unit}" in human.stdout and "commands to run:" in human.stdout
    assert "  systemctl --user daemon-reload" in human.stdout.splitlines()
    assert unit.exists() and not calls.exists()  # nothing removed, nothing run


def test_cli_service_status_shows_what_the_service_manager_says(tmp_path):
    env, calls = fake_systemctl(tmp_path, 3)  # systemctl status: 3 = not running
    done = run_cli(env, "service", "status", "--json")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout) == {
        "command": "systemctl --user status semantica.service",
        "exit_code": 3,
        "output": "semantica.service - inactive (fake)",
    }
    assert calls.read_text() == "--user status semantica.service\n"
    human = run_cli(env, "service", "status", "--system")
    assert human.returncode == 1 and human.stdout.strip() == "semantica.service - inactive (fake)"
    assert calls.read_text().splitlines()[-1] == "status semantica.service"


def test_cli_service_status_without_systemctl_is_one_clear_line(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "PATH": str(tmp_path)}  # no systemctl
    done = run_cli(env, "service", "status")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: `systemctl` is not installed here"]
    as_json = run_cli(env, "service", "status", "--json")
    assert json.loads(as_json.stderr)["error"]["code"] == "error"


def _hidden_by_the_system_unit(exe: str) -> str | None:
    """What the installer checks: the setting of the unit that would hide this
    executable or its #! (a checkout in a home directory, or in /tmp), if any."""
    paths = [exe, os.path.realpath(exe)]
    first = Path(exe).read_bytes().split(b"\n", 1)[0]
    if first.startswith(b"#!"):
        paths.append(os.path.realpath(first[2:].decode().split()[0]))
    if any(p.startswith(service.HIDDEN_BY_PROTECT_HOME) for p in paths):
        return "ProtectHome=yes"
    if any(p.startswith(service.HIDDEN_BY_PRIVATE_TMP) for p in paths):
        return "PrivateTmp=yes"
    return None


def test_cli_service_install_system_dry_run(tmp_path):
    env, calls = fake_systemctl(tmp_path, 0)
    exe = str(Path(sys.executable).with_name("semantica"))
    done = run_cli(env, "service", "install", "--system", "--dry-run", "--json")
    if hidden := _hidden_by_the_system_unit(exe):  # e.g. a Python under /root
        assert done.returncode == 1 and done.stdout == ""
        [line] = done.stderr.splitlines()
        error = json.loads(line)["error"]
        assert error["code"] == "error" and hidden in error["message"]
        human = run_cli(env, "service", "install", "--system", "--dry-run")
        assert human.returncode == 1 and len(human.stderr.splitlines()) == 1
        assert human.stderr.startswith("error: ") and "/usr/bin/python3 -m venv" in human.stderr
    else:
        assert done.returncode == 0, done.stderr
        plan = json.loads(done.stdout)
        assert plan["dry_run"] and plan["kind"] == "systemd-system"
        assert plan["path"] == "/etc/systemd/system/semantica.service"
        assert f"ExecStart={exe}" in plan["content"] and "User=semantica" in plan["content"]
        assert "systemctl enable --now semantica.service" in plan["commands"]
    assert not calls.exists()  # a dry run runs nothing


def test_install_carries_the_tracing_variables_and_no_other(tmp_path):
    env = {
        "HOME": str(tmp_path),
        "PATH": os.environ["PATH"],
        "SEMANTICA_WORKERS": "2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4318",
        "OTEL_SERVICE_NAME": "semantica-dev",
        "OTEL_RESOURCE_ATTRIBUTES": "not=carried",
        "AWS_SECRET_ACCESS_KEY": "no",
    }
    done = run_cli(env, "service", "install", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    content = json.loads(done.stdout)["content"]
    environment = [x for x in content.splitlines() if x.startswith("Environment=")]
    assert environment == [
        'Environment="SEMANTICA_HOME=%h/.semantica"',
        'Environment="OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318"',
        'Environment="OTEL_SERVICE_NAME=semantica-dev"',
        'Environment="SEMANTICA_WORKERS=2"',
    ]
    system = service.render_system_unit("/bin/true", env)
    assert 'Environment="OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318"' in system
    assert "AWS_SECRET" not in system and "OTEL_RESOURCE_ATTRIBUTES" not in system
    plist = plistlib.loads(service.render_plist("/bin/true", env, tmp_path).encode())
    assert plist["EnvironmentVariables"]["OTEL_SERVICE_NAME"] == "semantica-dev"


# What a job and the daemon need from the kernel under the system unit's filter: fork
# and exec for jobs, setrlimit (glibc calls prlimit64) for each runner's own limits,
# a new session per runner, the parent watch (pidfd), and stopping process groups.
NEEDED_SYSCALLS = (
    "fork", "vfork", "clone", "clone3", "execve", "setrlimit", "prlimit64", "setsid",
    "prctl", "pidfd_open", "kill", "wait4", "umask", "chdir", "socket", "bind",
)  # fmt: skip


def _syscalls(analyzer_path: str, group: str, seen: set[str] | None = None) -> set[str]:
    """Every syscall of a systemd syscall-filter group, nested groups expanded."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    listing = subprocess.run(
        [analyzer_path, "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in listing.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        names |= _syscalls(analyzer_path, word, seen) if word.startswith("@") else {word}
    return names


def test_the_system_units_syscall_filter_lets_jobs_run_and_limit_themselves():
    """As far as this machine can show without running the unit under systemd (it is
    not PID 1 here): every syscall jobs and runners need is allowed by the filter."""
    tool = analyzer()
    unit = service.render_system_unit("/bin/true", {})
    allowed: set[str] = set()
    denied: set[str] = set()
    for line in unit.splitlines():
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        target = denied if value.startswith("~") else allowed
        for item in value.lstrip("~").split():
            target |= _syscalls(tool, item) if item.startswith("@") else {item}
    missing = [s for s in NEEDED_SYSCALLS if s not in allowed or s in denied]
    assert not missing, f"the system unit's SystemCallFilter blocks {missing}"
