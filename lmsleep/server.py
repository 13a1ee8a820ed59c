"""`lmsleep serve`: an OpenAI-compatible HTTP server over lmsleep.sessions (conversations as States).

    server = make_server("runs/smol", port=8000, sessions_dir="sessions")
    serve_forever(server)          # until Ctrl-C

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, /v1/models/{id} and /health. Errors are OpenAI error objects
{"error": {"message", "type", "param", "code"}} with a 4xx status for anything the client got wrong.

The HTTP layer is the standard library's ThreadingHTTPServer (one thread per connection, HTTP/1.1
keep-alive, chunked transfer for streams): a local model computes far fewer replies per second than
it can parse requests, so it adds no dependency. Everything about conversations - prefix matching,
snapshots, background sleep, limits - is in lmsleep/sessions.py, testable without HTTP.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lmsleep.sessions import Busy, Engine, ParamError, Sampling, open_engine

MAX_BODY = 1 << 20  # bytes of a request body
DEFAULT_MAX_TOKENS = 256  # when a request gives none


class ApiError(Exception):
    """An error answered with an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Server(ThreadingHTTPServer):
    """The HTTP server: an Engine, the model's id, limits; handler threads are daemons."""

    daemon_threads = True
    block_on_close = False  # keep-alive connections must not hold up shutdown

    def __init__(self, address, engine: Engine | None, *, model_id: str, max_body: int = MAX_BODY,
                 max_tokens: int = DEFAULT_MAX_TOKENS, log: Callable[[str], None] | None = None):
        super().__init__(address, Handler)
        self.engine, self.model_id, self.max_body, self.max_tokens = engine, model_id, max_body, max_tokens
        self.log, self.serving = log, False
        self.created = int(time.time())

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self.serving = True
        try:
            super().serve_forever(poll_interval)
        finally:
            self.serving = False

    def close(self) -> None:
        """Stop serving (from another thread), close the socket, let background sleeps finish."""
        if self.serving:
            self.shutdown()
        self.server_close()
        if self.engine is not None:
            self.engine.close()


def make_server(model_dir, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto",
                sessions_dir=None, max_sessions: int = 16, max_disk_mb: int = 1024, parallel: int = 2,
                queue: int = 64, max_tokens: int = DEFAULT_MAX_TOKENS, passes: int | None = None,
                dtype: str | None = None, model_id: str | None = None, max_body: int = MAX_BODY,
                log: Callable[[str], None] | None = None) -> Server:
    """Bind host:port (port 0: any free port; see `server.url`), then load MODEL_DIR behind it.

    Binding first makes a busy port fail at once (OSError), not after the model has loaded."""
    server = Server((host, port), None, model_id=model_id or Path(model_dir).resolve().name, max_body=max_body,
                    max_tokens=max_tokens, log=log)
    try:
        server.engine = open_engine(model_dir, backend=backend, sessions_dir=sessions_dir, max_sessions=max_sessions,
                                    max_disk_bytes=max_disk_mb << 20, parallel=parallel, queue=queue, passes=passes,
                                    dtype=dtype, log=log)
        Sampling(max_tokens=max_tokens)  # a bad default fails here, not in every request
        if max_tokens > server.engine.max_tokens_cap:
            raise ParamError("max_tokens", f"max_tokens: {max_tokens} is over the limit {server.engine.max_tokens_cap}")
    except BaseException:
        server.server_close()
        raise
    return server


