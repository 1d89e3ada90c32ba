"""The README's five-minute tour, run as written: its shell block is extracted from
README.md and executed line by line against a fresh SEMANTICA_HOME and a real daemon,
so the README cannot drift from the product."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from harness import remove_home, start_daemon

import semantica

REPO = Path(__file__).resolve().parent.parent
TOUR_MARK = "<!-- tour:"


def tour_commands() -> str:
    readme = (REPO / "README.md").read_text()
    after = readme[readme.index(TOUR_MARK) :]
    block = re.search(r"```sh\n(.*?)```", after, re.S)
    assert block, "README.md: the tour mark must be followed by a ```sh block"
    return block.group(1)


def test_the_tour_block_is_found_and_is_the_one_the_readme_shows():
    commands = tour_commands()
    assert "semantica-cli enqueue index_file" in commands
    assert "semantica-cli cancel --tag demo" in commands


def test_the_readme_tour_runs_as_written():
    daemon = start_daemon(SEMANTICA_WORKERS="2")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEMANTICA_")}
        env.update(SEMANTICA_HOME=str(daemon.home), COLUMNS="160")
        # A person's shell: `source .venv/bin/activate` must work from the checkout.
        venv = Path(sys.prefix)
        script = tour_commands()
        if venv != REPO / ".venv":  # the suite runs from another environment
            script = script.replace("source .venv/bin/activate", f"source {venv}/bin/activate")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
        out = done.stdout
        assert "DONE" in out and "sha256" in out and "index_file" in out
        assert "paused" in out  # `show` said why the queued job waits
        with daemon.client() as c:
            tour = c.list(queue="tour").jobs
            states = sorted(j.state.value for j in tour)
            assert states == ["DONE", "SUPERSEDED", "SUPERSEDED"], states
            demo = c.list(tag="demo").jobs
            assert len(demo) == 2 and all(j.state.value == "CANCELLED" for j in demo)
            first = c.list(subject="README.md", queue="default").jobs[0]
            assert first.state is semantica.State.DONE
            assert first.result_summary["path"] == str(REPO / "README.md")
    finally:
        daemon.stop()
        remove_home(daemon.home)
