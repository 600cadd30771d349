"""OpenAI's chat completions protocol as pydantic models: what a request may hold, what the server
answers, and the error body. Parsing is strict (a number given as a string, or true for 1, is an
error, as with OpenAI), and every field says what it accepts; `validation_error` turns pydantic's
errors into OpenAI's error body, naming the parameter at fault.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

MAX_STOP = 4
MAX_STOP_CHARS = 256  # per stop string: far longer than any delimiter, and bounds the text held back
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a signed 64-bit integer
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class _Strict(BaseModel):
    # unknown fields (user, metadata, store, ...) are accepted and ignored, as OpenAI does with most
    model_config = ConfigDict(strict=True, extra="ignore")


# ----------------------------------------------------------------- requests


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="wrap")
    @classmethod
    def _text_only(cls, value: Any, handler):
        try:
            return handler(value)
        except ValidationError:
            if isinstance(value, list):
                raise ValueError("has a part that is not {\"type\": \"text\", \"text\": ...}: this model reads "
                                 "text only") from None
            raise ValueError("must be a string (or an array of text parts)") from None

    def as_template_message(self) -> dict:
        """The message for the model's chat template ('developer' is the system role)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": ROLES[self.role], "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at the values that ask for nothing this server lacks
    n: int | None = None
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: dict | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and not (isinstance(stops, list) and len(stops) <= MAX_STOP
                                      and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise ValueError(f"must be a non-empty string of at most {MAX_STOP_CHARS} characters or an array of "
                             f"at most {MAX_STOP} of them")
        return value

    @model_validator(mode="after")
    def _supported(self):
        for name, fine in (("n", self.n in (None, 1)), ("logprobs", not self.logprobs), ("tools", not self.tools),
                           ("functions", not self.functions), ("presence_penalty", self.presence_penalty in (None, 0)),
                           ("frequency_penalty", self.frequency_penalty in (None, 0)),
                           ("response_format", self.response_format in (None, {"type": "text"}))):
            if not fine:
                raise Unsupported(name, getattr(self, name))
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Unsupported(ValueError):
    """A parameter set to something this server does not do."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(f"{value!r} is not supported by this server; leave it out")
        self.name = name


# ----------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class _Response(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _given_only(self) -> dict:  # {"content": "..."}, and {} on the last chunk
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self, include_usage: bool) -> str:
        """The chunk as a server-sent event; `usage` is there (null but on the last) only when asked for."""
        return f"data: {self.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fedchat"
    round: int | None
    run_id: str | None
    base_model: str | None
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    round: int | None


class BusyHealth(Health):
    """/health for key holders: how busy the server is."""

    queued: int
    running: int
    completed: int
    cancelled: int
    failed: int
    completion_tokens: int
    fast_path: int
    handed_over: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------- validation errors


def param_name(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI names the parameter: messages[0].role."""
    name = ""
    for part in loc:
        if part == "body" and not name:  # FastAPI's prefix
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        elif not str(part).isidentifier():
            continue  # the branch of a union pydantic tried (list[str], function-wrap[...]): not a parameter
        else:
            name += f".{part}" if name else str(part)
    return name or None


def validation_error(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) for the first of pydantic's errors, worded for the client."""
    if not errors:
        return "The request is not valid.", None, "invalid_request"
    err = errors[0]
    kind, loc = err["type"], tuple(err.get("loc", ()))
    if kind == "json_invalid":
        reason = str((err.get("ctx") or {}).get("error", ""))  # never the input: it is the whole body
        if "recursion limit" in reason:
            return ("The JSON body of your request is nested too deeply to read. Send a JSON object with 'model' "
                    "and 'messages'.", None, "invalid_json")
        return (f"We could not parse the JSON body of your request ({reason}). Send a JSON object with 'model' "
                "and 'messages'.", None, "invalid_json")
    error = (err.get("ctx") or {}).get("error")
    if isinstance(error, Unsupported):
        return f"'{error.name}' = {error}.", error.name, "unsupported_value"
    if not loc or loc == ("body",):
        return "The request body must be a JSON object with 'model' and 'messages'.", None, "invalid_json"
    param = param_name(loc)
    if kind == "missing":
        hint = " (a non-empty array of {\"role\", \"content\"} objects)" if param == "messages" else ""
        return f"'{param}' is required{hint}.", param, "missing_required_parameter"
    if kind == "too_short" and param == "messages":
        return "'messages' must be a non-empty array of {\"role\", \"content\"} objects.", param, "invalid_value"
    if kind == "literal_error" and param and param.endswith(".role"):
        return (f"{param} is {err.get('input')!r}: use one of 'system', 'user', 'assistant' (or 'developer').",
                param, "invalid_value")
    if kind == "value_error":
        return f"'{param}' {error}.", param, "invalid_value"
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    message = err["msg"][0].lower() + err["msg"][1:]
    return f"'{param}' is invalid: {message}, got {shown}.", param, "invalid_value" if "type" not in kind else \
        "invalid_type"
