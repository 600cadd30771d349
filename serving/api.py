"""`fedchat serve`: the merged model behind an OpenAI-compatible HTTP API.

    POST /v1/chat/completions   messages, max_tokens (or max_completion_tokens), temperature,
                                top_p, stop, seed, stream (+ stream_options.include_usage)
    GET  /v1/models             the served model, with the federated round it comes from
    GET  /v1/models/{id}
    GET  /health                liveness: status, model name and round to anyone; the queue and
                                counters only with the API key (when the server has one)

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}, and status:
401 missing or wrong API key, 400 malformed JSON or a bad parameter or a prompt that does
not fit the context, 404 unknown model or route, 413 a body over --max-body-bytes, 503 queue
full, 500 an internal failure.

What a client can learn is kept small: no response holds a file path, and a 500 says only
that the server failed, with a request id; the exception and its traceback go to the log
under that id. The body is read in chunks and refused at --max-body-bytes (a larger
Content-Length is refused before reading any of it), and JSON parsing and the chat template
run in a worker thread, so one large prompt never stalls the event loop.

This module is the HTTP layer only: requests are checked and turned into generations
here, and run by `serving.engine.Engine` (one worker, a queue); the model and its
hot reload live in `serving.model`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.config import API_KEY_ENV, ModelSource, ServeConfig
from serving.engine import Engine, Generation, GenerationParams, Job, QueueFullError
from serving.model import ModelWatcher, ServedModel, model_loader
from shared.errors import ConfigError, FedchatError

log = logging.getLogger("fedchat.serve")

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a signed 64-bit integer


class APIError(FedchatError):
    """A request the API refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def internal_error(request_id: str) -> APIError:
    """What a client sees of a failure inside the server: the id under which it is logged, no more."""
    return APIError(500, f"The server had an error while processing your request. Retry it; if the error "
                         f"persists, give the server's operator the request id {request_id} (its log has "
                         "the details).", type="server_error", code="internal_error",
                    headers={"X-Request-Id": request_id})


def _too_large(limit: int) -> APIError:
    # the rest of the body is never read: the connection closes after the answer
    return APIError(413, f"The request body is larger than this server accepts ({limit} bytes, "
                         "--max-body-bytes). Send a shorter conversation.", param="messages",
                    code="request_too_large", headers={"Connection": "close"})


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes: a Content-Length over
    the limit before anything is read, a chunked or lying body as soon as its count passes it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad(f"Content-Length {declared!r} is not a number of bytes.", None, "invalid_request")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: not a server failure
        raise APIError(499, "client closed the request") from None
    return b"".join(chunks)


# ----------------------------------------------------------------- requests


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    params: GenerationParams
    max_tokens_given: bool
    stream: bool
    include_usage: bool


def parse_chat_request(raw: bytes, model_name: str, default_max_tokens: int) -> ChatRequest:
    """Check a /v1/chat/completions body; raise APIError naming the parameter at fault."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}). Send a JSON object "
                            "with 'model' and 'messages'.", code="invalid_json") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise APIError(400, "The JSON body of your request is nested too deeply to read. Send a JSON object "
                            "with 'model' and 'messages'.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object with 'model' and 'messages'.",
                       code="invalid_json")
    model = body.get("model", model_name)
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist. This server serves `{model_name}` "
                            "(GET /v1/models lists it).", param="model", code="model_not_found")
    messages = _messages(body.get("messages"))
    for name, supported in (("n", lambda v: v in (None, 1)), ("logprobs", lambda v: not v),
                            ("tools", lambda v: not v), ("functions", lambda v: not v),
                            ("presence_penalty", lambda v: v in (None, 0)),
                            ("frequency_penalty", lambda v: v in (None, 0)),
                            ("response_format", lambda v: v in (None, {"type": "text"}))):
        if not supported(body.get(name)):
            raise _bad(f"'{name}' = {body.get(name)!r} is not supported by this server; leave it out.", name,
                       "unsupported_value")
    max_tokens, given = _max_tokens(body, default_max_tokens)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("'top_p' must be greater than 0 and at most 1.", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise _bad(f"'seed' must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {seed!r}.", "seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object such as {\"include_usage\": true}.", "stream_options")
    return ChatRequest(
        messages=messages, stream=stream, include_usage=bool(options.get("include_usage")), max_tokens_given=given,
        params=GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop=_stop(body.get("stop")), seed=seed))


def _messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty array of {\"role\", \"content\"} objects.", "messages",
                   "missing_required_parameter" if value is None else "invalid_type")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'.", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role is {role!r}: use one of 'system', 'user', 'assistant' (or "
                       "'developer').", f"messages[{i}].role")
        out.append({"role": ROLES[role], "content": _content(m.get("content"), i)})
    return out


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text ones
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content has a part that is not {{\"type\": \"text\", \"text\": ...}}: "
                           "this model reads text only.", f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string (or an array of text parts).", f"messages[{i}].content",
               "invalid_type")


def _max_tokens(body: dict, default: int) -> tuple[int, bool]:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _bad(f"'{name}' must be an integer of at least 1, got {value!r}.", name)
        return value, True
    return default, False


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _bad(f"'{name}' must be a number from {low:g} to {high:g}, got {value!r}.", name)
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise _bad(f"'stop' must be a non-empty string or an array of at most {MAX_STOP} of them.", "stop")
    return tuple(stops)


def fit_context(request: ChatRequest, served: ServedModel) -> tuple[list[int], GenerationParams]:
    """The prompt's token ids and the final max_tokens; 400 when they do not fit the context."""
    try:
        prompt_ids = served.encode_chat(request.messages)
    except Exception as exc:  # the model's own template may refuse a conversation (e.g. role order)
        raise _bad(f"the model's chat template refuses these messages: {exc}", "messages") from None
    room = served.context_length - len(prompt_ids)
    params = request.params
    if not request.max_tokens_given:
        params = dataclasses.replace(params, max_tokens=max(1, min(params.max_tokens, room)))
    if len(prompt_ids) + params.max_tokens > served.context_length:
        raise APIError(400, f"This model's maximum context length is {served.context_length} tokens. However, you "
                            f"requested {len(prompt_ids) + params.max_tokens} tokens ({len(prompt_ids)} in the "
                            f"messages, {params.max_tokens} in the completion). Please reduce the length of the "
                            "messages or the completion (max_tokens).", param="messages",
                       code="context_length_exceeded")
    return prompt_ids, params


