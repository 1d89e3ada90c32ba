"""`semantica-cli`: the command line for people and for agents' shells (SPEC §7).

People get rich tables, panels and progress; programs get `--json` (one JSON
document, or JSON lines for `logs --follow`), `enqueue -q` (the id only) and exit
codes: 0 ok, 1 an error or a job that ended other than DONE, 2 usage, 3 the daemon
is not running. When the daemon is down, `list`, `show`, `logs` and `status` read
its database (read-only) and log files, and say so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from semantica import cli_view as view
from semantica import config as config_mod
from semantica import joblog
from semantica import protocol as p
from semantica.client import START_HINT, Client
from semantica.domain import Job, State, ValidationError, waiting_reason
from semantica.errors import ConnectionLost, DaemonNotRunning, SemanticaError, error_for
from semantica.store import JobFilter, Store, StoreError
from semantica.store import NotFound as StoreNotFound

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
FOLLOW_WAIT_MS = 5_000
WAIT_STEP_MS = 500

app = typer.Typer(
    name="semantica-cli",
    help="Semantica: a local task queue for AI coding agents. Talks to the daemon "
    "(`semantica`) over its Unix socket.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output (not --json) is read by people through a pager or a log: no 80-column cut.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON document instead of a table.")
]


class UsageProblem(Exception):
    """A flag's value is wrong: exit 2, like typer's own usage errors."""


PATH_SETTINGS = (
    "SEMANTICA_HOME",
    "SEMANTICA_SOCKET_PATH",
    "SEMANTICA_DB_PATH",
)  # what the CLI reads


class Session:
    """Where the daemon is (from --home/--socket or SEMANTICA_* variables)."""

    def __init__(self, home: str | None, socket: str | None) -> None:
        overrides = {"SEMANTICA_HOME": home, "SEMANTICA_SOCKET_PATH": socket}
        try:
            self.config = config_mod.load(overrides=overrides)
        except config_mod.ConfigError:
            # A bad setting only the daemon reads (SEMANTICA_WORKERS=-3 in this shell)
            # must not cost the CLI its reads: it needs only where the daemon is.
            try:
                where = {k: v for k, v in os.environ.items() if k in PATH_SETTINGS}
                self.config = config_mod.load(env=where, overrides=overrides)
            except config_mod.ConfigError as exc:
                raise UsageProblem(str(exc)) from None
        if self.config.home.exists() and not self.config.home.is_dir():
            raise UsageProblem(
                f"{self.config.home} is not a directory: point --home (or SEMANTICA_HOME) "
                "at the daemon's data directory"
            )
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.config.socket_path, home=self.config.home)
        return self._client

    def offline(self) -> Offline:
        return Offline(self.config)


class Offline:
    """A stopped daemon's data: its database opened read-only and its log files."""

    def __init__(self, config: config_mod.Config) -> None:
        self.config = config
        if not config.db_path.exists():
            raise DaemonNotRunning(
                f"the Semantica daemon is not running, and has not run with this home "
                f"(no database at {config.db_path}): {START_HINT}"
            )
        self.store = Store.open_read_only(config.db_path)
        err.print(
            f"[yellow]the daemon is not running: showing the data it left in "
            f"{config.db_path} (read-only); {START_HINT}[/]"
        )

    def get(self, job_id: str) -> Job:
        with _as_daemon_errors():
            job = self.store.get(job_id)
            if job.state is not State.QUEUED:
                return job
            now = time.time_ns() // 1_000_000
            # The reasons read from the database; nothing starts while no daemon runs.
            reason = waiting_reason(
                job, self.store.wait_facts(job, now=now, global_limit=1 << 30), now
            )
            if reason is None or reason.startswith("ready"):
                reason = "it starts once the daemon runs"
            return msgspec.structs.replace(job, waiting_reason=f"{reason} (daemon not running)")

    def list(self, **filters: Any) -> p.JobPage:
        limit, cursor = filters.pop("limit"), filters.pop("cursor")
        with _as_daemon_errors():
            jobs, next_cursor = self.store.list(
                msgspec.convert(filters, JobFilter), limit=limit, cursor=cursor
            )
        return p.JobPage(jobs=jobs, next_cursor=next_cursor)

    def logs(self, job_id: str, *, n: int) -> p.LogChunk:
        with _as_daemon_errors():
            if not 0 <= n <= joblog.TAIL_MAX_LINES:  # as logs.tail.v1 checks it
                raise ValidationError("n", f"must be between 0 and {joblog.TAIL_MAX_LINES}")
            self.store.get(job_id)  # NotFound if there is no such job
        lines, size = joblog.last_lines(self.config.logs_dir / f"{job_id}.log", n)
        return p.LogChunk(lines=lines, offset=size, eof=True)


