"""`fedchat serve`: the merged model behind an OpenAI-compatible HTTP API.

    POST /v1/chat/completions   messages, max_tokens (or max_completion_tokens), temperature,
                                top_p, stop, seed, stream (+ stream_options.include_usage)
    GET  /v1/models             the served model, with the federated round it comes from
    GET  /v1/models/{id}
    GET  /health                liveness: status, model name and round to anyone; the queue and
                                counters only with the API key (when the server has one)

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}, and status:
401 missing or wrong API key, 400 malformed JSON or a bad parameter or a prompt that does
not fit the context, 404 unknown model or route, 408 a body slower than --body-timeout, 413 a
body over --max-body-bytes, 429 a client over its share (--max-client-requests), 503 queue
full, 500 an internal failure.

Fairness: a client is its IP address (an IPv6 address by its /64 network, which one host
usually holds whole), or the --client-header a reverse proxy sets. It may hold at most
--max-client-requests places (generating, waiting, or having its body read); one more is
refused with 429 and Retry-After before its body is read. Batch slots go round robin across
clients (serving.engine.Batcher), so a client flooding the queue waits behind its own requests.

What a client can learn is kept small: no response holds a file path, and a 500 says only
that the server failed, with a request id; the exception and its traceback go to the log
under that id. The body is read in chunks and refused at --max-body-bytes (a larger
Content-Length is refused before reading any of it), and JSON parsing and the chat template
run in a worker thread, so one large prompt never stalls the event loop.

This module is the HTTP layer only: the request and response shapes are serving.openai_schema's
pydantic models, generation is serving.engine's (continuous batching), the model and its hot
reload are serving.served_model's.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import secrets
import socket
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.engine import Admission, ClientBusyError, Engine, Generation, GenerationParams, Job, QueueFullError
from serving.openai_schema import (
    AssistantMessage,
    BusyHealth,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorDetail,
    Health,
    ModelCard,
    ModelList,
    Usage,
    validation_error,
)
from serving.served_model import ModelWatcher, PromptTooLong, ServedModel, model_loader
from serving.serving_config import API_KEY_ENV, ModelSource, ServeConfig
from shared.errors import ConfigError, FedchatError

log = logging.getLogger("fedchat.serve")


class APIError(FedchatError):
    """A request the API refuses, with OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        return ErrorBody(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def response(self) -> Response:
        return _json(self.body(), self.status, self.headers)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(), status_code=status, headers=headers, media_type="application/json")


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


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (a Content-Length over the limit
    before anything is read, a chunked or lying body as soon as its count passes it) and with 408 when
    it has not all come within `timeout` seconds (a slow client does not hold its place)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _bad(f"Content-Length {declared!r} is not a number of bytes.", None, "invalid_request")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: not a server failure
        raise APIError(499, "client closed the request") from None
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s (--body-timeout): send it "
                            "at once.", code="request_timeout", headers={"Connection": "close"}) from None
    return b"".join(chunks)


# ----------------------------------------------------------------- requests


def prepare(raw: bytes, cfg: ServeConfig, served: ServedModel,
            context_length: int) -> tuple[ChatCompletionRequest, Generation]:
    """The checked request and its generation (prompt token ids, final parameters); raises pydantic's
    ValidationError or APIError. Run in a worker thread: parsing and the chat template take time."""
    body = ChatCompletionRequest.model_validate_json(raw)
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(404, f"The model `{body.model}` does not exist. This server serves `{cfg.model_name}` "
                            "(GET /v1/models lists it).", param="model", code="model_not_found")
    try:
        prompt_ids = served.encode_chat([m.as_template_message() for m in body.messages], context_length)
    except PromptTooLong as exc:
        raise _too_long(context_length, f"your messages hold at least {exc.at_least} tokens") from None
    except Exception as exc:  # the model's own template may refuse a conversation (e.g. role order)
        raise _bad(f"the model's chat template refuses these messages: {exc}", "messages") from None
    max_tokens = body.requested_max_tokens
    if max_tokens is None:
        max_tokens = max(1, min(cfg.default_max_tokens, context_length - len(prompt_ids)))
    if len(prompt_ids) + max_tokens > context_length:
        raise _too_long(context_length, f"you requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} "
                                        f"in the messages, {max_tokens} in the completion)")
    params = GenerationParams(max_tokens=max_tokens, stop=body.stops, seed=body.seed,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p)
    return body, Generation(prompt_ids, params)