# ----------------------------------------------------------------- the app


def create_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="fedchat", description="fedchat's merged model, OpenAI-compatible", docs_url=None,
                  redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "unknown_url" if exc.status_code == 404 else None
        message = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
                   else str(exc.detail))
        return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        request_id = f"req-{secrets.token_hex(8)}"
        log.error("%s: %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
        error = internal_error(request_id)
        return JSONResponse(error.body(), status_code=500, headers=error.headers)

    def authorized(request: Request) -> bool:
        """The request carries the server's API key (always true on a server without one)."""
        try:
            authorize(request)
        except APIError:
            return False
        return True

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not key or scheme.lower() != "bearer":
            raise APIError(401, "You didn't provide an API key. Send it in an 'Authorization: Bearer YOUR_KEY' "
                                f"header (the key the server was started with, --api-key or {API_KEY_ENV}).",
                           code="missing_api_key")
        if not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Use the key the server was started with "
                                f"(--api-key or {API_KEY_ENV}).", code="invalid_api_key")

    def model_card(served: ServedModel) -> dict:  # no path: the operator's log says which folder is served
        return {"id": cfg.model_name, "object": "model", "created": served.loaded_at, "owned_by": "fedchat",
                "round": served.round, "run_id": served.run_id, "base_model": _public_name(served.base_model),
                "context_length": served.context_length}

    @app.get("/health")
    async def health(request: Request):
        served, stats = engine.served, engine.stats
        public = {"status": "ok", "model": cfg.model_name, "round": served.round}
        if not authorized(request):  # liveness only: how busy the server is is the key holders' business
            return public
        return {**public, "queued": stats.queued, "running": stats.running, "completed": stats.completed,
                "cancelled": stats.cancelled, "failed": stats.failed, "completion_tokens": stats.completion_tokens}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card(engine.served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != cfg.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist. This server serves `{cfg.model_name}`.",
                           param="model", code="model_not_found")
        return model_card(engine.served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        raw = await read_body(request, cfg.max_body_bytes)
        served = engine.served  # the request runs on this model, whatever is published meanwhile
        # JSON parsing and the chat template take time on a large prompt: not on the event loop
        chat, prompt_ids, params = await asyncio.to_thread(_prepare, raw, cfg, served)
        gen = Generation(served, prompt_ids, params)
        reply = _Reply(cfg.model_name, served)
        if chat.stream:
            events: asyncio.Queue = asyncio.Queue()
            _submit(engine, gen, _emitter(asyncio.get_running_loop(), events.put_nowait), reply.id)
            # the background task also frees the worker if the client leaves before the stream starts
            return StreamingResponse(reply.sse(gen, events, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(gen.cancel))
        pieces: list[str] = []
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        finish = _emitter(loop, lambda event: done.done() or done.set_result(event))

        def emit(event: tuple) -> None:
            if event[0] == "delta":
                pieces.append(event[1])  # read only after "done" arrives
            else:
                finish(event)

        _submit(engine, gen, emit, reply.id)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():  # the client went away (or the server stops): free the worker
                gen.cancel()
            gone.cancel()
        if gone.done() and not done.done():
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        kind, _ = done.result()
        if kind == "error":  # the worker logged the failure under reply.id
            raise internal_error(reply.id)
        return reply.completion("".join(pieces), gen)

    return app


def _prepare(raw: bytes, cfg: ServeConfig, served: ServedModel) -> tuple[ChatRequest, list[int], GenerationParams]:
    """The checked request, its prompt's token ids and final parameters (run in a worker thread)."""
    chat = parse_chat_request(raw, cfg.model_name, cfg.default_max_tokens)
    prompt_ids, params = fit_context(chat, served)
    return chat, prompt_ids, params


def _public_name(base_model: str | None) -> str | None:
    """A base model's name as a client may see it: a local folder is shown by its last part only."""
    if base_model is None or ("/" not in base_model and "\\" not in base_model):
        return base_model
    return base_model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _submit(engine: Engine, gen: Generation, emit, request_id: str) -> None:
    try:
        engine.submit(Job(gen, emit, request_id=request_id))
    except QueueFullError as exc:
        raise APIError(503, f"The server is busy: {exc}", type="server_error", code="queue_full") from None


def _emitter(loop: asyncio.AbstractEventLoop, put):
    """A callback for the worker thread that hands events to the event loop."""
    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(put, event)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass
    return emit


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, model_name: str, served: ServedModel) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model_name, self.served = model_name, served
        self.started = time.perf_counter()

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.served.fingerprint()}

    @staticmethod
    def usage(gen: Generation) -> dict:
        return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    def _log(self, gen: Generation) -> None:
        log.info("%s: %d prompt + %d completion tokens, %s, %.2fs (round %s)", self.id, gen.prompt_tokens,
                 gen.completion_tokens, gen.finish_reason, time.perf_counter() - self.started, self.served.round)

    def completion(self, text: str, gen: Generation) -> dict:
        self._log(gen)
        return {**self._base("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": gen.finish_reason}],
                "usage": self.usage(gen)}

    def _chunk(self, delta: dict, finish_reason: str | None, include_usage: bool) -> str:
        chunk = {**self._base("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk)}\n\n"

    async def sse(self, gen: Generation, events: asyncio.Queue, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        try:
            yield self._chunk({"role": "assistant", "content": ""}, None, include_usage)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield self._chunk({"content": value}, None, include_usage)
                elif kind == "done":
                    yield self._chunk({}, gen.finish_reason, include_usage)
                    if include_usage:
                        yield f"data: {json.dumps({**self._base('chat.completion.chunk'), 'choices': [], 'usage': self.usage(gen)})}\n\n"
                    self._log(gen)
                    break
                else:  # the status line is sent already: report the failure in the stream, as OpenAI does
                    yield f"data: {json.dumps(internal_error(self.id).body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # a client that disconnects mid-stream frees the worker (no-op once finished)


# ----------------------------------------------------------------- running it


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves: a taken port is a clear error, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host.") \
            from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(cfg: ServeConfig) -> None:
    """Load the model, start the generation worker (and the watcher), serve until interrupted."""
    import uvicorn

    load = model_loader(cfg.device, cfg.dtype)
    source = cfg.source()
    link = cfg.watch_link()
    watcher = None
    engine: Engine | None = None
    if link is not None:  # made before the first load: a round published while it loads is not missed
        watcher = ModelWatcher(ModelSource(source.kind, link, source.base), load,
                               lambda served: engine.swap(served), cfg.watch_interval)  # type: ignore[union-attr]
    sock = _listen(cfg.host, cfg.port)
    try:
        served = load(source)
        engine = Engine(served, cfg.max_queue)
        app = create_app(engine, cfg)
        if not _is_loopback(cfg.host) and cfg.api_key is None:
            log.warning("listening on %s without an API key: anyone who reaches this port can use the model "
                        "(set --api-key or %s)", cfg.host, API_KEY_ENV)
        host, port = sock.getsockname()[:2]
        log.info("serving %s as '%s' (round %s, %s, %s, context %d) on http://%s:%d/v1%s", source.describe(),
                 cfg.model_name, served.round, served.device, str(served.model.dtype).replace("torch.", ""),
                 served.context_length,
                 host, port, f"; watching {link}" if link else "")
        if watcher is not None:
            watcher.start()
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=5, log_config=None))
        server.run(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.stop()
        if engine is not None:
            engine.stop()
        sock.close()
