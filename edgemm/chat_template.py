"""Chat templates: find the one stored with a model or bundle, and render conversations through it.

The core piece of prompting an imported model (edgemm.generation's ChatSession and the server's
edgemm.serve.prompt both use it; it imports nothing from the server). A template is rendered in Jinja's
ImmutableSandboxedEnvironment: a template that reaches for Python internals is an error and nothing of it runs.
The rendered text is split at the image placeholder into text and image segments; the text pieces are tokenized
with the model's tokenizer (special tokens parsed).
"""
from __future__ import annotations

from pathlib import Path

from .errors import EdgemmError
from .tokenizer import IMAGE

VIDEO = "<video>"           # where a chat template puts a video (LLaVA-NeXT-Video's, LLaVA-OneVision's)
FRAME = "\ue000frame\ue000"  # where a frame goes in a video's text (edgemm.video.video_text: frames as images)

ROLES = ("system", "user", "assistant", "tool")


def chat_template_of(backend) -> str | None:
    """The chat template stored with the model or bundle (None: edgemm's own format)."""
    from .checkpoint import resolve_model
    if not getattr(backend, "source", None):
        return None
    src = Path(str(backend.source))
    if (src / "edgemm.json").is_file():
        from .bundle import bundle_path, read_manifest
        rel = read_manifest(src).get("chat_template")
        p = bundle_path(src, rel) if rel else None
    else:
        try:
            kind, path = resolve_model(str(backend.source))
        except EdgemmError:
            return None
        p = path / "chat_template.jinja" if kind == "dir" else None
    return p.read_text() if p is not None and p.is_file() else None


def _content_parts(i: int, c) -> tuple[list[str], list[str], list[str]]:
    """One message's content -> (texts, image urls, video urls)."""
    texts, images, videos = [], [], []
    if isinstance(c, str):
        texts.append(c)
    elif isinstance(c, list):
        for j, part in enumerate(c):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                u = part.get("image_url")
                url = u.get("url") if isinstance(u, dict) else u
                if not isinstance(url, str):
                    raise EdgemmError(f"messages[{i}].content[{j}]: image_url needs a url")
                images.append(url)
            elif kind == "video_url":          # vLLM's OpenAI-compatible servers' video part
                u = part.get("video_url")
                url = u.get("url") if isinstance(u, dict) else u
                if not isinstance(url, str):
                    raise EdgemmError(f"messages[{i}].content[{j}]: video_url needs a url")
                videos.append(url)
            else:
                raise EdgemmError(f"messages[{i}].content[{j}]: parts are text, image_url or video_url")
    elif c is not None:
        raise EdgemmError(f"messages[{i}]: content must be a string or a list of parts")
    return texts, images, videos


