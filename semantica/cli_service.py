"""`semantica-cli service install|uninstall|status`: the daemon as a systemd or launchd
service (see service.py). Prints the file it writes and each command it runs."""

from __future__ import annotations

import subprocess
from typing import Annotated

import typer

from semantica import service
from semantica.cli import EXIT_FAILED, JsonOpt, emit, fail, failures, out

service_app = typer.Typer(
    help="Install the daemon as a service (systemd on Linux, launchd on macOS).",
    no_args_is_help=True,
)

SystemOpt = Annotated[
    bool, typer.Option("--system", help="A system unit with its own user (Linux, as root).")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the file and the commands; change nothing.")
]


def _show(plan: service.ServicePlan, verb: str, dry_run: bool, as_json: bool) -> None:
    doc = {
        "kind": plan.kind,
        "path": str(plan.path),
        "content": plan.content,
        "commands": [" ".join(c) for c in plan.commands],
        "notes": plan.notes,
        "dry_run": dry_run,
    }
    if as_json:
        emit(doc, True)
        return
    if plan.content:
        out.print(f"[bold]{'would write' if dry_run else 'wrote'} {plan.path}[/]")
        out.print(plan.content, markup=False, highlight=False)
    elif verb == "uninstall":
        out.print(f"[bold]{'would remove' if dry_run else 'removed'} {plan.path}[/]")
    heading = "commands to run" if dry_run else "ran"
    if plan.commands:
        out.print(f"[bold]{heading}:[/]")
        for command in doc["commands"]:
            out.print(f"  {command}", markup=False)
    for note in plan.notes:
        out.print(f"[dim]note: {note}[/]")


@service_app.command()
def install(system: SystemOpt = False, dry_run: DryRunOpt = False, as_json: JsonOpt = False):
    """Write the unit (or plist) for this installation and enable it."""
    with failures(as_json):
        try:
            plan = service.plan_install(system=system)
            service.install(plan, dry_run=dry_run)
        except (service.ServiceError, OSError) as exc:
            fail(exc, EXIT_FAILED, as_json)
        _show(plan, "install", dry_run, as_json)


@service_app.command()
def uninstall(system: SystemOpt = False, dry_run: DryRunOpt = False, as_json: JsonOpt = False):
    """Stop and disable the service and remove its file (the data stays)."""
    with failures(as_json):
        try:
            plan = service.plan_uninstall(system=system)
            service.uninstall(plan, dry_run=dry_run)
        except (service.ServiceError, OSError) as exc:
            fail(exc, EXIT_FAILED, as_json)
        _show(plan, "uninstall", dry_run, as_json)


@service_app.command()
def status(system: SystemOpt = False, as_json: JsonOpt = False):
    """The service manager's view of the service."""
    with failures(as_json):
        try:
            command = service.status_command(system=system)
            done = subprocess.run(command, capture_output=True, text=True)
        except service.ServiceError as exc:
            fail(exc, EXIT_FAILED, as_json)
        except FileNotFoundError:
            fail(f"`{command[0]}` is not installed here", EXIT_FAILED, as_json)
        text = (done.stdout or done.stderr).strip()
        if as_json:
            emit({"command": " ".join(command), "exit_code": done.returncode, "output": text}, True)
        else:
            out.print(text, markup=False, highlight=False)
        if done.returncode != 0:
            raise typer.Exit(EXIT_FAILED)
