"""The OpenAI-compatible server (lmsleep.server) driven by the official `openai` client on 127.0.0.1: replies equal
the library's generate, a long conversation feeds only each new turn, a SIGKILLed server continues where it stopped,
bad requests get 4xx OpenAI error objects, concurrent clients all finish."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

from lmsleep.server import make_server  # noqa: E402
from lmsleep.sessions import Sampling  # noqa: E402
from tests.test_sessions import chat_model, reference_reply, tiny_bpe, user  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


def start(model_dir, sessions, **options):
    server = make_server(model_dir, host="127.0.0.1", port=0, backend="torch", sessions_dir=sessions, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.close()
    thread.join(timeout=30)


@pytest.fixture
def served(chat_model, tmp_path):
    server, thread = start(chat_model, tmp_path / "sessions")
    yield server
    stop(server, thread)


def client(server, **kw):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60, **kw)


def raw(server, method, path, body=b"", headers=None):
    """(status, decoded JSON) of one plain HTTP request."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_replies_equal_generate_streamed_or_not(served):
    c, engine = client(served), served.engine
    messages = [user("hello there")]
    sampling = Sampling(max_tokens=10, temperature=0.8, seed=7)
    expected = reference_reply(engine, engine.conversation.template.render(messages, add_generation_prompt=True),
                               sampling)
    kw = dict(model="chat", messages=messages, max_tokens=10, temperature=0.8, seed=7)
    whole = c.chat.completions.create(**kw)
    assert whole.choices[0].message.content == expected and whole.object == "chat.completion"
    assert whole.usage.completion_tokens >= 1 and whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    text = c.completions.create(model="chat", prompt="Hello world", max_tokens=6, temperature=0.0)
    expected = reference_reply(engine, "Hello world", Sampling(max_tokens=6, temperature=0.0))
    assert text.choices[0].text == expected
    streamed = c.completions.create(model="chat", prompt="Hello world", max_tokens=6, temperature=0.0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    assert [m.id for m in c.models.list()] == ["chat"] and c.models.retrieve("chat").id == "chat"


def converse(c, tok, template, messages, turns, seed0=0):
    """Run `turns` turns through the client, checking each feeds only its new text; returns the replies."""
    replies, consumed, previous = [], None, None
    for k in range(turns):
        messages.append(user(f"question {seed0 + k}?"))
        r = c.chat.completions.create(model="chat", messages=messages, max_tokens=5, temperature=0.9, seed=seed0 + k)
        reply, usage = r.choices[0].message.content, r.usage
        rendering = template.render(messages, add_generation_prompt=True)
        if previous is not None:  # the history came from the snapshot: cached = everything the State read before
            fed_reply = previous.completion_tokens - (previous_finish == "stop")  # the stop token is not fed
            assert usage.prompt_tokens_details.cached_tokens == previous.prompt_tokens + fed_reply
            assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens == \
                len(tok.encode(rendering[len(consumed):]))
        previous, previous_finish, consumed = usage, r.choices[0].finish_reason, rendering + reply
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_twenty_turns_feed_only_each_new_turn(served):
    e = served.engine
    converse(client(served), e.tokenizer, e.conversation.template, [], 20)
    assert e.counters["snapshot_hits"] == 19


def _server_process(model_dir, sessions):
    code = ("import torch; torch.set_num_threads(1)\n"
            "from lmsleep.server import make_server, serve_forever\n"
            f"s = make_server({str(model_dir)!r}, port=0, backend='torch', sessions_dir={str(sessions)!r})\n"
            "serve_forever(s, echo=lambda line: print(s.url, flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    line = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=120)
    if not line or not line[0].startswith("http://"):
        proc.kill()
        proc.wait(timeout=30)
        pytest.fail(f"the server process did not start: {line}")
    return proc, line[0].strip()


def test_a_sigkilled_server_continues_from_the_last_turn(chat_model, tmp_path):
    sessions, messages = tmp_path / "sessions", []
    reference, ref_thread = start(chat_model, tmp_path / "reference")  # the same turns, never restarted
    try:
        e = reference.engine
        proc, url = _server_process(chat_model, sessions)
        try:
            killed = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
            replies = converse(killed, e.tokenizer, e.conversation.template, messages, 3)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert converse(client(reference), e.tokenizer, e.conversation.template, [], 3) == replies
        messages.append(user("after the crash?"))
        kw = dict(model="chat", messages=messages, max_tokens=8, temperature=0.9, seed=99)
        restarted, thread = start(chat_model, sessions)
        try:
            after = client(restarted).chat.completions.create(**kw)
        finally:
            stop(restarted, thread)
        without = client(reference).chat.completions.create(**kw)
        assert after.choices[0].message.content == without.choices[0].message.content
        cached = after.usage.prompt_tokens_details.cached_tokens
        assert cached == without.usage.prompt_tokens_details.cached_tokens > 0  # nothing recomputed
    finally:
        stop(reference, ref_thread)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b"\xff\xfe", 400, None),
    (json.dumps({"model": "gpt-4", "messages": [user("x")]}).encode(), 404, "model"),
    (json.dumps({"messages": [user("x")]}).encode(), 400, "model"),
    (json.dumps({"model": "chat"}).encode(), 400, "messages"),
    (json.dumps({"model": "chat", "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": "chat", "messages": [user("x")], "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": "chat", "messages": [user("x")], "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"model": "chat", "messages": [user("x")], "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "chat", "messages": [user("x")], "max_tokens": 10**9}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "chat", "messages": [user("x")], "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": "chat", "messages": [user("x")], "stop": 5}).encode(), 400, "stop"),
    (json.dumps({"model": "chat", "messages": [user("x")], "seed": "s"}).encode(), 400, "seed"),
    (json.dumps({"model": "chat", "messages": [user("x")], "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "chat", "messages": [user("x")], "tools": [{"type": "function"}]}).encode(), 400, "tools"),
    (json.dumps({"model": "chat", "messages": [user("\ud800")]}).encode(), 400, "messages"),
], ids=["malformed", "array", "not-utf8", "unknown-model", "no-model", "no-messages", "messages-string",
        "temperature", "top_p", "max_tokens", "max_tokens-cap", "n", "stop", "seed", "stream", "tools", "surrogate"])
def test_bad_requests_get_openai_error_objects(served, body, status, param):
    code, obj = raw(served, "POST", "/v1/chat/completions", body)
    assert code == status and set(obj["error"]) == {"message", "type", "param", "code"}
    assert obj["error"]["param"] == param and obj["error"]["message"]


def test_bad_completions_paths_methods_and_sizes(served):
    assert raw(served, "POST", "/v1/completions", json.dumps({"model": "chat", "prompt": 3}).encode())[0] == 400
    assert raw(served, "POST", "/v1/completions", json.dumps({"model": "chat", "prompt": "x", "echo": True})
               .encode())[0] == 400
    assert raw(served, "GET", "/v1/nothing")[0] == 404
    assert raw(served, "GET", "/v1/chat/completions")[0] == 405
    assert raw(served, "GET", "/v1/models/gpt-4")[0] == 404
    served.max_body = 2048
    status, obj = raw(served, "POST", "/v1/chat/completions", json.dumps({"model": "chat", "messages": [
        user("x" * 4096)]}).encode())
    assert status == 413 and obj["error"]["message"]
    with socket.create_connection(served.server_address[:2], timeout=60) as s:  # a length far over, no body sent
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat", messages=[user("x")], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[user("x")])
    assert raw(served, "GET", "/health")[1]["status"] == "ok"  # still serving


def test_busy_is_429(served):
    engine = served.engine
    engine.queue = 0
    held = [engine.chat([user(f"hold {k}")], Sampling(max_tokens=2)) for k in range(engine.parallel)]
    try:
        with pytest.raises(openai.RateLimitError):
            client(served).chat.completions.create(model="chat", messages=[user("x")], max_tokens=2)
    finally:
        for t in held:
            t.close()
    assert client(served).chat.completions.create(model="chat", messages=[user("x")], max_tokens=2).choices


def test_sixteen_concurrent_clients_finish(served):
    errors, done = [], []

    def talk(k):
        try:
            c = client(served)
            messages = [user(f"client {k}")]
            for turn in range(2):
                r = c.chat.completions.create(model="chat", messages=messages, max_tokens=4, seed=k,
                                              stream=bool(k % 2))
                reply = "".join(ch.choices[0].delta.content or "" for ch in r) if k % 2 else r.choices[0].message.content
                messages += [{"role": "assistant", "content": reply}, user(f"more {turn}")]
            done.append(k)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=talk, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and sorted(done) == list(range(16)), (errors, sorted(done))
    stats = served.engine.stats()
    assert stats["completed"] == 32 and stats["running_or_waiting"] == 0 and stats["snapshot_hits"] >= 16, stats


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    host, port = served.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = json.dumps({"model": "chat", "prompt": "Hello", "max_tokens": 200, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.fp.readline()  # the first event's chunk size
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    engine = served.engine
    for _ in range(600):  # bounded: the server notices at its next write
        if engine.stats()["running_or_waiting"] == 0:
            break
        threading.Event().wait(0.05)
    assert engine.stats()["running_or_waiting"] == 0
    assert client(served).completions.create(model="chat", prompt="Hi", max_tokens=2).choices


def test_a_busy_port_or_a_bad_default_fails_before_serving(served, chat_model):
    from lmsleep.sessions import ParamError

    host, port = served.server_address[:2]
    with pytest.raises(OSError):
        make_server(chat_model, host=host, port=port, backend="torch")
    with pytest.raises(ParamError, match="max_tokens"):
        make_server(chat_model, host=host, port=0, backend="torch", max_tokens=10**6)
