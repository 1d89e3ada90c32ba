"""`semantica`: the daemon's command line and composition root."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from semantica import config as config_mod
from semantica.config import Config, ConfigError
from semantica.store import SchemaTooNew, Store

FLAGS = {
    "--home": "SEMANTICA_HOME",
    "--db-path": "SEMANTICA_DB_PATH",
    "--socket-path": "SEMANTICA_SOCKET_PATH",
    "--rpc-port": "SEMANTICA_RPC_PORT",
    "--log-format": "SEMANTICA_LOG_FORMAT",
    "--log-level": "SEMANTICA_LOG_LEVEL",
    "--workers": "SEMANTICA_WORKERS",
    "--retention-days": "SEMANTICA_RETENTION_DAYS",
    "--max-db-size-mb": "SEMANTICA_MAX_DB_SIZE_MB",
    "--synchronous": "SEMANTICA_SYNCHRONOUS",
    "--env-allowlist": "SEMANTICA_ENV_ALLOWLIST",
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(
        prog="semantica",
        description="The Semantica daemon: a local, durable task queue for AI coding agents.",
    )
    parser.add_argument(
        "--init", action="store_true", help="create SEMANTICA_HOME and the database, then exit"
    )
    for flag, variable in FLAGS.items():
        parser.add_argument(flag, dest=variable, metavar="VALUE", help=f"overrides ${variable}")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(overrides={v: getattr(args, v) for v in FLAGS.values()})
    except ConfigError as exc:
        parser.exit(2, f"semantica: configuration error: {exc}\n")
    return args, cfg


def _make_private_dir(path: Path, made: list[str]) -> None:
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
        made.append(f"created {path} (mode 0700)")
    elif path.stat().st_mode & 0o077:
        path.chmod(0o700)
        made.append(f"tightened {path} to mode 0700 (it was readable by others)")


def init_home(cfg: Config) -> list[str]:
    """Create the data directory, logs directory and database; say what was made."""
    made: list[str] = []
    old_umask = os.umask(0o077)
    try:
        _make_private_dir(cfg.home, made)
        _make_private_dir(cfg.logs_dir, made)
        _make_private_dir(cfg.db_path.parent, made)
        existed = cfg.db_path.exists()
        store = Store.open(cfg.db_path, synchronous=cfg.synchronous)
        before, after = store.migrated
        store.close()
    finally:
        os.umask(old_umask)
    if not existed:
        made.append(f"created database {cfg.db_path} at schema version {after}")
    else:
        made.append(f"database {cfg.db_path} is at schema version {after} (was {before})")
    return made


def main(argv: list[str] | None = None) -> int:
    _args, cfg = parse_args(argv)
    try:
        made = init_home(cfg)
    except SchemaTooNew as exc:
        print(f"semantica: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"semantica: cannot set up {cfg.home}: {exc}", file=sys.stderr)
        return 1
    for line in made:
        print(f"semantica: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