def _too_long(context_length: int, what: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {context_length} tokens. However, {what}. "
                         "Please reduce the length of the messages or the completion (max_tokens).",
                    param="messages", code="context_length_exceeded")


# ----------------------------------------------------------------- the app


def create_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # stop generating while the event loop still runs: the engine's last events can be delivered
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="fedchat", description="fedchat's merged model, OpenAI-compatible", docs_url=None,
                  redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: ValidationError | RequestValidationError):
        message, param, code = validation_error(list(exc.errors()))
        return _bad(message, param, code).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "unknown_url" if exc.status_code == 404 else None
        message = (f"Unknown request URL: {request.method} {request.url.path}." if exc.status_code == 404
                   else str(exc.detail))
        return APIError(exc.status_code, message, code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        request_id = f"req-{secrets.token_hex(8)}"
        log.error("%s: %s %s failed", request_id, request.method, request.url.path, exc_info=exc)
        return internal_error(request_id).response()

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

    def model_card(served: ServedModel) -> ModelCard:  # no path: the operator's log says which folder is served
        return ModelCard(id=cfg.model_name, created=served.loaded_at, round=served.round, run_id=served.run_id,
                         base_model=_public_name(served.base_model), context_length=engine.context_length(served))

    @app.get("/health")
    async def health(request: Request):
        public = Health(model=cfg.model_name, round=engine.served.round)
        if not authorized(request):  # liveness only: how busy the server is is the key holders' business
            return _json(public)
        return _json(BusyHealth(**public.model_dump(), **engine.stats.__dict__))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return _json(ModelList(data=[model_card(engine.served)]))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != cfg.model_name:
            raise APIError(404, f"The model `{model_id}` does not exist. This server serves `{cfg.model_name}`.",
                           param="model", code="model_not_found")
        return _json(model_card(engine.served))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        place = _admit(engine, client_of(request, cfg.client_header))  # before a byte of the body is read
        try:
            return await completion(request, place)
        finally:
            place.release()  # the request never started (refused, or its client left): its place is free

    async def completion(request: Request, place: Admission):
        raw = await read_body(request, cfg.max_body_bytes, cfg.body_timeout)
        served = engine.served  # the request runs on this model, whatever is published meanwhile
        body, gen = await asyncio.to_thread(prepare, raw, cfg, served, engine.context_length(served))
        reply_id = f"chatcmpl-{secrets.token_hex(12)}"
        loop = asyncio.get_running_loop()
        if body.stream:
            events: asyncio.Queue = asyncio.Queue()
            job = Job(gen, _emitter(loop, events.put_nowait), request_id=reply_id, client=place.client)
            reply = _Reply(reply_id, cfg.model_name, engine.submit(job, served, place))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            # the background task also frees the slot if the client leaves before the stream starts
            return StreamingResponse(reply.sse(gen, events, include_usage, lambda: engine.cancel(job)),
                                     media_type="text/event-stream", background=BackgroundTask(engine.cancel, job),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces: list[str] = []
        done: asyncio.Future = loop.create_future()
        finish = _emitter(loop, lambda event: done.done() or done.set_result(event))

        def emit(event: tuple) -> None:
            if event[0] == "delta":
                pieces.append(event[1])  # read only after "done" arrives
            else:
                finish(event)

        job = Job(gen, emit, request_id=reply_id, client=place.client)
        reply = _Reply(reply_id, cfg.model_name, engine.submit(job, served, place))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():  # the client went away (or the server stops): free its slot
                engine.cancel(job)
            gone.cancel()
        if gone.done() and not done.done():
            return APIError(499, "client closed the request").response()
        kind, _ = done.result()
        if kind == "error":  # the engine logged the failure under reply.id
            raise internal_error(reply.id)
        return _json(reply.completion("".join(pieces), gen))

    return app


def _public_name(base_model: str | None) -> str | None:
    """A base model's name as a client may see it: a local folder is shown by its last part only."""
    if base_model is None or ("/" not in base_model and "\\" not in base_model):
        return base_model
    return base_model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


RETRY_AFTER_S = 2  # what a refused client is told to wait: about the time one answer of a full batch takes


def client_of(request: Request, header: str | None = None) -> str:
    """Who sent the request, for per-client fairness: `header`'s last comma-separated item when the
    operator names one (the address a reverse proxy saw), else the peer's address; an IPv6 address by
    its /64 network (one host usually holds a whole /64, and could take a new address per request)."""
    value = request.headers.get(header, "") if header else ""
    address = value.rsplit(",", 1)[-1].strip() if value.strip() else (request.client.host if request.client else "")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # an IPv4 client on a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _admit(engine: Engine, client: str) -> Admission:
    """A place for the request, or 429 (the client holds its share) or 503 (queue_full) before its body is
    read: the connection then closes, so the body is never read."""
    try:
        return engine.admit(client)
    except ClientBusyError as exc:
        raise APIError(429, f"Too many requests from you at once: {exc}", type="requests",
                       code="rate_limit_exceeded",
                       headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}) from None
    except QueueFullError as exc:
        raise APIError(503, f"The server is busy: {exc}", type="server_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"}) from None


