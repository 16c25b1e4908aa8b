"""What /openapi.json says of the server's bodies: the requests each route reads and the answers it gives.

The routes read their JSON themselves (edgemm.serve.api.read_json) and check it field by field, so that every
refusal is one OpenAI-shaped error with edgemm's own message; the pydantic models here only *describe* those
bodies (nothing validates against them at run time), as the routes accept them: OpenAI's chat request with the
fields edgemm reads (content parts with image_url or video_url, max_tokens, temperature, stream, ...), any other field
ignored. Clients and the HTTP fuzz suite (tests/test_fuzz_api.py, which generates its requests from this schema)
read it; the max_tokens bound is the server's own cap.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, Field

from ..chat_template import ROLES

REF = "#/components/schemas/{model}"


class ImageURL(BaseModel):
    url: str = Field(description="data:image/<png|jpeg|webp>;base64,... or an http(s) URL of a host the server "
                                 "allows (--allow-remote-images)")
    detail: Optional[str] = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]


class VideoURL(BaseModel):
    url: str = Field(description="data:video/<mp4|webm|...>;base64,... (an mp4/mov or webm/mkv clip; frames "
                                 "sampled as the model's processor does; bounded in bytes, frames and pixels)")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: Union[VideoURL, str]


class Message(BaseModel):
    role: Literal[ROLES]
    content: Union[str, list[Union[TextPart, ImagePart, VideoPart]], None] = None
    tool_calls: Optional[list[dict]] = Field(None, description="an assistant turn's calls, sent back")
    tool_call_id: Optional[str] = Field(None, description="a tool turn: the call it answers")


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None      # vLLM's: the usage so far on every content chunk


class JSONSchemaFormat(BaseModel):
    name: str
    schema_: dict = Field(alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


class ChatCompletionRequest(BaseModel):
    model: Optional[str] = Field(None, description="a served model's id (GET /v1/models); optional when one is "
                                                   "served")
    messages: list[Message] = Field(min_length=1, description="the last one the user's")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=0)
    n: Literal[1] = 1
    stop: Union[str, Annotated[list[str], Field(max_length=4)], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    response_format: Optional[ResponseFormat] = Field(None, description="JSON output under a grammar (edgemm.grammar)")
    tools: Optional[list[dict]] = Field(None, description="OpenAI's function tools, for templates that take them")
    tool_choice: Union[Literal["auto", "none", "required"], dict, None] = None
    parallel_tool_calls: Optional[bool] = None


class TokenizeRequest(BaseModel):
    model: Optional[str] = None
    content: Optional[str] = Field(None, description="a string to tokenize (when no messages are given)")
    messages: Optional[list[Message]] = Field(None, description="a chat: its prompt's ids and image rows")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[dict]] = None


class Choice(BaseModel):
    index: int
    message: AnswerMessage
    finish_reason: Optional[str]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ChunkChoice(BaseModel):
    index: int
    delta: dict
    finish_reason: Optional[str]


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    meta: dict


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    image_rows: Optional[int] = None


class Health(BaseModel):
    status: str
    models: Optional[list[str]] = None
    error: Optional[str] = None


MODELS = (ChatCompletionRequest, TokenizeRequest, ErrorResponse, ChatCompletion, ChatCompletionChunk, ModelList, Tokens,
          Health)


def _ref(model) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "an error in OpenAI's shape", **_json(_ref(ErrorResponse))} for c in codes}


def _cap_max_tokens(schemas: dict, cap: int) -> None:
    """max_tokens and max_completion_tokens: at most the server's --max-tokens."""
    for name in ("max_tokens", "max_completion_tokens"):
        for s in schemas["ChatCompletionRequest"]["properties"][name]["anyOf"]:
            if s.get("type") == "integer":
                s["maximum"] = cap


def describe(schema: dict, max_tokens: int) -> dict:
    """`schema` (FastAPI's OpenAPI document of the app) with the request and response bodies filled in."""
    from pydantic.json_schema import models_json_schema
    _, defs = models_json_schema([(m, "validation") for m in MODELS], ref_template=REF)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.update(defs["$defs"])
    _cap_max_tokens(comps, max_tokens)
    paths = schema["paths"]

    def say(path, method, ok: dict, *codes, body=None):
        op = paths[path][method]
        op["responses"] = {"200": {"description": "OK", **ok}, **_errors(*codes)}
        if body is not None:
            op["requestBody"] = {"required": True, **_json(_ref(body))}
    # one event (as OpenAPI 3.1 describes a stream): a chunk or an error as JSON, the last one data: [DONE]
    event = {"anyOf": [{"const": "[DONE]"},
                       {"type": "string", "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": [_ref(ChatCompletionChunk), _ref(ErrorResponse)]}}]}
    sse = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": event}}}}
    chat = _json(_ref(ChatCompletion))
    chat["content"].update(sse)
    say("/v1/chat/completions", "post", chat, 400, 401, 404, 413, 503, body=ChatCompletionRequest)
    say("/tokenize", "post", _json(_ref(Tokens)), 400, 401, 404, 413, 503, body=TokenizeRequest)
    say("/v1/models", "get", _json(_ref(ModelList)), 401, 413, 503)
    say("/metrics", "get", {"content": {"text/plain": {"schema": {"type": "string"}}}}, 401, 404, 413)
    say("/health", "get", _json(_ref(Health)), 413)
    paths["/health"]["get"]["responses"]["503"] = {"description": "loading, or loading failed",
                                                   **_json(_ref(Health))}
    say("/", "get", {"content": {"text/html": {"schema": {"type": "string"}}}}, 413)
    return schema


def install_openapi(app, max_tokens: int) -> None:
    """/openapi.json of `app` described by `describe` (built once, on its first request)."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = describe(get_openapi(title=app.title, version=app.version, routes=app.routes),
                                          max_tokens)
        return app.openapi_schema
    app.openapi = openapi
