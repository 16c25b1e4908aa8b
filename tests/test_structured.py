"""Structured output and tool calls (`response_format`, `tools`, `tool_choice`) against a live `edgemm serve`, with the
official openai client, on the torch, ort and llamacpp backends at once (one server, one model per backend).

The models are the shipped tiny-shapes weights behind a Hermes/Qwen-style chat template: at temperature 1.0 their
answers to these prompts are noise, so only the grammar's mask makes them valid JSON or a valid tool call."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil

import pytest

from tests.conftest import requires_demo
from tests.test_serve import HAVE_LLAMA, Server

pytestmark = [pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("fastapi", "openai", "llguidance",
                                                                                  "jsonschema", "onnxruntime")),
                                 reason="needs the serve and test extras (fastapi, openai, llguidance, jsonschema)"),
              requires_demo]

# The shape of Qwen2.5's template (tools in the system turn, calls in <tool_call> blocks, results as
# <tool_response>), kept short: the shipped tokenizer spends about a token per character on JSON.
HERMES = """\
{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}{%- for c in content -%}
{%- if c.type == 'image' -%}<image>{%- elif c.type == 'text' -%}{{ c.text }}{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools -%}<|im_start|>system
<tools>{% for tool in tools %}{{ tool.function | tojson }}{% endfor %}</tools> Call one in <tool_call></tool_call><|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'tool' -%}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.role == 'assistant' -%}<|im_start|>assistant
{{ render(message.content) }}{%- for tc in message.tool_calls or [] %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% else -%}<|im_start|>{{ message.role }}
{{ render(message.content) }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}
"""

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "where": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                  "label": {"type": "string", "maxLength": 8}},
                  "required": ["x", "label"], "additionalProperties": False},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["shape", "where", "colors"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
SEEDS = 7            # per backend (the issue asks 20: 3 backends x 7 = 21 answers, each checked)
BACKENDS = ["torch", "ort", "llamacpp"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{backend: model id}: the shipped weights with the Hermes template (context raised to 2048: RoPE positions,
    so the tools' prompt fits) as a checkpoint (torch), an fp32 ONNX bundle (ort, the tool-call tests) and a GGUF
    bundle (llamacpp); the shipped model itself in its own Q:/A: format as `auto` serves it, its cached fp32 ONNX
    bundle (ort, the others)."""
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.export.gguf import export_gguf
    from edgemm.export.onnx import export_onnx
    root = tmp_path_factory.mktemp("structured")
    ckpt = root / "hermes"
    shutil.copytree(DEMO_DIR, ckpt)
    (ckpt / "chat_template.jinja").write_text(HERMES)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["decoder"]["max_seq_len"] = 2048
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out, bundles = {"torch": "hermes", "ort": "tiny-shapes"}, []
    export_onnx(model=str(ckpt), out=root / "hermes-onnx", precision="fp32", threads=1, log=None, seed=1)
    bundles.append(str(root / "hermes-onnx"))
    if HAVE_LLAMA:
        export_gguf(model=str(ckpt), out=root / "hermes-gguf", precision={"vision": "f32", "decoder": "f32"}, log=None)
        bundles.append(str(root / "hermes-gguf"))
        out["llamacpp"] = "hermes-gguf"
    return out, [str(ckpt), "tiny-shapes"], bundles


@pytest.fixture(scope="module")
def server(models):
    """One server for all: checkpoints (torch) and bundles (ort, llamacpp) together, which the CLI does not take
    (one thread: on a busy 2-core machine torch's two threads wait on each other, ~7x slower here)."""
    s = Server(code=("from edgemm.serve import serve; from edgemm.serve.api import Limits; "
                     f"serve(models={models[1]!r}, bundles={models[2]!r}, threads=1, port={{port}}, parallel=2, "
                     "limits=Limits(max_tokens=200))"))
    try:
        for backend, m in [*models[0].items(), ("ort", "hermes-onnx")]:     # each on the backend its tests name
            assert f"serving {m}: {backend}" in s.log(), s.log()
        yield s
    finally:
        print(s.log()[-3000:])
        s.stop()


