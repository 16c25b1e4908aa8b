"""Chat messages -> prompt segments (text ids and image slots), through the model's own chat template.

edgemm's own models keep their training format exactly (edgemm.tokenizer: `<s>`, the image, then
"Q: ...\\nA:" turns, built piece by piece as in training). Any other template (an imported model's, from its
tokenizer config) is rendered by edgemm.chat_template (in a Jinja sandbox), split at the image placeholder.
"""
from __future__ import annotations

from ..chat_template import ROLES, normalize_messages, render_template, segments_template  # noqa: F401 (re-exported)
from ..errors import EdgemmError
from ..tokenizer import CHAT_TEMPLATE


def segments_edgemm(tok, msgs: list[dict], max_images: int = 1) -> list[tuple]:
    """edgemm's own format: [("text", ids) | ("image", index)] exactly as ChatSession builds the prompt: `<s>`,
    the image (edgemm's models see one image per conversation, before the first question), then the turns.
    System messages are not part of this format and are refused."""
    n_img = sum(len(m["images"]) for m in msgs)
    if n_img > max_images:
        raise EdgemmError(f"this model takes at most {max_images} image(s) per conversation; the request has {n_img}")
    if any(m["role"] == "system" for m in msgs):
        raise EdgemmError("this model's chat format has no system messages (it was trained on Q:/A: turns)")
    if any(m["role"] == "tool" or m.get("tool_calls") for m in msgs):
        raise EdgemmError("this model's chat format has no tool calls (it was trained on Q:/A: turns)")
    segs: list[tuple] = [("text", tok.prefix_ids())] if tok.add_bos else []
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


def build_segments(tok, template: str | None, messages, max_images: int = 1,
                   tools: list | None = None, video_text: list[str] | None = None) -> tuple[list[tuple], list[str]]:
    """-> (segments, image urls in order); `tools` (OpenAI function tools) rendered by the template; video_text:
    each video's text where its frames go as images (chat_template.segments_template)."""
    msgs = normalize_messages(messages)
    urls = [u for m in msgs for u in m["images"]]
    if template is None or template.strip() == CHAT_TEMPLATE.strip():
        return segments_edgemm(tok, msgs, max_images), urls
    if len(urls) > max_images:
        raise EdgemmError(f"at most {max_images} image(s) per request; the request has {len(urls)}")
    return segments_template(tok, template, msgs, tools=tools, video_text=video_text), urls
