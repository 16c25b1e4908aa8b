"""A chat request's `response_format`, `tools` and `tool_choice`: checked (400 with the reason), turned into the
grammar its answer is sampled under (edgemm.grammar) and the tool-call form its answer is parsed in
(edgemm.tools); and the answer's tool calls as OpenAI sends them, whole or as stream deltas."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgemmError
from .api import APIError


@dataclass
class Structured:
    grammar: object = None          # edgemm.grammar.Grammar, or None: the answer is free
    tools: list | None = None       # rendered by the chat template
    fmt: str | None = None          # the tool-call form the answer is parsed in (None: no tool calls)
    trigger: tuple | None = None    # tool_choice auto: the calls' grammar once one opens (GenerationConfig.trigger)


def _response_format(tok, rf):
    from ..grammar import json_grammar
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar(tok)
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not isinstance(js.get("schema"), dict):
            raise EdgemmError("response_format.json_schema needs a name and a schema (a JSON Schema object)")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise EdgemmError("response_format.json_schema.strict must be a boolean")
        return json_grammar(tok, js["schema"], bool(strict))
    raise EdgemmError("response_format.type must be text, json_object or json_schema")


def _tool_choice(choice, tools: list | None) -> tuple[str, list | None]:
    """-> (mode: none | auto | required, the tools a required call may use)."""
    if choice is None:
        return ("auto" if tools else "none"), tools
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise EdgemmError("tool_choice 'required' needs tools")
        return choice, tools
    f = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(f, dict) or not isinstance(f.get("name"), str):
        raise EdgemmError("tool_choice must be none, auto, required or {'type': 'function', 'function': {'name'}}")
    named = [t for t in tools or () if t["function"]["name"] == f["name"]]
    if not named:
        raise EdgemmError(f"tool_choice names the function {f['name']!r}, which is not among the request's tools")
    return "required", named


def structured_of(body: dict, tok, template: str | None) -> Structured:
    """The request's structured-output settings (APIError 400 for a bad one). Compiling a grammar may take a
    while on a large vocabulary the first time: call it off the event loop."""
    from ..tools import call_grammar, call_trigger, check_tools, tool_format
    rf, tools, choice = body.get("response_format"), body.get("tools"), body.get("tool_choice")
    if rf is None and tools is None and choice is None:
        return Structured()
    try:
        if tools is not None:
            tools = check_tools(tools)
        mode, usable = _tool_choice(choice, tools)
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise EdgemmError("parallel_tool_calls must be a boolean")
        if mode == "none":
            return Structured(grammar=_response_format(tok, rf))
        fmt = tool_format(template)
        if fmt is None:
            raise EdgemmError("this model's chat template takes no tools (it renders no `tools` and teaches no "
                              "tool-call form); send tool_choice 'none' or serve a model whose template does")
        if mode == "required":
            return Structured(call_grammar(tok, usable, fmt, parallel), tools, fmt)
        grammar = _response_format(tok, rf)         # auto: free text (or the response_format) until a call opens
        return Structured(grammar, tools, fmt, None if grammar is not None else call_trigger(tok, tools, fmt, parallel))
    except EdgemmError as e:
        raise APIError(400, str(e), code="invalid_request") from None


def call_deltas(count: int, kind: str, data) -> list[dict]:
    """A tool-call event of edgemm.tools.ToolStream as stream deltas, as OpenAI sends them: a call's id, type and
    name (arguments "") when it opens, then its arguments in pieces. count: the calls opened before this event."""
    from ..tools import openai_call
    if kind == "call_args":
        return [{"tool_calls": [{"index": count - 1, "function": {"arguments": data}}]}]
    c = openai_call({"name": data["name"] if kind == "call" else data, "arguments": ""})
    head = {"index": count, **c}
    return [{"tool_calls": [head]}] + ([{"tool_calls": [{"index": count, "function": {"arguments": data["arguments"]}}]}]
                                       if kind == "call" else [])
