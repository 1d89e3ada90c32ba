"""Configuration: SPEC §2's variables and flags, and the rules that guard them."""

from __future__ import annotations

import os

import pytest

from semantica import config
from semantica.config import ConfigError
from semantica.daemon import FLAGS, parse_args


def test_tcp_binds_loopback_unless_a_flag_says_otherwise():
    assert config.load(env={}).rpc_host == "127.0.0.1"
    assert config.load(env={"SEMANTICA_RPC_HOST": "127.0.0.1"}).rpc_host == "127.0.0.1"
    flagged = config.load(env={}, overrides={"SEMANTICA_RPC_HOST": "0.0.0.0"})
    assert flagged.rpc_host == "0.0.0.0"


def test_an_address_from_the_environment_is_refused_saying_which_flag_to_use():
    with pytest.raises(ConfigError, match="--rpc-host"):
        config.load(env={"SEMANTICA_RPC_HOST": "0.0.0.0"})


def test_every_spec_variable_is_also_a_daemon_flag():
    spec_variables = {
        "SEMANTICA_HOME",
        "SEMANTICA_DB_PATH",
        "SEMANTICA_SOCKET_PATH",
        "SEMANTICA_RPC_PORT",
        "SEMANTICA_LOG_FORMAT",
        "SEMANTICA_LOG_LEVEL",
        "SEMANTICA_WORKERS",
        "SEMANTICA_RETENTION_DAYS",
        "SEMANTICA_MAX_DB_SIZE_MB",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
    }
    assert spec_variables <= set(FLAGS.values())


def test_otel_flags_reach_the_environment_tracing_reads(monkeypatch, tmp_path):
    for name in ("OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.setenv(name, "")  # restored (removed) after the test
    parse_args(
        [
            "--home",
            str(tmp_path),
            "--otel-service-name",
            "agent-queue",
            "--otel-exporter-otlp-endpoint",
            "http://localhost:4318",
        ]
    )
    assert os.environ["OTEL_SERVICE_NAME"] == "agent-queue"
    assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://localhost:4318"


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SEMANTICA_RPC_PORT", "http", "not an integer"),
        ("SEMANTICA_RPC_PORT", "70000", "out of range"),
        ("SEMANTICA_WORKERS", "0", "out of range"),
        ("SEMANTICA_LOG_FORMAT", "xml", "not one of"),
        ("SEMANTICA_RETENTION_DAYS", "soon", "not a number"),
        ("SEMANTICA_ENV_ALLOWLIST", "OK,not a name", "not a variable name"),
        ("SEMANTICA_ENV_ALLOWLIST", "OK,SEMANTICA_PLUGIN_PATH", "reserved"),
    ],
)
def test_a_bad_setting_names_the_variable_and_what_is_allowed(variable, value, words):
    with pytest.raises(ConfigError, match=variable) as info:
        config.load(env={variable: value})
    assert words in str(info.value)