def _tools_model(models, backend):
    return "hermes-onnx" if backend == "ort" else _model(models, backend)     # (the Hermes template: tools)


def _model(models, backend):
    if backend not in models[0]:
        pytest.skip(f"{backend}: not installed here")
    return models[0][backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_schema_answers_validate_at_temperature_1(server, models, backend):
    """Every answer, sampled at temperature 1.0 over several seeds, is JSON that validates against the schema
    (nested object, enum, array, bounds), ends with finish_reason "stop", streamed or not; two at a time, so the
    server's two slots decode together (one batched step, each slot its own mask)."""
    from concurrent.futures import ThreadPoolExecutor

    import jsonschema
    model, c = _model(models, backend), server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}

    def answer(seed):
        kw = dict(model=model, messages=[{"role": "user", "content": "Describe a shape as JSON."}],
                  temperature=1.0, seed=seed, max_tokens=120, response_format=rf)
        if seed % 4 == 3:                   # some streamed: the same grammar, the text in deltas
            chunks = list(c.chat.completions.create(stream=True, **kw))
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        else:
            r = c.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        return text, finish
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(answer, range(SEEDS)))
    for text, finish in got:
        jsonschema.validate(json.loads(text), SCHEMA)
        assert finish == ["stop"], (finish, text)
    assert len({t for t, _ in got}) > SEEDS // 2, got          # sampled, not one forced answer


def test_json_object_is_masked_to_a_json_object(server, models):
    """json_object, on edgemm's own chat format and on a template: the answer opens a JSON object and stays one
    (these models never learnt to close a string, so at temperature 1.0 it usually runs to max_tokens inside
    its first key; the next test completes objects); the same request without response_format is not JSON."""
    c = server.client()
    for model in (models[0]["ort"], models[0]["torch"]):      # edgemm's own format, a template
        kw = dict(model=model, messages=[{"role": "user", "content": "What color is the circle?"}], temperature=1.0,
                  seed=1, max_tokens=24)
        r = c.chat.completions.create(response_format={"type": "json_object"}, **kw).choices[0]
        text = r.message.content
        if r.finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert r.finish_reason == "length" and re.match(r'\{\s*"', text), r
        free = c.chat.completions.create(**kw).choices[0].message.content
        with pytest.raises(ValueError):
            json.loads(free)


def test_json_object_completes_when_the_model_closes_it():
    """AnswerStream under json_object with logits that favour closing (a model that has learnt JSON): a whole
    object, finish_reason stop as soon as it closes (no end-of-sequence token needed)."""
    import numpy as np
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.generation import AnswerStream, GenerationConfig
    from edgemm.grammar import json_grammar
    from edgemm.tokenizer import Tokenizer
    tok = Tokenizer.load(DEMO_DIR / "tokenizer.json")
    bias = np.array([3.0 if any(ch in tok.decode([i]) for ch in '"}:0') else 0.0 for i in range(512)], np.float32)
    g = json_grammar(tok)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        ans = AnswerStream(tok, GenerationConfig(max_new_tokens=200, temperature=1.0, seed=seed, grammar=g))
        while not ans.push(rng.normal(size=512).astype(np.float32) + bias)[1]:
            pass
        assert ans.finish_reason == "stop" and isinstance(json.loads(ans.text), dict), ans.text


