"""`semantica`: the daemon's command line and composition root.

Start-up order: configuration, the home directory, the exclusive lock, the store,
the token, the listeners; then one nursery holds the group committer, the server,
the signal watcher and the systemd watchdog until a drain ends it.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import trio

from semantica import __version__, log, tracing
from semantica import config as config_mod
from semantica.api import Api
from semantica.config import Config, ConfigError
from semantica.launcher import Launcher, SandboxLimits
from semantica.probe import FileProbe, SystemProbe
from semantica.server import Limits, Server, SocketInUse, open_unix_listener, raise_fd_limit
from semantica.store import Store, StoreError

MAX_ZYGOTE_SPARES = 2

FLAGS = {
    "--home": "SEMANTICA_HOME",
    "--db-path": "SEMANTICA_DB_PATH",
    "--socket-path": "SEMANTICA_SOCKET_PATH",
    "--rpc-port": "SEMANTICA_RPC_PORT",
    "--rpc-host": "SEMANTICA_RPC_HOST",
    "--log-format": "SEMANTICA_LOG_FORMAT",
    "--log-level": "SEMANTICA_LOG_LEVEL",
    "--workers": "SEMANTICA_WORKERS",
    "--retention-days": "SEMANTICA_RETENTION_DAYS",
    "--max-db-size-mb": "SEMANTICA_MAX_DB_SIZE_MB",
    "--synchronous": "SEMANTICA_SYNCHRONOUS",
    "--env-allowlist": "SEMANTICA_ENV_ALLOWLIST",
    "--max-message-bytes": "SEMANTICA_MAX_MESSAGE_BYTES",
    "--max-connections": "SEMANTICA_MAX_CONNECTIONS",
    "--idle-timeout-s": "SEMANTICA_IDLE_TIMEOUT_S",
    "--request-timeout-s": "SEMANTICA_REQUEST_TIMEOUT_S",
    "--rate-limit": "SEMANTICA_RATE_LIMIT",
    "--rate-burst": "SEMANTICA_RATE_BURST",
    "--cpu-idle-percent": "SEMANTICA_CPU_IDLE_PERCENT",
    "--maintenance-hours": "SEMANTICA_MAINTENANCE_HOURS",
    "--warm-max-jobs": "SEMANTICA_WARM_MAX_JOBS",
    "--zygote": "SEMANTICA_ZYGOTE",
    "--runner-memory-mb": "SEMANTICA_RUNNER_MEMORY_MB",
    "--runner-max-files": "SEMANTICA_RUNNER_MAX_FILES",
    "--runner-max-processes": "SEMANTICA_RUNNER_MAX_PROCESSES",
    "--warm-max-rss-mb": "SEMANTICA_WARM_MAX_RSS_MB",
    "--conditions-file": "SEMANTICA_CONDITIONS_FILE",
    # SPEC §2's optional tracing settings; read by the OpenTelemetry SDK itself.
    "--otel-exporter-otlp-endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
    "--otel-service-name": "OTEL_SERVICE_NAME",
}
OTEL_FLAGS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME")


JOB_DRAIN_GRACE_S = 10.0  # running jobs get this long to end before they are stopped


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(
        prog="semantica",
        description="The Semantica daemon: a local, durable task queue for AI coding agents.",
    )
    parser.add_argument(
        "--init", action="store_true", help="create SEMANTICA_HOME and the database, then exit"
    )
    parser.add_argument("--version", action="version", version=f"semantica {__version__}")
    for flag, variable in FLAGS.items():
        help_text = f"overrides ${variable}"
        if variable == "SEMANTICA_RPC_HOST":  # config.load refuses it from the environment
            help_text = (
                "the address TCP listens on (default 127.0.0.1; a flag only, never read "
                "from the environment)"
            )
        parser.add_argument(flag, dest=variable, metavar="VALUE", help=help_text)
    args = parser.parse_args(argv)
    for variable in OTEL_FLAGS:  # tracing reads them from the environment
        if (value := getattr(args, variable)) is not None:
            os.environ[variable] = value
    try:
        cfg = config_mod.load(overrides={v: getattr(args, v) for v in FLAGS.values()})
    except ConfigError as exc:
        parser.exit(2, f"semantica: configuration error: {exc}\n")
    return args, cfg


# --------------------------------------------------------------------------- set-up


def _make_private_dir(path: Path, made: list[str]) -> None:
    if not path.exists():
        old_umask = os.umask(0o077)  # missing parents too: 0700, never 0755
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)  # a racing daemon made it
        finally:
            os.umask(old_umask)
        made.append(f"created {path} (mode 0700)")
    elif path.stat().st_mode & 0o077:
        path.chmod(0o700)
        made.append(f"tightened {path} to mode 0700 (it was open to others)")


def init_home(cfg: Config, lock: DaemonLock, *, keep_lock: bool = False) -> list[str]:
    """Create the data directory, logs directory and database; say what was made.

    The database is opened (and migrated) only once `lock` is taken, so a second
    daemon, even a newer one, never touches a database another daemon owns. The lock
    is released again unless `keep_lock` (the daemon keeps it while it runs).
    """
    made: list[str] = []
    _make_private_dir(cfg.home, made)
    _make_private_dir(cfg.logs_dir, made)
    if not cfg.db_path.parent.exists():
        _make_private_dir(cfg.db_path.parent, made)
    lock.acquire()  # the lock file lives beside the database
    old_umask = os.umask(0o077)  # a new database file is 0600
    try:
        existed = cfg.db_path.exists()
        store = Store.open(cfg.db_path, synchronous=cfg.synchronous)
        before, after = store.migrated
        store.close()
    except BaseException:
        lock.release()
        raise
    finally:
        os.umask(old_umask)
    if not keep_lock:
        lock.release()
    if not existed:
        made.append(f"created database {cfg.db_path} at schema version {after}")
    elif before != after:
        made.append(f"migrated database {cfg.db_path} from schema version {before} to {after}")
    return made


class DaemonLock:
    """An exclusive lock file beside the database: one daemon per database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StartupError(
                f"another semantica daemon (PID {holder}) already owns this database "
                f"({self.path.with_suffix('')}): stop it with `semantica-cli shutdown` or "
                f"`kill {holder}`, or point this one at another SEMANTICA_HOME"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise StartupError(
                f"cannot write the lock file {self.path} ({exc.strerror}): free space on "
                "its disk, or make it writable"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def ensure_token(path: Path) -> str:
    """The TCP bearer token: created 0600 at first start, then reused."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, when it asked to be told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=str(exc))


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC, if systemd's watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2 / 1_000_000


# --------------------------------------------------------------------------- running


async def _watch_signals(shutdown: trio.Event, force: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("shutdown_forced", signal=signal.Signals(signum).name)
                force.cancel()
                return
            log.event("shutdown_requested", signal=signal.Signals(signum).name)
            shutdown.set()


async def _send_watchdog(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(interval)


async def serve(cfg: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT or admin.shutdown.v1, then drain."""
    lock = DaemonLock(cfg.lock_path)
    listeners = []
    store = None
    job_tracing = None
    try:
        init_home(cfg, lock, keep_lock=True)
        raise_fd_limit()
        store = Store.open(
            cfg.db_path,
            synchronous=cfg.synchronous,
            env_allowlist=cfg.env_allowlist,
            group_sync=True,
        )
        token = ensure_token(cfg.token_path)
        shutdown = trio.Event()
        launcher = Launcher(
            home=cfg.home,
            env_allowlist=cfg.env_allowlist,
            warm_max_jobs=cfg.warm_max_jobs,
            warm_max_rss_bytes=cfg.warm_max_rss_mb * 1024**2,
            use_zygote=cfg.zygote,
            # A spare per worker slot (up to two), so that the jobs claimed in one look
            # find one each; each spare is a process slot and a few hundred KiB.
            spares=min(cfg.workers, MAX_ZYGOTE_SPARES),
            limits=SandboxLimits(
                address_space_bytes=cfg.runner_memory_mb * 1024**2,
                open_files=cfg.runner_max_files,
                processes=cfg.runner_max_processes,
            ),
        )
        api = Api(
            store,
            home=str(cfg.home),
            launcher=launcher,
            workers=cfg.workers,
            conditions=(
                FileProbe(cfg.conditions_file)
                if cfg.conditions_file is not None
                else SystemProbe(idle_below_percent=cfg.cpu_idle_percent)
            ).conditions,
            request_shutdown=shutdown.set,
            retention_days=cfg.retention_days,
            max_db_size_mb=cfg.max_db_size_mb,
            tracing=(job_tracing := tracing.from_environment()),
        )
        for job in api.dispatcher.recover():  # runners of a crashed daemon: before serving
            api.job_changed(job)
        api.dispatcher.tell_dependents()  # what those that failed for good doomed
        limits = Limits(
            max_message_bytes=cfg.max_message_bytes,
            max_connections=cfg.max_connections,
            idle_timeout_s=cfg.idle_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
            rate_per_s=cfg.rate_per_s,
            rate_burst=cfg.rate_burst,
        )
        server = Server(api, limits=limits, token=token)
        try:
            listeners.append((await open_unix_listener(cfg.socket_path), "unix"))
        except SocketInUse as exc:
            raise StartupError(str(exc)) from None
        if cfg.rpc_port:
            try:
                tcp = await trio.open_tcp_listeners(cfg.rpc_port, host=cfg.rpc_host)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {cfg.rpc_host}:{cfg.rpc_port}: {exc.strerror}; "
                    "pick another SEMANTICA_RPC_PORT, or 0 to turn TCP off"
                ) from None
            listeners += [(listener, "tcp") for listener in tcp]
        with trio.CancelScope() as force:
            async with trio.open_nursery() as daemon:
                await daemon.start(api.checkpointer.run)
                await daemon.start(api.dispatcher.run)
                await daemon.start(api.maintenance.periodic, cfg.maintenance_hours * 3600)
                daemon.start_soon(_watch_signals, shutdown, force)
                async with trio.open_nursery() as serving:
                    await serving.start(server.serve, listeners)
                    # What start-up made lives as long as the daemon: out of the cycle
                    # collector's sight, its full passes no longer walk all of it
                    # (they took 8 % of an enqueue_batch's time, and 2.5 % now).
                    gc.collect()
                    gc.freeze()
                    sd_notify("READY=1")
                    log.event(
                        "daemon_started",
                        pid=os.getpid(),
                        version=__version__,
                        socket=str(cfg.socket_path),
                        tcp=f"{cfg.rpc_host}:{cfg.rpc_port}" if cfg.rpc_port else "off",
                        db=str(cfg.db_path),
                        workers=cfg.workers,
                    )
                    if (interval := watchdog_interval_s()) is not None:
                        daemon.start_soon(_send_watchdog, interval)
                    await shutdown.wait()
                    sd_notify("STOPPING=1")
                    log.event("daemon_draining", connections=len(server.conns))
                    api.begin_drain()
                    server.drain()
                    await api.dispatcher.drain(JOB_DRAIN_GRACE_S)
                    await launcher.warm.close()
                    if launcher.zygote is not None:
                        await launcher.zygote.close()
                daemon.cancel_scope.cancel()
    finally:
        if any(t == "unix" for _, t in listeners):
            cfg.socket_path.unlink(missing_ok=True)
        if store is not None:
            store.close()
        lock.release()
        if job_tracing is not None:
            job_tracing.close()
    log.event("daemon_stopped", pid=os.getpid())


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    if args.init:
        try:
            made = init_home(cfg, DaemonLock(cfg.lock_path))
        except (StoreError, StartupError, OSError) as exc:
            print(f"semantica: cannot set up {cfg.home}: {exc}", file=sys.stderr)
            return 1
        for line in made or [f"{cfg.home} and {cfg.db_path} are ready; nothing to do"]:
            print(f"semantica: {line}")
        return 0
    log.setup(cfg.log_format, cfg.log_level)
    try:
        trio.run(serve, cfg, restrict_keyboard_interrupt_to_checkpoints=True)
    except (StartupError, StoreError) as exc:
        _cannot_start(cfg, str(exc))
        return 1
    except OSError as exc:
        _cannot_start(cfg, f"cannot start: {exc}")
        return 1
    return 0


def _cannot_start(cfg: Config, message: str) -> None:
    """Why the daemon stops before serving: one line, a JSON record in JSON mode."""
    if cfg.log_format == "json":
        log.error("daemon_cannot_start", error=message)
    else:
        print(f"semantica: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
