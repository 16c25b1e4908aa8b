"""Tool calls in the model's own format: which form a chat template uses, the grammar that forces a valid call,
and the answer parsed back into OpenAI's `tool_calls`.

Forms (what the imported models' templates teach):
    hermes   Hermes / Qwen: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call> (one block per call)
    llama3   Llama 3.x JSON: {"name": ..., "parameters": {...}} (after <|python_tag|> or alone)
    mistral  Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]

`tools` are rendered by the template itself (edgemm.chat_template passes them as HF templates expect). With
tool_choice "required" or a named function, `call_grammar` constrains the answer to calls of those tools whose
arguments validate against their `parameters` schema (edgemm.grammar). `ToolStream` turns the answer's text into
content pieces and whole calls as it arrives, so a streamed answer sends each call once it is complete.
"""
from __future__ import annotations

import json
import re
import uuid

from .errors import EdgemmError

FORMATS = ("hermes", "llama3", "mistral")
_ARGS = {"hermes": "arguments", "llama3": "parameters", "mistral": "arguments"}


def tool_format(template: str | None) -> str | None:
    """The tool-call form a chat template teaches (None: the template takes no tools)."""
    if not template or "tools" not in template:
        return None
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "<|start_header_id|>" in template:
        return "llama3"
    return None


def call_schema(tool: dict, fmt: str) -> dict:
    """The JSON schema of one call of `tool` (an OpenAI function tool) in form `fmt`."""
    f = tool["function"]
    params = f.get("parameters") or {"type": "object", "properties": {}}
    key = _ARGS[fmt]
    return {"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
            "required": ["name", key], "additionalProperties": False}


TRIGGERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}     # a call's opening, in the answer's text


def call_trigger(tok, tools: list, fmt: str, parallel: bool = True) -> tuple | None:
    """tool_choice auto: (the text that opens a call, the grammar of the rest of the calls, that text's token id
    where the vocabulary has it as one token: a special token's text is not in the decoded answer) for
    GenerationConfig.trigger: the answer is free until the model opens a call, which is then forced valid (None:
    a form whose calls have no opening text, llama3's bare JSON)."""
    if fmt not in TRIGGERS:
        return None
    text = TRIGGERS[fmt]
    return text, call_grammar(tok, tools, fmt, parallel, opened=True), tok.tok.token_to_id(text)


def call_grammar(tok, tools: list, fmt: str, parallel: bool = True, opened: bool = False):
    """A grammar (edgemm.grammar.Grammar) whose sentences are calls of `tools` in form `fmt`: one, or with
    `parallel` up to four (hermes, mistral); opened: what follows the first call's opening (TRIGGERS)."""
    from .grammar import lark_grammar, lark_json
    strict = all(t["function"].get("strict") is not False for t in tools)
    body = lark_json({"anyOf": [call_schema(t, fmt) for t in tools]} if len(tools) > 1 else call_schema(tools[0], fmt),
                     strict)
    if fmt == "hermes":
        more = ' ("\\n" call){0,3}' if parallel else ""
        first = '"\\n" body "\\n</tool_call>"' if opened else "call"
        lark = f'start: {first}{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: {body}\n'
    elif fmt == "llama3":
        lark = f"start: body\nbody: {body}\n"
    else:                               # [TOOL_CALLS] is a special token where the vocabulary has it
        more = ' (", " body){0,3}' if parallel else ""
        tid = tok.tok.token_to_id("[TOOL_CALLS]")
        lark = f'start: {"" if tid is None or opened else f"<[{tid}]> "}"[" body{more} "]"\nbody: {body}\n'
    return lark_grammar(tok, lark, "the tools' parameters")