def _emitter(loop: asyncio.AbstractEventLoop, put):
    """A callback for the engine's thread that hands events to the event loop."""
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

    def __init__(self, reply_id: str, model_name: str, served: ServedModel) -> None:
        self.id, self.model_name, self.served = reply_id, model_name, served
        self.created = int(time.time())
        self.started = time.perf_counter()

    def _fields(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.served.fingerprint()}

    @staticmethod
    def usage(gen: Generation) -> Usage:
        return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                     total_tokens=gen.prompt_tokens + gen.completion_tokens)

    def _log(self, gen: Generation) -> None:
        log.info("%s: %d prompt + %d completion tokens, %s, %.2fs (round %s)", self.id, gen.prompt_tokens,
                 gen.completion_tokens, gen.finish_reason, time.perf_counter() - self.started, self.served.round)

    def completion(self, text: str, gen: Generation) -> ChatCompletion:
        self._log(gen)
        return ChatCompletion(**self._fields(), usage=self.usage(gen), choices=[
            Choice(message=AssistantMessage(content=text), finish_reason=gen.finish_reason)])

    def _chunk(self, delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self._fields(), choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])

    async def sse(self, gen: Generation, events: asyncio.Queue, include_usage: bool, cancel):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        try:
            yield self._chunk(Delta(role="assistant", content="")).sse(include_usage)
            while True:
                kind, value = await events.get()
                if kind == "delta":
                    yield self._chunk(Delta(content=value)).sse(include_usage)
                elif kind == "done":
                    yield self._chunk(Delta(), gen.finish_reason).sse(include_usage)
                    if include_usage:
                        yield ChatCompletionChunk(**self._fields(), choices=[], usage=self.usage(gen)).sse(True)
                    self._log(gen)
                    break
                else:  # the status line is sent already: report the failure in the stream, as OpenAI does
                    yield f"data: {internal_error(self.id).body().model_dump_json()}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel()  # a client that disconnects mid-stream frees its slot (no-op once finished)


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


class _HeaderDeadline(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 connection, closed when a request's head (request line and headers) has not
    all come within `header_timeout` seconds of the connection opening or of the previous answer: a
    client that sends its headers slowly, or opens connections and sends nothing, holds nothing for long."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout, self._header_timer = header_timeout, None

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self._header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:  # waiting for the next request's head
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(cfg: ServeConfig) -> None:
    """Load the model, start continuous batching (and the watcher), serve until interrupted."""
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
        engine = Engine(served, max_queue=cfg.max_queue, max_batch=cfg.max_batch, kv_cache_tokens=cfg.kv_cache_tokens,
                        max_client_requests=cfg.max_client_requests)
        app = create_app(engine, cfg)
        if not _is_loopback(cfg.host) and cfg.api_key is None:
            log.warning("listening on %s without an API key: anyone who reaches this port can use the model "
                        "(set --api-key or %s)", cfg.host, API_KEY_ENV)
        host, port = sock.getsockname()[:2]
        log.info("serving %s as '%s' (round %s, %s, %s, context %d, batches of up to %d) on http://%s:%d/v1%s",
                 source.describe(), cfg.model_name, served.round, served.device,
                 str(served.model.dtype).replace("torch.", ""), engine.context_length(served), cfg.max_batch,
                 host, port, f"; watching {link}" if link else "")
        if watcher is not None:
            watcher.start()
        server = uvicorn.Server(uvicorn.Config(
            app, http=functools.partial(_HeaderDeadline, header_timeout=cfg.header_timeout),  # type: ignore[arg-type]
            limit_concurrency=cfg.max_connections, log_level="warning", access_log=False,
            timeout_graceful_shutdown=5, log_config=None))
        server.run(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.stop()
        if engine is not None:
            engine.stop()
        sock.close()
