"""The JSON-RPC codec with no I/O: bytes in, calls and errors out."""

from __future__ import annotations

from semantica import protocol as p
from semantica.domain import EnqueueRequest


def test_a_call_decodes_to_typed_params():
    call = p.decode_message(
        b'{"jsonrpc":"2.0","method":"dev.enqueue.v1","params":{"job_type":"noop"},"id":7}'
    )
    assert isinstance(call, p.Call) and call.error is None
    assert call.id == 7 and not call.is_notification
    assert call.params == EnqueueRequest(job_type="noop")


def test_a_notification_has_no_id():
    call = p.decode_message(b'{"jsonrpc":"2.0","method":"admin.stats.v1"}')
    assert call.is_notification and call.id is None and call.error is None


def test_id_null_is_a_call_not_a_notification():
    call = p.decode_message(b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":null}')
    assert not call.is_notification and call.id is None


def test_invalid_request_echoes_a_readable_id_even_with_a_lone_surrogate():
    call = p.decode_message(b'{"jsonrpc":"2.0","method":"x","id":5,"bad":"\\ud800"}')
    assert call.error.code == p.INVALID_REQUEST and call.id == 5


def test_bad_params_name_the_field():
    call = p.decode_message(
        b'{"jsonrpc":"2.0","method":"dev.enqueue_batch.v1","params":{"jobs":[{"job_type":"a"},'
        b'{"job_type":"b","priority":"x"}]},"id":1}'
    )
    assert call.error.code == p.INVALID_PARAMS
    assert call.error.data == {"field": "jobs[1].priority"}


def test_too_deep_and_not_utf8_are_parse_errors():
    deep = p.decode_message(b"[" * 5000 + b"]" * 5000)
    assert deep.error.code == p.PARSE_ERROR and "nested" in deep.error.message
    bad = p.decode_message(b'{"jsonrpc":"2.0","method":"x\xff","id":1}')
    assert bad.error.code == p.PARSE_ERROR


def test_responses_always_carry_jsonrpc_and_id():
    assert p.encode(p.error_response(None, p.RpcError(4001, "m"))) == (
        b'{"jsonrpc":"2.0","error":{"code":4001,"message":"m"},"id":null}'
    )
    assert p.encode(p.result_response("a", [])) == b'{"jsonrpc":"2.0","result":[],"id":"a"}'