@contextlib.contextmanager
def _as_daemon_errors() -> Iterator[None]:
    """The store's errors as the daemon would answer them (4001, 4004): the same
    message, code and `--json` document whether or not the daemon runs."""
    try:
        yield
    except (ValidationError, StoreNotFound) as exc:
        raise error_for(exc) from None


_session: Session | None = None


def session() -> Session:
    assert _session is not None, "main_options runs before every command"
    return _session


def _error_code(problem: str | Exception, exit_code: int) -> str | int:
    """The daemon's own error code (4004, ...) when it answered; else what went wrong
    on this side: "daemon_not_running", "connection_lost", "usage" or "error"."""
    if isinstance(problem, DaemonNotRunning):
        return "daemon_not_running"
    if isinstance(problem, ConnectionLost):
        return "connection_lost"
    if isinstance(problem, SemanticaError) and problem.code:
        return problem.code
    return "usage" if exit_code == EXIT_USAGE else "error"


def error_document(problem: str | Exception, exit_code: int) -> dict[str, Any]:
    """`{"error": {"code", "message", "data"}}`, as `--json` prints it on stderr."""
    if isinstance(problem, SemanticaError):
        message, data = problem.message, problem.data
    else:
        message, data = str(problem), None
    return {"error": {"code": _error_code(problem, exit_code), "message": message, "data": data}}


def report(problem: str | Exception, exit_code: int, as_json: bool, hint: str = "") -> None:
    """One error on stderr: a red line for people (and a dim hint), one JSON line with --json."""
    if as_json:
        line = json.dumps(error_document(problem, exit_code))
        err.print_json(line, indent=None) if err.is_terminal else print(line, file=sys.stderr)
        return
    text = problem.message if isinstance(problem, SemanticaError) else str(problem)
    err.print(Text(f"error: {text}", style="bold red"))
    if hint:
        err.print(Text(hint, style="dim"))


def fail(message: str | Exception, code: int, as_json: bool) -> NoReturn:
    report(message, code, as_json)
    raise typer.Exit(code)


@contextlib.contextmanager
def failures(as_json: bool) -> Iterator[None]:
    """One clear line (or a JSON error document) and an exit code; never a traceback."""
    try:
        yield
    except DaemonNotRunning as exc:
        fail(exc, EXIT_NOT_RUNNING, as_json)
    except UsageProblem as exc:
        fail(str(exc), EXIT_USAGE, as_json)
    except SemanticaError as exc:
        fail(exc, EXIT_FAILED, as_json)
    except StoreError as exc:  # reading a stopped daemon's database
        fail(f"{exc}", EXIT_FAILED, as_json)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@contextlib.contextmanager
def reading(as_json: bool) -> Iterator[Any]:
    """The daemon if it runs, else its data read-only (for list, show, logs, status)."""
    with failures(as_json):
        s = session()
        try:
            source: Client | Offline = s.client.connect()
        except DaemonNotRunning:
            source = s.offline()
        yield source


def emit(data: Any, as_json: bool, human: Any = None) -> None:
    if as_json:
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    elif human is not None:
        out.print(human)


# --------------------------------------------------------------------------- options


