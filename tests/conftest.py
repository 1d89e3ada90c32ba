from __future__ import annotations

import random

import pytest

from semantica.store import Conditions, Store

ALL_MET = Conditions(cpu_idle=True, on_ac_power=True)


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "meta.db")
    yield s
    s.close()


@pytest.fixture
def rng():
    return random.Random(1234)


def snapshot(store: Store) -> dict[str, list[tuple]]:
    """Every row of every table, to prove an operation changed nothing."""
    db = store.connection
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
    return {t: sorted(map(tuple, db.execute(f"SELECT * FROM {t}"))) for t in tables}