def _check_call(call, tools=(WEATHER, TIME)):
    import jsonschema
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schema, call.function.name
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tool_choice_required_returns_tool_calls(server, models, backend):
    """tool_choice required: a parsable tool_calls entry and finish_reason tool_calls, not streamed and streamed
    (deltas as OpenAI sends them: id, type and name first, then the arguments in pieces as they are generated);
    a named function is the one called."""
    model, c = _tools_model(models, backend), server.client()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    for seed in range(3):
        r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                      temperature=1.0, seed=seed, max_tokens=150, parallel_tool_calls=False)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
        _check_call(ch.message.tool_calls[0])
    r = c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], temperature=1.0, seed=5,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=150)
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_time"]
    chunks = list(c.chat.completions.create(model=model, messages=msgs, tools=[WEATHER, TIME], stream=True,
                                            tool_choice="required", temperature=1.0, seed=7, max_tokens=150))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id.startswith("call_") and deltas[0].function.name in ("get_weather", "get_time")
    args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert len([d for d in deltas if d.index == 0 and d.function.arguments]) > 1     # arguments arrive in pieces
    _check_call(type(deltas[0])(index=0, id=deltas[0].id, type="function",
                                function={"name": deltas[0].function.name, "arguments": args}))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()


def test_tool_result_renders_through_the_template(server, models):
    """A conversation with the assistant's call and the tool's result sent back renders through the model's
    template (the call and the result are in the prompt it runs) and is answered."""
    from edgemm.chat_template import normalize_messages, render_template
    msgs = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    text = render_template(HERMES, normalize_messages(msgs), "<s>", "</s>", [WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in text
    assert "<tool_response>21 C and sunny</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    c = server.client()
    r = c.chat.completions.create(model=models[0]["torch"], messages=msgs, tools=[WEATHER], temperature=0,
                                  max_tokens=8)
    with_result = r.usage.prompt_tokens
    r2 = c.chat.completions.create(model=models[0]["torch"], messages=msgs[:1], tools=[WEATHER], temperature=0,
                                   max_tokens=8)
    assert with_result > r2.usage.prompt_tokens + 40            # the call and the result are in the prompt
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                                        "pattern": "(("}}}}, "pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}},
     "cannot be enforced: Pointer '/nope' does not exist"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}, "tools[0]"),
    ({"tool_choice": "required"}, "needs tools"),
]


@pytest.mark.parametrize("extra,reason", BAD)
def test_invalid_schemas_and_tools_are_400_with_the_reason(server, models, extra, reason):
    import openai
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=models[0]["torch"], messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=4, **extra)
    err = e.value.body
    assert e.value.status_code == 400 and reason in err["message"] and err["type"] == "invalid_request_error", err


