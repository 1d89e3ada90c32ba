"""The README's five-minute tour, run as written: its shell block is extracted from
README.md and executed line by line against a fresh SEMANTICA_HOME and a real daemon,
so the README cannot drift from the product. Its runner-plugin example and its CLI
table are checked the same way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import typer
from harness import remove_home, start_daemon

import semantica
from semantica.cli import app

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


def readme_section(start: str, end: str) -> str:
    readme = (REPO / "README.md").read_text()
    return readme[readme.index(start) : readme.index(end, readme.index(start))]


def test_the_plugin_example_works_from_a_jobs_own_working_directory(tmp_path, monkeypatch):
    section = readme_section("**Writing a runner plugin**", "## Security")
    project = tomllib.loads(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    assert project["project"]["entry-points"]["semantica.runners"] == {
        "word_count": "my_plugin:word_count"
    }
    assert project["tool"]["setuptools"]["py-modules"] == ["my_plugin"]
    plugin: dict = {}
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "my_plugin.py", "exec"), plugin)
    # The README's enqueue line as a person's shell at the checkout expands it.
    command = re.search(r"`(semantica-cli enqueue word_count [^`]*)`", section).group(1)
    echo_args = (
        'semantica-cli() { "$PY" -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"; }'
    )
    done = subprocess.run(
        ["bash", "-euc", f"{echo_args}\n{command}"],
        cwd=REPO,
        env={**os.environ, "PY": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )
    argv = json.loads(done.stdout)
    payload = json.loads(argv[argv.index("-p") + 1])
    monkeypatch.chdir(tmp_path)  # a job runs in $SEMANTICA_HOME/work/<id>, not the checkout
    ctx = semantica.JobContext(job_id="t", payload=payload, artifacts_dir=tmp_path)
    words = len((REPO / "README.md").read_text().split())
    assert plugin["word_count"](ctx) == {"words": words}


def test_every_flag_the_cli_table_shows_exists():
    table = readme_section("## The CLI", "Exit codes:")
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    checked = 0
    for row in re.findall(r"^\| (.*?) \| .* \|$", table, re.M):
        for usage in re.findall(r"`([^`]+)`", row.replace("\\|", "|")):
            words = usage.split()
            if words[0] not in commands:
                continue  # `command` heading, or a word of the text
            targets = [commands[words[0]]]
            if words[0] == "service":
                targets = [targets[0].commands[name] for name in words[1].split("|")]
            for target in targets:
                options = {o for param in target.params for o in param.opts}
                for flag in re.findall(r"(?<![\w-])--?[a-z][a-z-]*", usage):
                    assert flag in options, f"README: `{usage}` shows {flag}: {target.name}"
                    checked += 1
    assert checked >= 20, checked
