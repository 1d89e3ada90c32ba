"""How the CLI shows things to a person: rich tables and panels, coloured states,
relative times. Nothing here talks to the daemon; `cli.py` passes the data in."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from semantica.domain import Job, State
from semantica.plugins import RunnerInfo
from semantica.protocol import StatsResult
from semantica.store import QueueInfo

STATE_STYLE = {
    State.QUEUED: "yellow",
    State.RUNNING: "bold blue",
    State.DONE: "green",
    State.FAILED: "bold red",
    State.CANCELLED: "magenta",
    State.EXPIRED: "magenta",
    State.SUPERSEDED: "dim",
}
STATE_ORDER = [s.value for s in State]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def state_text(state: State | str) -> Text:
    state = State(state)
    return Text(state.value, style=STATE_STYLE[state])


def duration(ms: int | float | None) -> str:
    """123 ms, 4.2s, 3m05s, 2h10m, 3d4h."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{int(ms)}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h}h"


def relative(at_ms: int | None, now: int | None = None) -> str:
    """'5s ago', 'in 2m00s', or '-'."""
    if at_ms is None:
        return "-"
    delta = (now or now_ms()) - at_ms
    if abs(delta) < 1000:
        return "just now"
    return f"{duration(delta)} ago" if delta > 0 else f"in {duration(-delta)}"


def run_time(job: Job) -> int | None:
    if job.started_at is None:
        return None
    return (job.finished_at or now_ms()) - job.started_at


def progress_cell(job: Job) -> Any:
    if job.state is State.RUNNING and job.progress is not None:
        bar = ProgressBar(total=1.0, completed=job.progress, width=12)
        table = Table.grid(padding=(0, 1))
        table.add_row(bar, f"{job.progress:.0%}")
        return table
    return duration(run_time(job))


def _short(text: str | None, width: int = 48) -> str:
    if not text:
        return ""
    text = text.splitlines()[0] if text.strip() else text
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(text: str, style: str = "") -> Text:
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def jobs_table(jobs: list[Job]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    many_queues = len({job.queue for job in jobs}) > 1
    # Fixed columns never shrink; the text columns give way, one line per job.
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("TYPE", min_width=4)
    if many_queues:
        table.add_column("QUEUE", min_width=5)
    table.add_column("SUBJECT", min_width=7, max_width=32)
    table.add_column("TRY", no_wrap=True)
    table.add_column("AGE", no_wrap=True)
    table.add_column("TIME", no_wrap=True)
    table.add_column("NOTE", min_width=4)
    now = now_ms()
    for job in jobs:
        note = job.error_message if job.error_kind else (job.progress_message or "")
        table.add_row(
            job.id,
            state_text(job.state),
            _cell(job.job_type),
            *([_cell(job.queue)] if many_queues else []),
            _cell(job.subject_key or ""),
            f"{job.attempt}/{job.max_attempts}",
            relative(job.created_at, now).removesuffix(" ago"),
            progress_cell(job),
            _cell(_short(note, 200), style="red" if job.error_kind else ""),
        )
    return table


def job_panel(job: Job) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()

    def row(name: str, value: Any) -> None:
        if value not in (None, "", [], {}):
            grid.add_row(name, value if isinstance(value, Text | Table) else str(value))

    row("state", state_text(job.state))
    if job.state is State.QUEUED:
        row("waiting", job.waiting_reason or "ready: it starts when a worker is free")
    row("type", job.job_type)
    row("queue", job.queue)
    if job.subject_key is not None:
        row("subject", f"{job.subject_key}  (generation {job.generation})")
    row("priority", job.priority)
    row("attempts", f"{job.attempt} of {job.max_attempts}")
    now = now_ms()
    row("created", relative(job.created_at, now))
    if job.schedule_at is not None:
        row("scheduled", relative(job.schedule_at, now))
    if job.state is State.QUEUED and job.run_after > now:
        row("next try", relative(job.run_after, now))
    row("started", relative(job.started_at, now) if job.started_at else None)
    row("finished", relative(job.finished_at, now) if job.finished_at else None)
    row("ran for", duration(run_time(job)) if job.started_at else None)
    if job.progress is not None:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=1.0, completed=job.progress, width=30),
            f"{job.progress:.0%} {job.progress_message or ''}".rstrip(),
        )
        row("progress", bar)
    if job.error_kind:
        row("error", Text(f"{job.error_kind}: {job.error_message or ''}", style="red"))
    row("exit code", job.exit_code if job.error_kind else None)
    if job.result_summary is not None:
        row("result", json.dumps(job.result_summary, indent=2, ensure_ascii=False))
    row("artifacts", "\n".join(job.artifacts))
    row("depends on", "\n".join(job.depends_on))
    row("tag", job.user_tag)
    row("chain", job.chain_group_id)
    row("parent", job.parent_job_id)
    row("payload", json.dumps(job.payload, ensure_ascii=False) if job.payload else None)
    row("runner pid", job.runner_pid if job.state is State.RUNNING else None)
    return Panel(grid, title=f"job {job.id}", title_align="left", expand=False)


def stats_view(stats: StatsResult | None, by_state: dict[str, int], db_size: int) -> Group:
    states = Table(box=None, header_style="bold", pad_edge=False)
    states.add_column("STATE")
    states.add_column("JOBS", justify="right")
    for name in STATE_ORDER:
        if by_state.get(name):
            states.add_row(state_text(name), str(by_state[name]))
    if not any(by_state.values()):
        states.add_row(Text("no jobs yet", style="dim"), "")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("database", f"{db_size / 1024 / 1024:.1f} MiB")
    if stats is not None:
        facts.add_row("running", str(stats.running))
        facts.add_row("uptime", duration(stats.uptime_s * 1000))
        c = stats.counters
        facts.add_row(
            "since start",
            f"{c.job_enqueue_total} enqueued, {c.job_complete_total} done, "
            f"{c.job_failed_total} failed, {c.job_retry_total} retried",
        )
    return Group(states, Text(""), facts)


def queues_table(queues: list[QueueInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    shown = [s for s in STATE_ORDER if any(q.counts.get(s) for q in queues)]
    for column in ("QUEUE", "STATUS", "LIMIT", *shown):
        table.add_column(column, justify="right" if column in shown else "left")
    for q in queues:
        table.add_row(
            q.name,
            Text("paused", style="yellow") if q.paused else Text("active", style="green"),
            "-" if q.concurrency is None else str(q.concurrency),
            *[str(q.counts.get(s, 0)) for s in shown],
        )
    return table


def runners_table(runners: list[RunnerInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("JOB TYPE", "TARGET", "DISTRIBUTION", "VERSION"):
        table.add_column(column)
    for r in runners:
        table.add_row(r.name, r.target, r.distribution or "-", r.version or "-")
    return table
