"""Chat messages -> prompt segments (text ids and image slots), through the model's own chat template.

edgemm's own models keep their training format exactly (edgemm.tokenizer: `<s>`, the image, then
"Q: ...\\nA:" turns, built piece by piece as in training). Any other template (an imported model's, from its
tokenizer config) is rendered in Jinja's ImmutableSandboxedEnvironment: a template that reaches for Python
internals is an error and nothing of it runs. The rendered text is split at the image placeholder into text and
image segments; the text pieces are tokenized with the model's tokenizer (special tokens parsed).
"""
from __future__ import annotations

from ..errors import EdgemmError
from ..tokenizer import CHAT_TEMPLATE, IMAGE

ROLES = ("system", "user", "assistant")


def normalize_messages(messages) -> list[dict]:
    """OpenAI messages -> [{"role", "text", "images": [image_url strings]}]; a clear error for a bad one."""
    if not isinstance(messages, list) or not messages:
        raise EdgemmError("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise EdgemmError(f"messages[{i}]: each message needs a role of {', '.join(ROLES)}")
        c = m.get("content")
        texts, images = [], []
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
                else:
                    raise EdgemmError(f"messages[{i}].content[{j}]: parts are text or image_url")
        elif c is not None:
            raise EdgemmError(f"messages[{i}]: content must be a string or a list of parts")
        if m["role"] != "user" and images:
            raise EdgemmError(f"messages[{i}]: only user messages carry images")
        out.append({"role": m["role"], "text": " ".join(t.strip() for t in texts if t.strip()), "images": images})
    if out[-1]["role"] != "user":
        raise EdgemmError("the last message must be the user's")
    return out


def segments_edgemm(tok, msgs: list[dict], max_images: int = 1) -> list[tuple]:
    """edgemm's own format: [("text", ids) | ("image", index)] exactly as ChatSession builds the prompt: `<s>`,
    the image (edgemm's models see one image per conversation, before the first question), then the turns.
    System messages are not part of this format and are refused."""
    n_img = sum(len(m["images"]) for m in msgs)
    if n_img > max_images:
        raise EdgemmError(f"this model takes at most {max_images} image(s) per conversation; the request has {n_img}")
    if any(m["role"] == "system" for m in msgs):
        raise EdgemmError("this model's chat format has no system messages (it was trained on Q:/A: turns)")
    segs: list[tuple] = [("text", [tok.bos_id])]
    if n_img:
        segs.append(("image", 0))
    ids: list[int] = []
    first = True
    for m in msgs:
        if m["role"] == "user":
            if not m["text"]:
                raise EdgemmError("a user message has no text: ask a question about the image")
            ids += tok.user_turn(m["text"], first=first)
            first = False
        else:
            ids += tok.answer(m["text"].strip())
    segs.append(("text", ids))
    return segs


def render_template(template: str, msgs: list[dict], bos: str, eos: str) -> str:
    """The template in a sandbox, HF conventions: messages with content parts, add_generation_prompt."""
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise TemplateError(msg)
    env.globals["raise_exception"] = raise_exception
    hf_msgs = []
    for m in msgs:
        parts = [{"type": "image"} for _ in m["images"]] + ([{"type": "text", "text": m["text"]}] if m["text"] else [])
        hf_msgs.append({"role": m["role"], "content": parts})
    try:
        return env.from_string(template).render(messages=hf_msgs, add_generation_prompt=True, bos_token=bos,
                                                eos_token=eos)
    except SecurityError as e:
        raise EdgemmError(f"the chat template tried something the sandbox forbids ({e}); refusing it") from None
    except TemplateError as e:
        raise EdgemmError(f"the chat template failed: {e}") from None


def segments_template(tok, template: str, msgs: list[dict], image_token: str = IMAGE) -> list[tuple]:
    """Any other chat template: rendered, split at `image_token`, the text pieces tokenized."""
    text = render_template(template, msgs, tok.tok.id_to_token(tok.bos_id), tok.tok.id_to_token(tok.eos_id))
    pieces = text.split(image_token)
    n_img = sum(len(m["images"]) for m in msgs)
    if len(pieces) - 1 != n_img:
        raise EdgemmError(f"the chat template rendered {len(pieces) - 1} image placeholder(s) for {n_img} image(s)")
    segs: list[tuple] = []
    for i, p in enumerate(pieces):
        if p:
            segs.append(("text", tok.tok.encode(p, add_special_tokens=False).ids))
        if i < n_img:
            segs.append(("image", i))
    return segs


def build_segments(tok, template: str | None, messages, max_images: int = 1) -> tuple[list[tuple], list[str]]:
    """-> (segments, image urls in order)."""
    msgs = normalize_messages(messages)
    urls = [u for m in msgs for u in m["images"]]
    if template is None or template.strip() == CHAT_TEMPLATE.strip():
        return segments_edgemm(tok, msgs, max_images), urls
    if len(urls) > max_images:
        raise EdgemmError(f"at most {max_images} image(s) per request; the request has {len(urls)}")
    return segments_template(tok, template, msgs), urls
