"""The serving configuration: what `fedchat serve` and `fedchat chat` read, validated once.

Which model to serve is one of three sources:

* ``model``: a merged model folder (``fedchat merge`` output, ``OUT/merged``, or any
  Hugging Face chat model folder);
* ``adapter`` (with ``base``, or the base model the adapter's metadata names): the
  adapter is merged into the base in memory when it loads;
* only ``watch``: a coordinator run folder; its ``merged`` model if the run wrote one,
  else its latest ``adapter`` checkpoint.

With ``watch`` the server follows ``WATCH/merged`` (serving merged models) or
``WATCH/adapter`` (serving an adapter) and switches to each newer round.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

API_KEY_ENV = "FEDCHAT_API_KEY"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_BODY_BYTES = 1 << 20  # 1 MiB: about 250,000 tokens of text, far more than any context served here
HEADER_TIMEOUT_S = 10.0  # a request's head (request line and headers) must come within this of the connection
BODY_TIMEOUT_S = 30.0  # and its body within this of its head: 1 MiB at 35 kB/s
MAX_CONNECTIONS = 256  # open connections; a request on one more gets 503 at once (uvicorn's limit_concurrency)
MAX_CLIENT_REQUESTS = 8  # places (generating or waiting) one client may hold: one batch's worth by default


@dataclass(frozen=True)
class ModelSource:
    """Where the served weights come from: a merged folder, or base + adapter."""

    kind: str  # "merged" | "adapter"
    path: Path  # the merged folder or the adapter folder (a symlink is followed at load time)
    base: str | None = None  # adapter only: base model name or folder (None: from the adapter's metadata)

    def describe(self) -> str:
        if self.kind == "merged":
            return f"merged model {self.path}"
        return f"adapter {self.path} on base {self.base or '(named by the adapter)'}"


@dataclass(frozen=True)
class ServeConfig:
    model: str | None = None
    base: str | None = None
    adapter: str | None = None
    watch: str | None = None
    watch_interval: float = 2.0
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    model_name: str = "fedchat"
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = 64
    max_batch: int = 8
    kv_cache_tokens: int | None = None
    default_max_tokens: int = 512
    max_body_bytes: int = MAX_BODY_BYTES
    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float = BODY_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS
    # Per-client fairness. A client is the peer's IP address (an IPv6 address by its /64 network), or,
    # behind a reverse proxy, the value of `client_header` that the proxy sets (its last comma-separated
    # item: the address the proxy saw). One client may hold at most `max_client_requests` places; more
    # get 429 with Retry-After before the body is read. Batch slots go round robin across clients.
    max_client_requests: int = MAX_CLIENT_REQUESTS
    client_header: str | None = None

    def __post_init__(self) -> None:
        if self.model and (self.adapter or self.base):
            raise ConfigError("give either --model (a merged model folder) or --adapter/--base, not both.")
        if not (self.model or self.adapter or self.base or self.watch):
            raise ConfigError("nothing to serve: give --model DIR (a merged model folder), --adapter DIR "
                              "(with --base if its metadata names no base model), or --watch OUT (a run folder).")
        if self.base and not (self.adapter or self.watch):
            raise ConfigError("--base needs --adapter DIR (or --watch OUT to serve OUT/adapter).")
        if self.watch and not Path(self.watch).is_dir():
            raise ConfigError(f"--watch {self.watch}: no such folder. Give the coordinator's output folder "
                              "(the one holding 'merged' and 'adapter').")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port {self.port} is not a TCP port (0-65535).")
        if self.watch_interval <= 0:
            raise ConfigError(f"--watch-interval must be positive seconds (got {self.watch_interval}).")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be at least 1 (got {self.max_queue}).")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1 (got {self.max_batch}): it is how many requests "
                              "generate together.")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 256:
            raise ConfigError(f"--kv-cache-tokens must be at least 256 (got {self.kv_cache_tokens}); leave it out "
                              "for the default (--max-batch requests of 2048 tokens, and at least the model's "
                              "context).")
        if self.default_max_tokens < 1:
            raise ConfigError(f"--default-max-tokens must be at least 1 (got {self.default_max_tokens}).")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"--max-body-bytes must be at least 1024 (got {self.max_body_bytes}): a request "
                              "body holds the whole conversation.")
        for name, value in (("--header-timeout", self.header_timeout), ("--body-timeout", self.body_timeout)):
            if not value > 0:
                raise ConfigError(f"{name} must be positive seconds (got {value}).")
        if self.max_connections < self.max_batch + self.max_queue:
            raise ConfigError(f"--max-connections ({self.max_connections}) must be at least --max-batch + --max-queue "
                              f"({self.max_batch + self.max_queue}): every request needs a connection.")
        if self.max_client_requests < 1:
            raise ConfigError(f"--max-client-requests must be at least 1 (got {self.max_client_requests}): it is "
                              "how many requests one client may have generating or waiting at once.")
        if self.client_header is not None and not _TOKEN.fullmatch(self.client_header):
            raise ConfigError(f"--client-header {self.client_header!r} is not an HTTP header name (e.g. "
                              "X-Forwarded-For, X-Real-IP).")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}.")
        if not self.model_name or any(c.isspace() for c in self.model_name):
            raise ConfigError(f"--model-name {self.model_name!r} must be a non-empty name without spaces.")
        if self.api_key is not None and not self.api_key:
            raise ConfigError(f"the API key is empty: set --api-key or {API_KEY_ENV} to a secret, or leave both unset.")

    @classmethod
    def from_env(cls, **values) -> ServeConfig:
        """The config with the API key from FEDCHAT_API_KEY when none is given explicitly."""
        if values.get("api_key") is None and os.environ.get(API_KEY_ENV):
            values["api_key"] = os.environ[API_KEY_ENV]
        return cls(**values)

    def source(self) -> ModelSource:
        """The model to load at start."""
        if self.model:
            return ModelSource("merged", Path(self.model))
        if self.adapter:
            return ModelSource("adapter", Path(self.adapter), self.base)
        watch = Path(self.watch)  # type: ignore[arg-type]
        if self.base is None and (watch / "merged").exists():
            return ModelSource("merged", watch / "merged")
        if (watch / "adapter").exists():
            return ModelSource("adapter", watch / "adapter", self.base)
        raise ConfigError(f"{watch} holds neither 'merged' nor 'adapter' yet: start the server once the "
                          "coordinator has finished a round, or serve another --model meanwhile.")

    def watch_link(self) -> Path | None:
        """The symlink the server follows for newer rounds (None without --watch)."""
        if not self.watch:
            return None
        return Path(self.watch) / ("merged" if self.source().kind == "merged" else "adapter")
