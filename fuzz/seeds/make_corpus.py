#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/ (idempotent).

Run from anywhere: python3 fuzz/seeds/make_corpus.py
"""
import hashlib
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fr(obj):
    body = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(body)) + body


READY = fr({"t": "ready", "version": 1, "pid": 4242, "tools": [{"name": "tool"}]})

# ---- worker_output: everything the worker writes, ready first ----
w = {
    "empty": b"",
    "ready_only": READY,
    "ready_then_answers": READY + fr({"t": "result", "id": 1, "ok": {"a": 1}}) + fr({"t": "error", "id": 2, "error": {"type": "ValueError", "message": "bad"}}) + fr({"t": "pong", "id": 3}) + fr({"t": "chunk", "id": 4, "data": 1}) + fr({"t": "chunk", "id": 4, "data": 2}) + fr({"t": "end", "id": 4}),
    "stream_over_credit": READY + b"".join(fr({"t": "chunk", "id": 4, "data": i}) for i in range(5)),
    "stream_result": READY + fr({"t": "result", "id": 4, "ok": [1, 2]}),
    "stream_error": READY + fr({"t": "error", "id": 4, "error": {"type": "K", "message": "m", "traceback": "tb"}}),
    "pong_for_call": READY + fr({"t": "pong", "id": 1}),
    "result_for_ping": READY + fr({"t": "result", "id": 3, "ok": None}),
    "chunk_for_call": READY + fr({"t": "chunk", "id": 1, "data": 0}),
    "unknown_id": READY + fr({"t": "result", "id": 99, "ok": 1}) + fr({"t": "result", "id": 18446744073709551615, "ok": 1}),
    "unknown_type": READY + fr({"t": "weird", "id": 1}),
    "no_id": READY + fr({"t": "result", "ok": 1}),
    "host_call": READY + fr({"t": "host_call", "id": 7, "name": "session.get", "args": {"k": 1}, "call": 1}),
    "host_call_no_id": READY + fr({"t": "host_call", "name": "x"}),
    "host_call_flood": READY + b"".join(fr({"t": "host_call", "id": i, "name": "x"}) for i in range(70)),
    "refuse": fr({"t": "refuse", "reason": "no"}),
    "ready_wrong_version": fr({"t": "ready", "version": 9, "pid": 1}),
    "ready_no_pid": fr({"t": "ready", "version": 1}),
    "not_ready": fr({"t": "result", "id": 1, "ok": 1}),
    "malformed_first": fr(b"{not json"),
    "malformed_later": READY + fr(b"[1,2"),
    "huge_header": struct.pack(">I", 0xFFFFFFFF) + b"{}",
    "header_at_max": READY + struct.pack(">I", 64 * 1024 * 1024) + b"{",
    "header_just_over_max": READY + struct.pack(">I", 64 * 1024 * 1024 + 1),
    "truncated_header": READY + b"\x00\x00",
    "truncated_body": READY + struct.pack(">I", 100) + b'{"t":"res',
    "zero_length": READY + struct.pack(">I", 0),
    "deep_json": READY + fr(("[" * 10000 + "]" * 10000).encode()),
    "deep_ok": READY + fr(b'{"t":"result","id":1,"ok":' + b"[" * 200 + b"]" * 200 + b"}"),
    "escaped_tag": READY + fr(b'{"t":"\\u0072esult","id":1,"ok":1}'),
    "dup_keys": READY + fr(b'{"t":"result","t":"error","id":1,"ok":1}'),
    "bad_utf8": READY + fr(b'{"t":"result","id":1,"ok":"\xff\xfe"}'),
    "many_small": READY + b"".join(fr({"t": "pong", "id": i}) for i in range(200)),
    "thread_ready": fr({"t": "ready", "version": 1, "pid": 1, "max_in_flight": 4, "bridge": "x", "cancel_signal": 10}) + fr({"t": "result", "id": 2, "ok": 2}),
    "late_after_end": READY + fr({"t": "end", "id": 4}) + fr({"t": "chunk", "id": 4, "data": 1}),
}
for k, v in w.items():
    write("worker_output", k, v)

# ---- serve_lines: bytes a client writes to `snakepit serve` ----
s = {
    "one_call": '{"id":1,"command":"echo","args":{"x":1}}\n',
    "string_id": '{"id":"a b","command":"echo","args":[1, 2 ,3]}\n',
    "object_id": '{"id":{"k":[1,{"z":null}]},"command":"echo"}\n',
    "stream": '{"id":2,"command":"count","args":{"n":3},"stream":true,"timeout_ms":100}\n',
    "no_newline": '{"id":3,"command":"echo"}',
    "blank_lines": "\n\n  \t\n" + '{"id":4,"command":"x"}\n',
    "crlf": '{"id":5,"command":"x"}\r\n',
    "missing_command": '{"id":6,"args":1}\n',
    "malformed": '{"id":7,"command":\n',
    "malformed_after_id": '{"id":[1,2,{"a":"]"}],"command":42}\n',
    "not_object": '[1,2,3]\n"str"\nnull\n',
    "escaped_id_key": '{"\\u0069d":8,"command":1}\n',
    "id_in_string": '{"x":"\\"id\\":9","id":10,\n',
    "deep_args": '{"id":11,"command":"x","args":' + "[" * 5000 + "]" * 5000 + "}\n",
    "deep_args_unclosed": '{"id":12,"command":"x","args":' + "[" * 5000 + "\n",
    "deep_id": '{"id":' + "[" * 300 + "]" * 300 + ',"command":1}\n',
    "deep_id_ok": '{"id":' + "[" * 100 + "]" * 100 + ',"command":"x"}\n',
    "too_long": '{"id":13,"command":"x","args":"' + "a" * 2000 + '"}\n',
    "too_long_no_id": '{"command":"x","args":"' + "a" * 2000 + '"}\n',
    "too_long_then_ok": '{"id":14,"args":[' + "1," * 1000 + '1]}\n{"id":15,"command":"x"}\n',
    "control_chars": '{"id":"\x01\x02","command":"x","args":"a\tb"}\n',
    "raw_newline_in_string": '{"id":"a\rb","command":"x","args":" x "}\n',
    "bad_utf8": b'{"id":16,"command":"\xff","args":"\xc3"}\n',
    "big_numbers": '{"id":1e999,"command":"x","args":-0.0e-400,"timeout_ms":18446744073709551616}\n',
    "timeout_negative": '{"id":17,"command":"x","timeout_ms":-1}\n',
    "duplicate_fields": '{"id":1,"id":2,"command":"x","command":"y"}\n',
    "whitespace_id": '{ "id" : [ 1 , 2 ] , "command" : "x" , "args" : { "a" : [ ] } }\n',
    "trailing_garbage": '{"id":18,"command":"x"} trailing\n',
    "backslash_end": '{"id":"\\\n',
    "only_brace": "{\n}\n{\n",
    "many_lines": "".join('{"id":%d,"command":"c","args":%d}\n' % (i, i) for i in range(100)),
    "nul_bytes": b'{"id":19,\x00"command":"x"}\n\x00\n',
}
for k, v in s.items():
    write("serve_lines", k, v)


# ---- zygote_control: 2-byte big-endian length + packet, repeated ----
def pk(obj):
    body = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">H", min(len(body), 0xFFFF)) + body


z = {
    "empty": b"",
    "ready": pk({"op": "ready", "pid": 100}),
    "forked": pk({"op": "forked", "worker": "0.0", "pid": 101}),
    "forked_exited": pk({"op": "forked", "worker": "0.1", "pid": 102}) + pk({"op": "exited", "pid": 102, "code": 0}),
    "exited_signal": pk({"op": "forked", "worker": "0.2", "pid": 103}) + pk({"op": "exited", "pid": 103, "signal": 9, "code": 1}),
    "exited_unknown": pk({"op": "exited", "pid": 104}),
    "fork_failed": pk({"op": "fork_failed", "worker": "0.3", "error": "EAGAIN"}),
    "fork_failed_no_reason": pk({"op": "fork_failed", "worker": "0.0"}),
    "unknown_worker": pk({"op": "forked", "worker": "9.9", "pid": 1}),
    "forked_no_pid": pk({"op": "forked", "worker": "0.0"}),
    "unknown_op": pk({"op": "dance", "pid": 1}),
    "no_op": pk({"pid": 1}),
    "wrong_types": pk(b'{"op":"forked","worker":1,"pid":"x"}'),
    "negative_pid": pk(b'{"op":"exited","pid":-1}'),
    "pid_overflow": pk(b'{"op":"exited","pid":4294967296}'),
    "malformed": pk(b'{"op":'),
    "empty_packet": pk(b""),
    "length_past_end": struct.pack(">H", 0xFFFF) + b'{"op":"ready"}',
    "odd_byte": b"\x00",
    "deep": pk(b'{"op":"x","error":' + b"[" * 3000 + b"]" * 3000 + b"}"),
    "many_forked": b"".join(pk({"op": "forked", "pid": i}) for i in range(300)),
    "duplicate_pid": pk({"op": "forked", "worker": "0.0", "pid": 5}) + pk({"op": "forked", "worker": "0.1", "pid": 5}) + pk({"op": "exited", "pid": 5, "code": 3}),
    "escaped_op": pk(b'{"op":"\\u0066orked","worker":"0.0","pid":7}'),
    "extra_fields": pk({"op": "forked", "worker": "0.0", "pid": 8, "extra": {"a": [1, 2]}}),
    "code_overflow": pk(b'{"op":"exited","pid":9,"code":2147483648}'),
}
for k, v in z.items():
    write("zygote_control", k, v)