def parse_payload(raw: str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    source = "--payload"
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        try:
            raw = path.read_text()
        except OSError as exc:
            raise UsageProblem(f"--payload @{path}: cannot read it ({exc.strerror})") from None
        source = f"--payload @{path}"
    try:
        payload = json.loads(raw, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise UsageProblem(f"{source} is not JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # NaN, Infinity: Python reads them, JSON has none
        raise UsageProblem(f"{source} is not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise UsageProblem(f'{source} must be a JSON object, like {{"path": "src/main.py"}}')
    return payload


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value; use a number, a string or null")


_RELATIVE = re.compile(r"^\+?(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_when(raw: str | None, now_ms: int) -> int | None:
    """Epoch milliseconds, a relative `+30s` / `+5m` / `+2h`, or an ISO 8601 time."""
    if raw is None:
        return None
    if raw.isdigit():
        return int(raw)
    if m := _RELATIVE.match(raw):
        return now_ms + int(float(m.group(1)) * _UNIT_MS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise UsageProblem(
            f"--schedule-at {raw!r}: give epoch milliseconds, +30s / +5m / +2h, "
            "or an ISO 8601 time like 2026-12-01T09:00"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()  # a local time, as a person means it
    return int(when.timestamp() * 1000)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageProblem(f"--env {pair!r}: write NAME=VALUE")
        env[name] = value
    return env


# --------------------------------------------------------------------------- app


@app.callback()
def main_options(
    home: Annotated[
        str | None,
        typer.Option(help="The daemon's home (default $SEMANTICA_HOME or ~/.semantica)."),
    ] = None,
    socket: Annotated[
        str | None,
        typer.Option(help="The daemon's socket (default $SEMANTICA_SOCKET_PATH or HOME/...)."),
    ] = None,
) -> None:
    global _session
    with failures(as_json="--json" in sys.argv):
        _session = Session(home, socket)


@app.command()
def enqueue(
    job_type: Annotated[str, typer.Argument(help="The runner to use, e.g. index_file.")],
    payload: Annotated[
        str | None, typer.Option("--payload", "-p", help="JSON object, or @file holding one.")
    ] = None,
    subject: Annotated[
        str | None,
        typer.Option("--subject", "-s", help="Subject key: a newer request for it supersedes."),
    ] = None,
    queue: Annotated[str, typer.Option("--queue", "-Q")] = "default",
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    generation: Annotated[int | None, typer.Option(help="Your own generation number.")] = None,
    mode: Annotated[str, typer.Option(help="SUBPROCESS or WARM.")] = "SUBPROCESS",
    max_attempts: int = 3,
    backoff_base_ms: int = 1000,
    backoff_factor: float = 2.0,
    deadline_ms: int = 60_000,
    ttl_ms: Annotated[int | None, typer.Option(help="Expire if not started in time.")] = None,
    schedule_at: Annotated[
        str | None, typer.Option(help="Not before: epoch ms, +30s/+5m/+2h, or ISO 8601.")
    ] = None,
    wait_for_idle: Annotated[bool, typer.Option(help="Start only when the CPU is idle.")] = False,
    require_charging: Annotated[bool, typer.Option(help="Start only on AC power.")] = False,
    depends_on: Annotated[
        list[str] | None, typer.Option("--depends-on", help="A job id to wait for; repeat.")
    ] = None,
    tag: Annotated[str | None, typer.Option(help="A tag to list or cancel by.")] = None,
    parent: Annotated[str | None, typer.Option(help="The parent job's id.")] = None,
    chain: Annotated[str | None, typer.Option(help="A chain id to list or cancel by.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE for the job; repeat.")
    ] = None,
    supersede_running: Annotated[
        bool, typer.Option(help="Also stop a running job of the same subject.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Enqueue a job."""
    with failures(as_json):
        fields: dict[str, Any] = {
            "job_type": job_type,
            "queue": queue,
            "subject_key": subject,
            "generation": generation,
            "payload": parse_payload(payload),
            "priority": priority,
            "execution_mode": mode.upper(),
            "max_attempts": max_attempts,
            "backoff_base_ms": backoff_base_ms,
            "backoff_factor": backoff_factor,
            "deadline_ms": deadline_ms,
            "ttl_ms": ttl_ms,
            "schedule_at": parse_when(schedule_at, view.now_ms()),
            "wait_for_idle": wait_for_idle,
            "require_charging": require_charging,
            "depends_on": depends_on or [],
            "user_tag": tag,
            "parent_job_id": parent,
            "chain_group_id": chain,
            "env": parse_env(env or []),
            "supersede_running": supersede_running,
        }
        job = session().client.enqueue(**{k: v for k, v in fields.items() if v is not None})
        if quiet and not as_json:
            print(job.id)
            return
        emit(
            job,
            as_json,
            Text.assemble("enqueued ", (job.id, "bold"), " ", view.state_text(job.state)),
        )


@app.command("list")
def list_jobs(
    state: Annotated[str | None, typer.Option(help="QUEUED, RUNNING, DONE, FAILED, ...")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-Q")] = None,
    job_type: Annotated[str | None, typer.Option("--type")] = None,
    tag: str | None = None,
    chain: str | None = None,
    subject: str | None = None,
    parent: Annotated[str | None, typer.Option(help="Only the children of this job id.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 20,
    cursor: Annotated[str | None, typer.Option(help="From a previous --json page.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    with reading(as_json) as source:
        if state is not None and state.upper() not in State.__members__:
            raise UsageProblem(f"--state {state!r}: use one of {', '.join(State.__members__)}")
        page = source.list(
            state=state.upper() if state else None,
            queue=queue,
            job_type=job_type,
            tag=tag,
            chain=chain,
            subject=subject,
            parent=parent,
            limit=limit,
            cursor=cursor,
        )
        if as_json:
            emit(page, True)
        elif not page.jobs:
            out.print("no jobs match", style="dim")
        else:
            out.print(view.jobs_table(page.jobs))
            if page.next_cursor:
                out.print(f"[dim]more: --cursor {page.next_cursor}[/]")


app.command("ls", help="List jobs (same as `list`).")(list_jobs)


@app.command()
def show(job_id: str, as_json: JsonOpt = False) -> None:
    """Show one job: state, why it waits, attempts, error, result."""
    with reading(as_json) as source:
        job = source.get(job_id)
        emit(job, as_json, view.job_panel(job))


@app.command()
def cancel(
    job_id: Annotated[str | None, typer.Argument()] = None,
    tag: Annotated[
        str | None, typer.Option(help="Cancel every unfinished job with this tag.")
    ] = None,
    chain: Annotated[str | None, typer.Option(help="Cancel a whole chain.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a job by id, or all unfinished jobs with a tag or in a chain."""
    with failures(as_json):
        if sum(x is not None for x in (job_id, tag, chain)) != 1:
            raise UsageProblem("give exactly one of: a job id, --tag TAG, --chain CHAIN")
        result = session().client.cancel(job_id, tag=tag, chain=chain)
        human = f"cancelled {len(result.cancelled)} job(s)"
        if result.dependents_cancelled:
            human += f" and {len(result.dependents_cancelled)} job(s) depending on them"
        emit(result, as_json, human)


@app.command()
def logs(
    job_id: str,
    n: Annotated[int, typer.Option("-n", "--lines", help="How many last lines.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show a job's log (stdout, stderr and its runner's lines)."""
    with reading(as_json) as source:
        chunk = source.logs(job_id, n=n)
        if as_json and not follow:
            emit(chunk, True)
            return
        _print_lines(job_id, chunk.lines, as_json)
        if not follow or isinstance(source, Offline):
            return
        offset = chunk.offset
        while True:
            chunk = source.logs(job_id, offset=offset, wait_ms=FOLLOW_WAIT_MS)
            _print_lines(job_id, chunk.lines, as_json)
            offset = chunk.offset
            if chunk.eof:
                return


def _print_lines(job_id: str, lines: list[str], as_json: bool) -> None:
    for line in lines:
        if as_json:
            sys.stdout.write(json.dumps({"job_id": job_id, "line": line}) + "\n")
        else:
            sys.stdout.write(line + "\n")
    sys.stdout.flush()


@app.command()
def wait(
    job_id: str,
    timeout: Annotated[
        float | None, typer.Option(help="Give up after this many seconds (exit 1).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Wait for a job to end, showing its progress. Exit 0 only if it ended DONE."""
    with failures(as_json):
        client = session().client
        deadline = None if timeout is None else time.monotonic() + timeout
        job = client.get(job_id)
        live = None if as_json or not out.is_terminal else Live(_wait_line(job), console=out)
        with live or contextlib.nullcontext():
            while not job.is_terminal:
                step = WAIT_STEP_MS if live else 30_000
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    step = min(step, max(1, int(left * 1000)))
                job = client.wait(job_id, timeout_ms=step)
                if live:
                    live.update(_wait_line(job))
        if as_json:
            emit(job, True)
        else:
            out.print(view.job_panel(job))
        if job.state is not State.DONE:
            if not job.is_terminal and not as_json:
                err.print(f"[yellow]still {job.state.value} after {timeout}s[/]")
            raise typer.Exit(EXIT_FAILED)


def _wait_line(job: Job) -> Any:
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    grid.add_row(view.state_text(job.state), job.id, view.progress_cell(job))
    if job.progress_message:
        grid.add_row("", job.progress_message, "")
    return grid


@app.command()
def retry(job_id: str, as_json: JsonOpt = False) -> None:
    """Run a FAILED, CANCELLED or EXPIRED job again, as a new job."""
    with failures(as_json):
        job = session().client.retry(job_id)
        emit(job, as_json, Text.assemble("retrying as ", (job.id, "bold")))


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Jobs by state, the database's size and the daemon's counters."""
    with reading(as_json) as source:
        if isinstance(source, Offline):
            stats = source.store.stats()
            doc = {
                "daemon_running": False,
                "jobs_by_state": stats.by_state,
                "jobs_by_queue": stats.by_queue,
                "db_size_bytes": stats.db_size_bytes,
            }
            emit(doc, as_json, view.stats_view(None, stats.by_state, stats.db_size_bytes))
            return
        result = source.stats()
        doc = {"daemon_running": True, **msgspec.to_builtins(result)}
        emit(doc, as_json, view.stats_view(result, result.jobs_by_state, result.db_size_bytes))


@app.command()
def queues(as_json: JsonOpt = False) -> None:
    """Every queue: paused or not, its limit and its jobs by state."""
    with failures(as_json):
        result = session().client.queues()
        emit(result, as_json, view.queues_table(result.queues))


@app.command()
def pause(queue: str, as_json: JsonOpt = False) -> None:
    """Stop starting jobs from a queue (running ones finish)."""
    with failures(as_json):
        info = session().client.pause(queue)
        emit(info, as_json, f"queue {info.name} paused")


@app.command()
def resume(queue: str, as_json: JsonOpt = False) -> None:
    """Start jobs from a paused queue again."""
    with failures(as_json):
        info = session().client.resume(queue)
        emit(info, as_json, f"queue {info.name} resumed")


@app.command()
def runners(as_json: JsonOpt = False) -> None:
    """The installed runner plugins (job types)."""
    with failures(as_json):
        result = session().client.runners()
        emit(result, as_json, view.runners_table(result.runners))


@app.command()
def metrics(as_json: JsonOpt = False) -> None:
    """The daemon's metrics: Prometheus text (as GET /metrics serves it), or --json stats."""
    with failures(as_json):
        client = session().client
        if as_json:
            emit(client.stats(), True)
        else:
            sys.stdout.write(client.metrics_text())


@app.command()
def maintenance(
    force_vacuum: Annotated[
        bool, typer.Option(help="Rewrite the whole file (holds the daemon while it runs).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete finished jobs past retention and orphaned files; checkpoint; vacuum."""
    with failures(as_json):
        r = session().client.maintenance(force_vacuum=force_vacuum)
        human = (
            f"removed {r.jobs_deleted} finished job(s), {r.files_deleted} of their files, "
            f"{r.orphans_deleted} orphaned file(s); vacuum: {r.vacuum}; database "
            f"{r.db_bytes_before / 1048576:.1f} → {r.db_bytes_after / 1048576:.1f} MiB "
            f"in {view.duration(r.duration_ms)}"
        )
        emit(r, as_json, human)


@app.command()
def backup(
    path: Annotated[Path, typer.Argument(help="A new file for the copy.")],
    as_json: JsonOpt = False,
) -> None:
    """Write a consistent copy of the database while the daemon keeps serving."""
    with failures(as_json):
        r = session().client.backup(path.expanduser().absolute())
        emit(
            r, as_json, f"backed up to {r.path} ({r.bytes / 1048576:.1f} MiB) in {r.duration_ms} ms"
        )


@app.command()
def shutdown(as_json: JsonOpt = False) -> None:
    """Ask the daemon to drain and stop."""
    with failures(as_json):
        result = session().client.shutdown()
        emit(result, as_json, "the daemon is stopping (running jobs get a grace period)")


from semantica.cli_service import service_app  # noqa: E402 - it imports this module

app.add_typer(service_app, name="service")


def main() -> None:
    as_json = "--json" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # typer's usage errors, shown our way: no box
        code = getattr(exc, "exit_code", EXIT_USAGE)
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help
            ctx = getattr(exc, "ctx", None)
            hint = f"try `{ctx.command_path} --help`" if ctx is not None else ""
            report(exc.format_message(), code, as_json, hint)
    except typer.Abort:
        report("aborted", EXIT_FAILED, as_json)
        code = EXIT_FAILED
    except Exception as exc:  # a bug of ours: one line, not a traceback (unless asked)
        if os.environ.get("SEMANTICA_DEBUG"):
            raise
        report(
            f"semantica-cli failed unexpectedly ({exc!r}); run again with SEMANTICA_DEBUG=1 "
            "for the traceback, and please report it",
            EXIT_FAILED,
            as_json,
        )
        code = EXIT_FAILED
    # Without standalone mode typer returns the exit code of a typer.Exit, else what
    # the command returned (None).
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