def _tool_calls(i: int, calls) -> list[dict]:
    """An assistant message's tool_calls as HF templates read them (arguments as an object, not JSON text)."""
    import json
    if not isinstance(calls, list):
        raise EdgemmError(f"messages[{i}].tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise EdgemmError(f"messages[{i}].tool_calls[{j}]: a call needs function.name")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise EdgemmError(f"messages[{i}].tool_calls[{j}].function.arguments is not JSON") from None
        out.append({"id": c.get("id"), "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def normalize_messages(messages) -> list[dict]:
    """OpenAI messages -> [{"role", "text", "images": [image_url strings]}] (+ "tool_calls" of an assistant
    message that made calls, "tool_call_id" of a tool result); a clear error for a bad one."""
    if not isinstance(messages, list) or not messages:
        raise EdgemmError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise EdgemmError(f"messages[{i}]: each message needs a role of {', '.join(ROLES)}")
        texts, images, videos = _content_parts(i, m.get("content"))
        if m["role"] != "user" and (images or videos):
            raise EdgemmError(f"messages[{i}]: only user messages carry images and videos")
        out.append({"role": m["role"], "text": " ".join(t.strip() for t in texts if t.strip()), "images": images,
                    "videos": videos})
        if m["role"] == "assistant" and m.get("tool_calls"):
            out[-1]["tool_calls"] = _tool_calls(i, m["tool_calls"])
        if m["role"] == "tool":
            out[-1]["tool_call_id"] = m.get("tool_call_id")
    if out[-1]["role"] not in ("user", "tool"):
        raise EdgemmError("the last message must be the user's (or a tool's result)")
    return out


def _generation_tag():
    """transformers' {% generation %}...{% endgeneration %} (it marks the assistant's text for training masks;
    LLaVA-OneVision's template has it): the body rendered as it is."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return Generation


def render_template(template: str, msgs: list[dict], bos: str, eos: str, tools: list | None = None) -> str:
    """The template in a sandbox, HF conventions: messages with content parts (a tool result's content a
    string), assistant tool_calls, `tools` (OpenAI function tools) where the request has them,
    add_generation_prompt."""
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag()])

    def raise_exception(msg):
        raise TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    hf_msgs = []
    for m in msgs:
        parts = [{"type": "image"} for _ in m["images"]] + [{"type": "video"} for _ in m.get("videos", ())] \
            + ([{"type": "text", "text": m["text"]}] if m["text"] else [])
        hf_msgs.append({"role": m["role"], "content": m["text"] if m["role"] == "tool" else parts})
        for k in ("tool_calls", "tool_call_id"):
            if k in m:
                hf_msgs[-1][k] = m[k]
    try:
        return env.from_string(template).render(messages=hf_msgs, add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos, tools=tools)
    except SecurityError as e:
        raise EdgemmError(f"the chat template tried something the sandbox forbids ({e}); refusing it") from None
    except TemplateError as e:
        raise EdgemmError(f"the chat template failed: {e}") from None


def segments_template(tok, template: str, msgs: list[dict], image_token: str = IMAGE,
                      tools: list | None = None, video_text: list[str] | None = None) -> list[tuple]:
    """Any other chat template: rendered (with the request's `tools`), split at `image_token` and VIDEO, the text
    pieces tokenized. -> [("text", ids) | ("image", i)]: i indexes the images, then the videos (n_images + j).
    video_text (frames as images): the text each video's placeholder becomes, FRAME where each frame goes; i then
    indexes the images, then the frames of all videos in order."""
    import re
    text = render_template(template, msgs, tok.bos_token, tok.eos_token, tools)
    n_img, n_vid = sum(len(m["images"]) for m in msgs), sum(len(m.get("videos", ())) for m in msgs)
    marks = re.findall(f"({re.escape(image_token)}|{re.escape(VIDEO)})", text)
    for what, mark, n in (("image", image_token, n_img), ("video", VIDEO, n_vid)):
        if marks.count(mark) != n:
            raise EdgemmError(f"the chat template rendered {marks.count(mark)} {what} placeholder(s) for {n} "
                              f"{what}(s)")
    if FRAME in text:
        raise EdgemmError("the conversation holds edgemm's reserved frame marker; refusing it")
    if video_text is not None:
        it = iter(video_text)
        text = re.sub(re.escape(VIDEO), lambda _: next(it), text)
    pieces = re.split(f"({re.escape(image_token)}|{re.escape(VIDEO)}|{FRAME})", text)
    segs: list[tuple] = []
    seen = {image_token: 0, VIDEO: n_img, FRAME: n_img}
    for i, p in enumerate(pieces):
        if i % 2:
            segs.append(("image", seen[p]))
            seen[p] += 1
        elif p:
            segs.append(("text", tok.tok.encode(p, add_special_tokens=False).ids))
    pre = tok.prefix_ids()          # the bos the tokenizer prepends (transformers processors tokenize with it)
    if pre and not (segs and segs[0][0] == "text" and segs[0][1][:len(pre)] == pre):
        segs[:1] = [("text", pre + segs[0][1])] if segs and segs[0][0] == "text" else [("text", pre)] + segs[:1]
    return segs
