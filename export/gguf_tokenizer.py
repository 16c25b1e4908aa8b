"""The tokenizer inside a GGUF decoder file: a tokenizer.json converted to llama.cpp's tokenizer fields (its
`gpt2` byte-level BPE or its `llama` SentencePiece BPE), the special-token ids, and the chat template
(tokenizer.chat_template). Key names follow gguf-py's constants (Keys.Tokenizer)."""
from __future__ import annotations

import json

from edgemm.errors import EdgemmError

# The prompt format of edgemm.tokenizer, extended for OpenAI-style content lists (llama-cpp-python's multimodal
# chat handlers turn an image part into a text part holding the media marker): all parts but the last are
# emitted as they are (the image marker), the last text part is the question. No {{ bos_token }}: the file
# says add_bos_token, so llama.cpp's tokenizer puts <s> first (llama-cpp-python's handlers render bos_token as
# an empty string, which lost the <s> the model was trained with).
GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"   # an expression: trim_blocks would eat a literal newline
    "{% if m['content'] is string %}{% if m.get('image') %}<image>{% endif %}Q: {{ m['content'] }}\nA:"
    "{% else %}{% for p in m['content'] %}{% if not loop.last %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endif %}{% endfor %}"
    "Q: {{ m['content'][-1]['text'] }}\nA:{% endif %}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """A tokenizer.json -> llama.cpp tokenizer fields: byte-level BPE (edgemm's own, GPT-2 split) as llama.cpp's
    `gpt2` model (tokens, types, merges), LLaMA's SentencePiece-style BPE (byte fallback, "▁" for spaces) as its
    `llama` model (tokens, scores, types). Others are refused."""
    import gguf
    data = json.loads(tok.tok.to_str())
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise EdgemmError(f"the tokenizer is a {kind} model; the gguf export writes BPE tokenizers only (byte-level "
                          "BPE as llama.cpp's gpt2 tokenizer, LLaMA's SentencePiece BPE as its llama tokenizer); "
                          "other tokenizers: export to onnx or trt")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise EdgemmError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocab {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.NORMAL
    for i, added in tok.tok.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        return _spm_fields(data, tokens, types, merges, vocab_size)
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise EdgemmError(f"the tokenizer's pre-tokenizer {pre} has no llama.cpp equivalent; "
                          "edgemm exports byte-level BPE with the GPT-2 split (ByteLevel, no prefix space)")
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}


def _spm_fields(data: dict, tokens: list, types: list, merges: list, vocab_size: int) -> dict:
    """LLaMA's tokenizer.json (BPE with byte fallback; "▁" prepended and for spaces, by the normalizer or a
    Metaspace pre-tokenizer) -> llama.cpp's `llama` (SentencePiece) fields. llama.cpp merges the adjacent pair
    whose token scores highest; a token's score is minus the rank of the merge that makes it, so the merge order
    is the tokenizer's. Byte tokens <0xXX> get type BYTE, the unknown token UNKNOWN."""
    import re
    import gguf
    norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    llama_norm = [st.get("type") for st in steps] == ["Prepend", "Replace"] and steps[0].get("prepend") == "▁" \
        and steps[1].get("content") == "▁" and (steps[1].get("pattern") or {}).get("String") == " " and not pre
    metaspace = not steps and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" \
        and pre.get("prepend_scheme", "always") in ("always", "first") and not pre.get("split", False)
    if not (llama_norm or metaspace) or data["model"].get("ignore_merges"):
        raise EdgemmError("the tokenizer is a byte-fallback BPE but not LLaMA's SentencePiece form (normalizer "
                          "Prepend('▁') + Replace(' ', '▁'), or a non-splitting Metaspace pre-tokenizer); llama.cpp's "
                          "llama tokenizer cannot reproduce it")
    index = {t: i for i, t in enumerate(tokens)}
    scores = [-1e9] * vocab_size                     # made by no merge: single symbols, added tokens, padding
    for rank, m in enumerate(merges):
        i = index.get(m.replace(" ", "", 1))
        if i is not None and scores[i] == -1e9:
            scores[i] = -float(rank)
    for i, t in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i] = gguf.TokenType.BYTE
    unk = data["model"].get("unk_token")
    if unk in index:
        types[index[unk]] = gguf.TokenType.UNKNOWN
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "unk_id": index.get(unk)}


def add_tokenizer(w, tok, tf: dict, chat_template: str | None = None) -> None:
    """Write the tokenizer fields `tf` (tokenizer_fields), tok's special tokens and the chat template (None:
    edgemm's format, GGUF_CHAT_TEMPLATE) into the GGUFWriter `w`."""
    w.add_tokenizer_model(tf["model"])
    w.add_token_list(tf["tokens"])
    w.add_token_types(tf["types"])
    if tf["model"] == "gpt2":
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(tf["merges"])
    else:                             # llama (SentencePiece): scores order the merges; "▁" before the text
        w.add_tokenizer_pre("default")
        w.add_token_scores(tf["scores"])
        w.add_add_space_prefix(True)
        if tf["unk_id"] is not None:
            w.add_unk_token_id(tf["unk_id"])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)         # <s> first, as every edgemm prompt starts (the chat template has none)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template or GGUF_CHAT_TEMPLATE)