def _call(obj, fmt: str) -> dict | None:
    """{"name", "arguments": JSON text} of one parsed call object (None if it is not one)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(_ARGS[fmt], obj.get("arguments", obj.get("parameters", {})))
    return {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_calls(fmt: str, text: str) -> tuple[str, list[dict]]:
    """A whole answer -> (content, calls): the text outside the calls and [{"name", "arguments"}]."""
    ts = ToolStream(fmt)
    return ts.close(ts.feed(text))


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*:')


def _value_span(text: str) -> tuple[int, int | None, bool]:
    """Where the JSON object (or array) at the start of `text` lies -> (start, end so far, complete); end None:
    the value is not an object."""
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return start, start, False
    if text[start] not in "{[":
        return start, None, False
    depth, in_str, esc = 0, False, False
    for j in range(start, len(text)):
        ch = text[j]
        if in_str:
            esc, in_str = (ch == "\\" and not esc), not (ch == '"' and not esc)
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return start, j + 1, True
    return start, len(text), False


class ToolStream:
    """An answer's text as it arrives -> events ("content", text), ("call", {"name", "arguments"}) for a whole
    call, and, as OpenAI streams a call, ("call_name", name) then ("call_args", piece)... for one whose arguments
    arrive as they are generated (hermes, `{"name": ..., "arguments": {...` in that order: what the grammar of
    tool_choice required writes).

    Text that may be the start of a call is held until it is known: for hermes, the stretch from <tool_call>
    (to its </tool_call>, or while the arguments stream, the text around them); for llama3 and mistral (whose
    calls are the whole answer), an answer that opens with `{` or `[`, to the end. What does not parse as a call
    is content after all."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, fmt: str):
        if fmt not in FORMATS:
            raise EdgemmError(f"unknown tool-call form {fmt!r}")
        self.fmt, self.buf, self.whole = fmt, "", None
        self.args_at, self.sent = None, 0       # hermes: where the streaming call's arguments start, chars sent

    def _stream_args(self, end: int, out: list, last: bool = False) -> None:
        """The streaming call's arguments in buf[args_at:end] not sent yet; `last`: the call ends at `end`."""
        text = self.buf[self.args_at:end]
        start, stop, _ = _value_span(text)
        if stop is None:                     # not an object: sent whole at the end
            if not last:
                return
            v = _json(text.strip().removesuffix("}").strip())
            stop, text = len(text), (text if v is None else json.dumps(v))
        piece = text[start + self.sent:stop]
        if piece:
            out.append(("call_args", piece))
            self.sent += len(piece)

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        if self.fmt != "hermes":
            if self.whole is None and self.buf.strip():
                self.whole = self.buf.lstrip()[:1] in "{[" or self.buf.lstrip().startswith("[TOOL_CALLS]")
            if self.whole or self.whole is None:
                return []
            out, self.buf = [("content", self.buf)], ""
            return out
        out = []
        while True:
            i = self.buf.find(self.OPEN)
            if i < 0:                  # keep back a tail that may still become <tool_call>
                k = next((n for n in range(min(len(self.OPEN) - 1, len(self.buf)), 0, -1)
                          if self.OPEN.startswith(self.buf[-n:])), 0)
                if len(self.buf) > k:
                    out.append(("content", self.buf[:len(self.buf) - k]))
                    self.buf = self.buf[len(self.buf) - k:]
                return out
            if i:
                out.append(("content", self.buf[:i]))
                self.buf = self.buf[i:]
            j = self.buf.find(self.CLOSE)
            if self.args_at is None:
                m = _HEAD.match(self.buf, len(self.OPEN))
                if m:                                    # name known: the call opens, its arguments stream
                    out.append(("call_name", m.group(1)))
                    self.args_at, self.sent = m.end(), 0
            if j < 0:
                if self.args_at is not None:
                    self._stream_args(len(self.buf), out)
                return out
            if self.args_at is not None:
                self._stream_args(j, out, last=True)
                self.args_at, call = None, True
            else:
                call = _call(_json(self.buf[len(self.OPEN):j].strip()), self.fmt)
                out.append(("call", call) if call else ("content", self.buf[:j + len(self.CLOSE)]))
            self.buf = self.buf[j + len(self.CLOSE):].lstrip("\n") if call else self.buf[j + len(self.CLOSE):]

    def finish(self) -> list[tuple]:
        """What is still held, at the end of the answer."""
        if self.args_at is not None:                    # a streaming call the answer ended in
            out: list = []
            self._stream_args(len(self.buf), out, last=True)
            self.args_at, self.buf = None, ""
            return out
        rest, self.buf = self.buf, ""
        if not rest:
            return []
        if self.fmt == "hermes":
            if rest.startswith(self.OPEN):              # a last call without its </tool_call> (the answer ended)
                call = _call(_json(rest[len(self.OPEN):].strip()), self.fmt)
                if call:
                    return [("call", call)]
            return [("content", rest)]
        body = rest.strip()
        if body.startswith("[TOOL_CALLS]"):
            body = body[len("[TOOL_CALLS]"):].strip()
        obj = _json(body)
        objs = obj if isinstance(obj, list) else [obj]
        calls = [_call(o, self.fmt) for o in objs]
        if objs and all(calls):
            return [("call", c) for c in calls]
        return [("content", rest)]

    def close(self, events: list) -> tuple[str, list[dict]]:
        """events (and what finish() adds) -> (content, calls)."""
        content, calls = [], []
        for k, d in events + self.finish():
            if k == "content":
                content.append(d)
            elif k == "call":
                calls.append(d)
            elif k == "call_name":
                calls.append({"name": d, "arguments": ""})
            else:
                calls[-1]["arguments"] += d
        return "".join(content).strip(), calls


def openai_call(call: dict) -> dict:
    """One call in OpenAI's shape."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def check_tools(tools) -> list[dict]:
    """The request's `tools`, checked: function tools with a valid name and parameters schema."""
    from .grammar import check_schema
    if not isinstance(tools, list) or not tools:
        raise EdgemmError("tools must be a non-empty list")
    seen = set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(f, dict):
            raise EdgemmError(f"tools[{i}]: each tool is {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise EdgemmError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise EdgemmError(f"tools[{i}]: two tools are called {name!r}")
        seen.add(name)
        if "parameters" in f:
            try:
                check_schema(f["parameters"])
            except EdgemmError as e:
                raise EdgemmError(f"tools[{i}].function.parameters: {e}") from None
    return tools
