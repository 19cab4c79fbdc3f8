"""The log line formats: the ids in context reach every line, in JSON and in text."""

from __future__ import annotations

import json
import logging

from core import logs


def record(message: str = "hello %s", *args: object) -> logging.LogRecord:
    return logging.LogRecord("finetune.test", logging.INFO, __file__, 1, message, args, None)


def test_a_json_line_carries_the_request_and_job_ids_in_context():
    r_token, j_token = logs.request_id.set("req-1"), logs.job_id.set("job_abc")
    try:
        rec = record("epoch %d", 3)
        assert logs.ContextFilter().filter(rec)
        line = json.loads(logs.JsonFormatter().format(rec))
    finally:
        logs.request_id.reset(r_token)
        logs.job_id.reset(j_token)
    assert line["message"] == "epoch 3" and line["level"] == "INFO"
    assert line["request_id"] == "req-1" and line["job_id"] == "job_abc"
    assert line["logger"] == "finetune.test" and line["ts"].endswith("+00:00")


def test_a_line_outside_any_request_has_null_ids_and_no_text_suffix():
    rec = record()
    logs.ContextFilter().filter(rec)
    assert json.loads(logs.JsonFormatter().format(rec))["request_id"] is None
    assert logging.Formatter(logs.TEXT_FORMAT).format(rec).endswith("hello %s")


def test_a_traceback_is_one_field_of_one_line():
    try:
        raise ValueError("bad value 7")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    logs.ContextFilter().filter(rec)
    out = logs.JsonFormatter().format(rec)
    assert "\n" not in out and "bad value 7" in json.loads(out)["exc_info"]


def test_an_unsafe_or_oversized_request_id_is_replaced():
    assert logs.accept_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "a b", 'x"}\n{"level":"ERROR"', "x" * 129):
        new = logs.accept_request_id(bad)
        assert new != bad and len(new) == 32
