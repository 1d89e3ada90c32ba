"""Every example of the JSON-RPC 2.0 specification (section 7), over both framings.

The specification's examples call `subtract`, `sum`, `get_data`...; here each is
mapped to a Semantica method with the same shape (a call with named params, a
notification, a method that does not exist, ...). Positional params are refused
with -32602: every Semantica method takes named params (SPEC §6).
"""

from __future__ import annotations

import json
import socket

import pytest
from harness import API_TEST_QUEUES, http_post, remove_home, start_daemon

SENTINEL = b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":"sentinel"}'


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    yield d
    d.stop()
    remove_home(d.home)


def ndjson(daemon, message: bytes):
    """Send one message then a sentinel call; the replies before the sentinel's are ours."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket_path))
        s.sendall(message + b"\n" + SENTINEL + b"\n")
        data = b""
        while b'"id":"sentinel"' not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed early; got {data!r}"
            data += chunk
    lines = [json.loads(line) for line in data.split(b"\n") if line]
    assert lines[-1]["id"] == "sentinel" and "result" in lines[-1]
    replies = lines[:-1]
    assert len(replies) <= 1, replies
    return replies[0] if replies else None


def http(daemon, message: bytes):
    status, body = http_post(daemon, message, headers={"Content-Type": "application/json"})
    if status == 204:
        assert body == b""
        return None
    assert status == 200, (status, body)
    return json.loads(body)


@pytest.fixture(params=["ndjson", "http"])
def send(request, daemon):
    framing = ndjson if request.param == "ndjson" else http
    return lambda message: framing(daemon, message)


def error(code: int, id_=None) -> dict:
    return {"jsonrpc": "2.0", "error": {"code": code}, "id": id_}


def shape(reply):
    """A reply with messages and data dropped, to compare with the spec's examples."""
    if isinstance(reply, list):
        return [shape(r) for r in reply]
    if "error" in reply:
        return {
            "jsonrpc": reply["jsonrpc"],
            "error": {"code": reply["error"]["code"]},
            "id": reply["id"],
        }
    return reply


def enqueue_call(id_) -> dict:
    return {"jsonrpc": "2.0", "method": "dev.enqueue.v1", "params": {"job_type": "noop"}, "id": id_}


def test_call_with_positional_params_is_refused(send):
    reply = send(b'{"jsonrpc": "2.0", "method": "jobs.get.v1", "params": ["abc"], "id": 1}')
    assert shape(reply) == error(-32602, 1)
    assert "named fields" in reply["error"]["message"]


def test_call_with_named_params(send):
    job = send(json.dumps(enqueue_call(3)).encode())
    assert job["id"] == 3 and job["result"]["state"] == "QUEUED"
    got = send(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "jobs.get.v1",
                "params": {"id": job["result"]["id"]},
                "id": 4,
            }
        ).encode()
    )
    assert "paused" in got["result"].pop("waiting_reason")  # only jobs.get.v1 says why
    job["result"].pop("waiting_reason")
    assert got == {"jsonrpc": "2.0", "result": job["result"], "id": 4}


def test_notification_is_carried_out_without_a_reply(send, daemon):
    with daemon.client() as c:
        before = c.stats().counters.job_enqueue_total
        msg = b'{"jsonrpc": "2.0", "method": "dev.enqueue.v1", "params": {"job_type": "noop"}}'
        assert send(msg) is None
        assert c.stats().counters.job_enqueue_total == before + 1


def test_notification_of_unknown_method_gets_no_reply(send):
    assert send(b'{"jsonrpc": "2.0", "method": "foobar"}') is None


def test_call_of_non_existent_method(send):
    assert shape(send(b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}')) == error(-32601, "1")


def test_call_with_invalid_json(send):
    reply = send(b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert shape(reply) == error(-32700)


def test_call_with_invalid_request_object(send):
    assert shape(send(b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}')) == error(-32600)


def test_batch_with_invalid_json(send):
    reply = send(
        b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        b'{"jsonrpc": "2.0", "method"]'
    )
    assert shape(reply) == error(-32700)


def test_call_with_an_empty_array(send):
    assert shape(send(b"[]")) == error(-32600)


def test_invalid_batch_of_one(send):
    assert shape(send(b"[1]")) == [error(-32600)]


def test_invalid_batch(send):
    assert shape(send(b"[1,2,3]")) == [error(-32600)] * 3


def test_batch_of_calls(send):
    batch = [
        enqueue_call("1"),
        {"jsonrpc": "2.0", "method": "dev.enqueue.v1", "params": {"job_type": "noop"}},
        {"jsonrpc": "2.0", "method": "admin.stats.v1", "params": {}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "queues.list.v1", "id": "9"},
    ]
    reply = send(json.dumps(batch).encode())
    assert isinstance(reply, list) and len(reply) == 5
    by_id = {r["id"]: r for r in reply}
    assert by_id["1"]["result"]["state"] == "QUEUED"
    assert "jobs_by_state" in by_id["2"]["result"]
    assert shape(by_id[None]) == error(-32600)
    assert shape(by_id["5"]) == error(-32601, "5")
    assert "queues" in by_id["9"]["result"]


def test_batch_of_notifications_gets_no_reply(send):
    batch = [
        {"jsonrpc": "2.0", "method": "admin.stats.v1", "params": {}},
        {"jsonrpc": "2.0", "method": "queues.list.v1"},
    ]
    assert send(json.dumps(batch).encode()) is None
