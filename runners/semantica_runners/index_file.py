"""`index_file`: size, line count, SHA-256 and language of one file.

Payload:
    path   the file; an absolute path, or relative to `root`
    root   optional directory that a relative `path` is taken from. Without it a
           relative path is taken from the runner's working directory, which is the
           job's own empty directory, not the client's: send absolute paths or a root.

Result: `{"path": <absolute path>, "bytes": int, "lines": int, "sha256": hex,
"language": str}`. `lines` counts newline characters, plus one for a last line
without one ("a\\nb" has 2). `language` comes from the file name, then from a `#!`
line, else "unknown". A missing, unreadable or non-regular file fails the job.
Large files report progress as they are read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from semantica.plugins import JobContext
from semantica_runners._payload import PayloadError, optional_str, reject_unknown

KEYS = {"path", "root"}
CHUNK_BYTES = 1024 * 1024
PROGRESS_MIN_BYTES = 8 * CHUNK_BYTES  # smaller files are done before progress would show
PROGRESS_STEP = 0.05

LANGUAGES_BY_SUFFIX = {
    ".py": "python", ".pyi": "python", ".pyw": "python", ".pyx": "cython",
    ".rs": "rust", ".go": "go",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "typescript",
    ".c": "c", ".h": "c",
    ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".c++": "cpp",
    ".hh": "cpp", ".hpp": "cpp", ".hxx": "cpp", ".h++": "cpp", ".ipp": "cpp",
    ".m": "objective-c", ".mm": "objective-cpp",
    ".cs": "csharp", ".fs": "fsharp", ".vb": "visual-basic",
    ".java": "java", ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala",
    ".groovy": "groovy", ".gradle": "groovy", ".clj": "clojure", ".cljs": "clojure",
    ".swift": "swift", ".dart": "dart", ".zig": "zig", ".nim": "nim", ".d": "d",
    ".rb": "ruby", ".rake": "ruby", ".gemspec": "ruby",
    ".php": "php", ".pl": "perl", ".pm": "perl", ".lua": "lua", ".r": "r", ".jl": "julia",
    ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".hrl": "erlang",
    ".hs": "haskell", ".ml": "ocaml", ".mli": "ocaml", ".elm": "elm",
    ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".ksh": "shell", ".fish": "fish",
    ".ps1": "powershell", ".bat": "batch", ".cmd": "batch",
    ".sql": "sql", ".graphql": "graphql", ".gql": "graphql", ".proto": "protobuf",
    ".html": "html", ".htm": "html", ".css": "css", ".scss": "scss", ".sass": "sass",
    ".less": "less", ".vue": "vue", ".svelte": "svelte",
    ".md": "markdown", ".markdown": "markdown", ".rst": "restructuredtext",
    ".txt": "text", ".tex": "latex",
    ".toml": "toml", ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".yaml": "yaml", ".yml": "yaml", ".xml": "xml", ".ini": "ini", ".cfg": "ini",
    ".csv": "csv", ".tf": "terraform", ".nix": "nix", ".cmake": "cmake",
    ".dockerfile": "dockerfile", ".mk": "make",
}  # fmt: skip

LANGUAGES_BY_NAME = {
    "makefile": "make", "gnumakefile": "make", "dockerfile": "dockerfile",
    "containerfile": "dockerfile", "cmakelists.txt": "cmake", "gemfile": "ruby",
    "rakefile": "ruby", "justfile": "just", "build": "starlark", "workspace": "starlark",
    "build.bazel": "starlark", ".bashrc": "shell", ".profile": "shell", ".zshrc": "shell",
}  # fmt: skip

LANGUAGES_BY_INTERPRETER = {
    "python": "python", "sh": "shell", "bash": "shell", "zsh": "shell", "ksh": "shell",
    "dash": "shell", "fish": "fish", "node": "javascript", "deno": "typescript",
    "ruby": "ruby", "perl": "perl", "php": "php", "lua": "lua", "rscript": "r",
}  # fmt: skip


def index_file(ctx: JobContext) -> dict[str, Any]:
    payload = ctx.payload
    reject_unknown(payload, KEYS, "index_file")
    raw_path = payload.get("path")
    if not isinstance(raw_path, str) or not raw_path:
        raise PayloadError(f"index_file: 'path' must be a non-empty string, got {raw_path!r}")
    root = optional_str(payload, "root", "index_file")
    path = Path(root or "", raw_path).absolute()

    fd = _open_regular(path, raw_path, root)
    with open(fd, "rb", buffering=0, closefd=True) as f:
        size_hint = os.fstat(fd).st_size
        report = size_hint >= PROGRESS_MIN_BYTES
        digest = hashlib.sha256()
        size = lines = 0
        first = b""
        last_byte = b""
        reported = 0.0
        while chunk := f.read(CHUNK_BYTES):
            if not first:
                first = chunk[:256]
            digest.update(chunk)
            size += len(chunk)
            lines += chunk.count(b"\n")
            last_byte = chunk[-1:]
            if report:
                if ctx.cancelled():
                    raise RuntimeError(f"index_file: cancelled after {size} bytes of {path}")
                fraction = min(1.0, size / size_hint)
                if fraction - reported >= PROGRESS_STEP:
                    reported = fraction
                    ctx.progress(fraction, f"{size >> 20} of {size_hint >> 20} MiB")
    if size and last_byte != b"\n":
        lines += 1
    language = guess_language(path.name, first)
    ctx.logger.info("index_file: %s: %d bytes, %d lines, %s", path, size, lines, language)
    return {
        "path": str(path),
        "bytes": size,
        "lines": lines,
        "sha256": digest.hexdigest(),
        "language": language,
    }


def _open_regular(path: Path, raw_path: str, root: str | None) -> int:
    """An fd open for reading on `path`, which must be a regular file."""
    hint = ""
    if not os.path.isabs(raw_path) and root is None:
        hint = (
            " (a relative path without 'root' is taken from the job's own working "
            "directory; send an absolute path or a 'root')"
        )
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise PayloadError(f"index_file: no such file: {path}{hint}") from exc
    except OSError as exc:
        raise PayloadError(f"index_file: cannot open {path}: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise PayloadError(f"index_file: {path} is {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def guess_language(name: str, head: bytes = b"") -> str:
    """The language of a file from its name, then its `#!` line; "unknown" if neither."""
    lower = name.lower()
    if lower in LANGUAGES_BY_NAME:
        return LANGUAGES_BY_NAME[lower]
    suffix = os.path.splitext(lower)[1]
    if suffix in LANGUAGES_BY_SUFFIX:
        return LANGUAGES_BY_SUFFIX[suffix]
    if lower.startswith("dockerfile.") or lower.endswith(".dockerfile"):
        return "dockerfile"
    if head.startswith(b"#!"):
        return _language_from_shebang(head.split(b"\n", 1)[0][2:])
    return "unknown"


def _language_from_shebang(line: bytes) -> str:
    words = line.decode("utf-8", "replace").split()
    if not words:
        return "unknown"
    program = os.path.basename(words[0])
    if program == "env":
        args = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
        if not args:
            return "unknown"
        program = os.path.basename(args[0])
    program = program.lower().rstrip("0123456789.")  # python3.11 -> python
    return LANGUAGES_BY_INTERPRETER.get(program, "unknown")