def serve_forever(server: Server, echo: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C (or SIGTERM turned into KeyboardInterrupt), then wait for background sleeps."""
    store = server.engine.store
    echo(f"serving {server.model_id} at {server.url} (sessions: {store.dir or 'in memory only'}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.engine.close()


# --- requests -> Sampling / messages --------------------------------------------------------------

UNSUPPORTED = {  # parameter -> the values it may have here (besides null: OpenAI's defaults); others are a 400
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False, 0), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"), "echo": (False,),
    "suffix": ("",), "best_of": (1,), "audio": (), "prediction": (),
}


def parse_sampling(body: dict, default_max_tokens: int) -> Sampling:
    """The request's sampling parameters (ParamError naming the bad one); unknown keys are ignored."""
    for name, allowed in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            raise ParamError(name, f"{name}: {value!r} is not supported by this server")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ParamError("n", f"n: only 1 choice per request is supported, got {n!r}")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ParamError("response_format", "response_format: only {'type': 'text'} is supported")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise ParamError("stop", "stop: a string or a list of strings")
    args = {"max_tokens": default_max_tokens if max_tokens is None else max_tokens,
            "stop": () if stop is None else stop}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if body.get(name) is not None:
            args[name] = body[name]
    return Sampling(**args)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ParamError("stream", f"stream: expected true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ParamError("stream_options", "stream_options: expected an object")
    return stream, bool(options.get("include_usage", False))


# --- the handler ----------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a connection may sit idle or stall (a socket timeout)
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server: Server

    # ---- routing ----
    def do_GET(self):
        self._dispatch({"/health": self._health, "/v1/models": self._models}, "GET")

    def do_POST(self):
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions}, "POST")

    def do_PUT(self):
        self._dispatch({}, "PUT")

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self, routes: dict, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path.startswith("/v1/models/") and method == "GET":
                return self._model(path[len("/v1/models/"):])
            route = routes.get(path)
            if route is None:
                known = path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
                raise ApiError(405 if known else 404, f"{method} {path}: " + ("method not allowed" if known else
                               "no such endpoint"), code="method_not_allowed" if known else "not_found")
            route()
        except (BrokenPipeError, ConnectionError, TimeoutError):  # the client went away
            self.close_connection = True
        except ApiError as e:
            self._error(e)
        except Exception:  # a bug of ours: say so, keep serving
            self._log("internal error:\n" + traceback.format_exc())
            self._error(ApiError(500, "internal server error", type="server_error"))

    # ---- GET ----
    def _health(self):
        self._json(200, {"status": "ok", "model": self.server.model_id, "stats": self.server.engine.stats()})

    def _model_object(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "lm-sleep"}

    def _models(self):
        self._json(200, {"object": "list", "data": [self._model_object()]})

    def _model(self, model_id: str):
        if model_id != self.server.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server has {self.server.model_id!r})",
                           param="model", code="model_not_found")
        self._json(200, self._model_object())

    # ---- POST ----
    def _request(self) -> dict:
        body = self._read_json()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model: required, a string", param="model", code="missing_required_parameter")
        if model != self.server.model_id:
            raise ApiError(404, f"the model {model!r} does not exist (this server has {self.server.model_id!r})",
                           param="model", code="model_not_found")
        return body

    def _chat(self):
        body = self._request()
        with _ApiErrors():
            stream, usage = _stream_flags(body)
            sampling = parse_sampling(body, self.server.max_tokens)
            if "messages" not in body:
                raise ParamError("messages", "messages: required")
            turn = self.server.engine.chat(body["messages"], sampling)
        self._reply(turn, stream, usage, chat=True)

    def _completions(self):
        body = self._request()
        with _ApiErrors():
            stream, usage = _stream_flags(body)
            sampling = parse_sampling(body, self.server.max_tokens)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ParamError("prompt", "prompt: expected a string (one prompt per request)")
            turn = self.server.engine.complete(prompt, sampling)
        self._reply(turn, stream, usage, chat=False)

    def _reply(self, turn, stream: bool, include_usage: bool, *, chat: bool) -> None:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.server.model_id, "system_fingerprint": None}
        with turn:
            if not stream:
                text = turn.read()
                choice = ({"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                           "logprobs": None, "finish_reason": turn.finish_reason} if chat else
                          {"index": 0, "text": text, "logprobs": None, "finish_reason": turn.finish_reason})
                return self._json(200, {**head, "choices": [choice], "usage": turn.usage})
            self._stream(turn, {**head, "object": "chat.completion.chunk" if chat else "text_completion"},
                         include_usage, chat)

    def _stream(self, turn, head: dict, include_usage: bool, chat: bool) -> None:
        def choice(text=None, finish=None, first=False):
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if chat:
                self._event({**head, "choices": [choice(first=True)]})
            try:
                for piece in turn:
                    self._event({**head, "choices": [choice(piece)]})
            except (BrokenPipeError, ConnectionError, TimeoutError):
                raise
            except Exception:  # after the headers went out: report it in the stream
                self._log("internal error while streaming:\n" + traceback.format_exc())
                self._event(ApiError(500, "internal server error", type="server_error").body())
            else:
                self._event({**head, "choices": [choice(finish=turn.finish_reason)]})
                if include_usage:
                    self._event({**head, "choices": [], "usage": turn.usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionError, TimeoutError):  # the client went away: stop generating
            self.close_connection = True

    # ---- reading and writing ----
    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked requests are not supported)")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "Content-Length required")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if n > self.server.max_body:
            self.close_connection = True  # the body is not read: this connection cannot carry another request
            raise ApiError(413, f"request body of {n} bytes is over the limit of {self.server.max_body}",
                           code="request_too_large")
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise ApiError(400, "request body shorter than its Content-Length")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        return body

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        try:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionError, TimeoutError):
            self.close_connection = True

    def _event(self, obj: dict) -> None:
        self._chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _log(self, message: str) -> None:
        if self.server.log is not None:
            self.server.log(message)

    def log_message(self, format, *args):
        self._log(f"{self.address_string()} {format % args}")


class _ApiErrors:
    """Turn the library's errors into API errors: bad parameters 400, busy 429."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, ParamError):
            raise ApiError(400, str(e), param=e.param, code="invalid_value") from None
        if isinstance(e, Busy):
            raise ApiError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded") from None
        if isinstance(e, ValueError):  # the chat template refused the messages, ...
            raise ApiError(400, str(e).splitlines()[0] if str(e) else "invalid request", code="invalid_value") from None
        return False


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["make_server", "serve_forever", "Server", "ApiError", "parse_sampling", "stderr_log"]