def test_tools_on_a_template_without_them_are_refused(server, models):
    import openai
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="takes no tools"):
        c.chat.completions.create(model=models[0]["ort"], messages=[{"role": "user", "content": "hi"}],
                                  tools=[WEATHER], max_tokens=4)
    r = c.chat.completions.create(model=models[0]["ort"], messages=[{"role": "user", "content": "hi"}],
                                  tools=[WEATHER], tool_choice="none", max_tokens=4)
    assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("fmt,text,content,calls", [
    ("hermes", 'Sure. <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
               '{"name": "g", "arguments": {}}\n</tool_call>', "Sure.", [("f", {"a": 1}), ("g", {})]),
    ("hermes", "no call here <tool_ca", "no call here <tool_ca", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', "", [("f", {"a": 1})]),
    ("llama3", '{"name": "f", "parameters": {"a": "x"}}', "", [("f", {"a": "x"})]),
    ("llama3", "It is sunny.", "It is sunny.", []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": 2}}, {"name": "g", "arguments": {}}]', "",
     [("f", {"a": 2}), ("g", {})]),
    ("mistral", "[1, 2]", "[1, 2]", []),
])
def test_parse_calls_in_each_form_whole_and_streamed(fmt, text, content, calls):
    from edgemm.tools import ToolStream, parse_calls
    got = parse_calls(fmt, text)
    assert got[0] == content and [(c["name"], json.loads(c["arguments"])) for c in got[1]] == calls
    ts = ToolStream(fmt)                    # the same text arriving in 3-character pieces
    evs = [e for i in range(0, len(text), 3) for e in ts.feed(text[i:i + 3])]
    streamed = ts.close(evs)
    assert streamed[0] == content and [(c["name"], json.loads(c["arguments"])) for c in streamed[1]] == calls
    if fmt == "hermes" and len(calls) == 2:  # each call streams as it comes: its name, its arguments in pieces
        kinds = [k for k, _ in evs if k != "content"]
        assert kinds.count("call_name") == 2 and kinds.count("call_args") > 2, kinds
        assert kinds.index("call_args") < kinds.index("call_name", 1)


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_call_grammar_forces_a_valid_call_in_each_form(fmt):
    """Sampling noise under call_grammar (tool_choice required) gives, in each form, calls that parse and whose
    arguments validate; Mistral's call opens with its [TOOL_CALLS] token where the vocabulary has one."""
    import jsonschema
    import numpy as np
    from tokenizers import AddedToken
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.generation import AnswerStream, GenerationConfig
    from edgemm.tokenizer import Tokenizer
    from edgemm.tools import call_grammar, parse_calls
    tok = Tokenizer.load(DEMO_DIR / "tokenizer.json")
    tok.tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    v = tok.vocab_size
    g = call_grammar(tok, [WEATHER, TIME], fmt, parallel=False)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(4):
        rng = np.random.default_rng(seed)
        ans = AnswerStream(tok, GenerationConfig(max_new_tokens=300, temperature=1.0, seed=seed, grammar=g))
        while not ans.push(rng.normal(size=v).astype(np.float32))[1]:
            pass
        assert ans.finish_reason == "stop", tok.decode(ans.ids)
        assert (ans.ids[0] == tok.tok.token_to_id("[TOOL_CALLS]")) == (fmt == "mistral")
        content, calls = parse_calls(fmt, ans.text)
        assert content == "" and len(calls) == 1, ans.text
        jsonschema.validate(json.loads(calls[0]["arguments"]), params[calls[0]["name"]])


@pytest.mark.parametrize("fmt,lead", [("hermes", "Let me look. <tool_call>"), ("hermes", "Ok <tool_call>\n{\"na"),
                                      ("mistral", None)])
def test_auto_switches_the_call_grammar_on_when_a_call_opens(fmt, lead):
    """tool_choice auto: the answer is free (here: logits that spell `lead`) until the model opens a call; from
    there sampling noise is masked to a valid call, whether the opening ended a token or sat inside one (the text
    after it fed to the grammar), or is Mistral's special [TOOL_CALLS] token (not in the decoded text). Without
    the trigger the same noise gives no call."""
    import jsonschema
    import numpy as np
    from tokenizers import AddedToken
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.generation import AnswerStream, GenerationConfig
    from edgemm.tokenizer import Tokenizer
    from edgemm.tools import call_trigger, parse_calls
    tok = Tokenizer.load(DEMO_DIR / "tokenizer.json")
    tok.tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    v = tok.vocab_size
    trig = call_trigger(tok, [WEATHER, TIME], fmt, parallel=False)
    lead_ids = tok.encode(lead) if lead else [tok.tok.token_to_id("[TOOL_CALLS]")]
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for seed in range(3):
        for trigger in (trig, None):
            rng = np.random.default_rng(seed)
            ans = AnswerStream(tok, GenerationConfig(max_new_tokens=300, temperature=1.0, seed=seed, trigger=trigger))
            done, n = False, 0
            while not done:
                x = rng.normal(size=v).astype(np.float32)
                if n < len(lead_ids):
                    x[lead_ids[n]] = 1e4                  # the model writes the lead
                done, n = ans.push(x)[1], n + 1
            content, calls = parse_calls(fmt, ans.text)
            if trigger is None:
                assert not calls
                continue
            assert ans.finish_reason == "stop" and len(calls) == 1, ans.text
            assert content.strip() == ((lead or "").split("<tool_call>")[0]).strip()
            jsonschema.validate(json.loads(calls[0]["arguments"]), params[calls[0]["name"]])
