"""The `fedchat serve` and `fedchat chat` subcommands (fedchat/cli.py adds them)."""

from __future__ import annotations

import argparse
import os

from serving.serving_config import (
    API_KEY_ENV,
    BODY_TIMEOUT_S,
    DTYPES,
    HEADER_TIMEOUT_S,
    MAX_BODY_BYTES,
    MAX_CLIENT_REQUESTS,
    MAX_CONNECTIONS,
    ServeConfig,
)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a merged model folder (`fedchat merge` output, a run's OUT/merged, "
                                   "or any local Hugging Face chat model folder)")
    p.add_argument("--adapter", help="an adapter folder (a run's OUT/adapter or a checkpoint), merged into "
                                     "--base in memory")
    p.add_argument("--base", help="the adapter's base model: smollm2-135m, tiny or a folder "
                                  "(default: the one the adapter's metadata names)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on a capable GPU, else float32")


def add_serving_commands(sub) -> None:
    serve = sub.add_parser("serve", help="serve a merged model over an OpenAI-compatible chat API",
                           description="Serve a model over an OpenAI-compatible API: POST /v1/chat/completions, "
                                       "GET /v1/models, GET /health.")
    _model_options(serve)
    serve.add_argument("--watch", metavar="OUT", help="a coordinator's output folder: serve each newer round it "
                       "publishes (OUT/merged, or OUT/adapter when serving an adapter)")
    serve.add_argument("--watch-interval", type=float, default=2.0, help="seconds between checks of --watch")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help=f"require this bearer key (default: ${API_KEY_ENV} if set, else none)")
    serve.add_argument("--model-name", default="fedchat", help="the model id clients ask for")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="requests generated together, token by token (continuous batching); default 8")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests that may wait for a place in the batch; more get 503")
    serve.add_argument("--kv-cache-tokens", type=int,
                       help="tokens the KV cache holds for all requests together (default: --max-batch requests of "
                            "2048 tokens, and at least the model's context); a request may hold at most this many")
    serve.add_argument("--default-max-tokens", type=int, default=512,
                       help="answer length when a request gives no max_tokens (capped by the context)")
    serve.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                       help=f"largest request body accepted; larger ones get 413 (default {MAX_BODY_BYTES})")
    serve.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                       help="seconds a connection has to send a request's headers; then it is closed "
                            f"(default {HEADER_TIMEOUT_S:g})")
    serve.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S,
                       help=f"seconds a request's body may take to arrive; then 408 (default {BODY_TIMEOUT_S:g})")
    serve.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                       help=f"open connections; a request on one more gets 503 (default {MAX_CONNECTIONS})")
    serve.add_argument("--max-client-requests", type=int, default=MAX_CLIENT_REQUESTS,
                       help="requests one client (one IP address, or --client-header) may have generating or waiting "
                            "at once; more get 429 with Retry-After. Batch slots go round robin across clients "
                            f"(default {MAX_CLIENT_REQUESTS})")
    serve.add_argument("--client-header", metavar="NAME",
                       help="behind a reverse proxy: the header it sets to the client's address (e.g. X-Forwarded-For; "
                            "its last item counts); default: the peer address of the connection")
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="chat in the terminal with a model folder or a running server",
                          description="Chat in the terminal. Lines are user turns; /reset starts over, /exit or "
                                      "end of input leaves.")
    _model_options(chat)
    chat.add_argument("--url", help="a running server instead of a model folder, e.g. http://127.0.0.1:8000/v1")
    chat.add_argument("--api-key", help=f"the server's key (default: ${API_KEY_ENV})")
    chat.add_argument("--model-name", help="with --url: the model id (default: the first the server lists)")
    chat.add_argument("--system", help="a system message for the conversation")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.2, help="0 answers greedily (deterministic)")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int)
    chat.set_defaults(func=cmd_chat)


def cmd_serve(args) -> int:
    from serving.api import run_server

    run_server(ServeConfig.from_env(
        model=args.model, base=args.base, adapter=args.adapter, watch=args.watch, watch_interval=args.watch_interval,
        host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name, device=args.device,
        dtype=args.dtype, max_queue=args.max_queue, max_batch=args.max_batch,
        kv_cache_tokens=args.kv_cache_tokens, default_max_tokens=args.default_max_tokens,
        max_body_bytes=args.max_body_bytes, header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        max_connections=args.max_connections, max_client_requests=args.max_client_requests,
        client_header=args.client_header))
    return 0


def cmd_chat(args) -> int:
    from serving.chat import LocalChat, RemoteChat, chat_loop
    from serving.engine import GenerationParams
    from shared.errors import ConfigError

    if not 0 <= args.temperature <= 2:
        raise ConfigError(f"--temperature must be from 0 to 2 (got {args.temperature}).")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be greater than 0 and at most 1 (got {args.top_p}).")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be at least 1 (got {args.max_tokens}).")
    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    if args.url:
        if args.model or args.adapter or args.base:
            raise ConfigError("give either --url (a running server) or a model (--model / --adapter), not both.")
        backend = RemoteChat(args.url, args.api_key or os.environ.get(API_KEY_ENV), args.model_name)
    elif not (args.model or args.adapter):
        raise ConfigError("nothing to chat with: give --model DIR (a merged model folder), --adapter DIR, "
                          "or --url URL (a running `fedchat serve`).")
    else:
        from serving.served_model import model_loader

        cfg = ServeConfig(model=args.model, base=args.base, adapter=args.adapter, device=args.device,
                          dtype=args.dtype)
        backend = LocalChat(model_loader(cfg.device, cfg.dtype)(cfg.source()))
        try:
            return chat_loop(backend, params, system=args.system)
        finally:
            backend.close()
    return chat_loop(backend, params, system=args.system)
