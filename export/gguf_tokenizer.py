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


# Byte-level BPE pre-tokenizers llama.cpp has built in, by the Split regex of their tokenizer.json (llama.cpp keeps
# each as the comment above its hand-written form in src/llama-vocab.cpp), with whether llama.cpp ignores merges
# for a word that is itself a token (Llama 3's tokenizer.json says ignore_merges; llama.cpp's llama-bpe does it)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {QWEN2_SPLIT: ("qwen2", False), LLAMA3_SPLIT: ("llama-bpe", True)}


def tokenizer_fields(tok, vocab_size: int) -> dict:
    """A tokenizer.json -> llama.cpp tokenizer fields: byte-level BPE as llama.cpp's `gpt2` model (tokens, types,
    merges) with its pre-tokenizer (GPT-2's split: `gpt-2`, Qwen2's: `qwen2`, Llama 3's: `llama-bpe`), a
    SentencePiece-style BPE (byte fallback, "▁" for spaces: LLaMA, Mistral, Gemma) as its `llama` model (tokens,
    scores, types). Others are refused."""
    import gguf
    data = json.loads(tok.tok.to_str())
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise EdgemmError(f"the tokenizer is a {kind} model; the gguf export writes BPE tokenizers only (byte-level "
                          "BPE as llama.cpp's gpt2 tokenizer, SentencePiece-style BPE as its llama tokenizer); "
                          "other tokenizers: export to onnx or trt")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values(), default=0) >= vocab_size:
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
    return {"model": "gpt2", "pre": _bpe_pre(data), "tokens": tokens, "types": types, "merges": merges}


def _bpe_pre(data: dict) -> str:
    """A byte-level BPE's pre-tokenizer -> llama.cpp's name for it: ByteLevel with its own (GPT-2) split, or a
    Split on a regex llama.cpp has built in followed by a ByteLevel that does not split again."""
    pre, norm = data.get("pre_tokenizer") or {}, data.get("normalizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def byte_level(p, regex):       # ByteLevel with (regex) or without its own GPT-2 split, no prefix space
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex \
            and not p.get("add_prefix_space")

    name, ignore = None, False
    if len(steps) == 1 and byte_level(steps[0], True):
        name = "gpt-2"
    elif len(steps) == 2 and byte_level(steps[1], False) and steps[0].get("type") == "Split" \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        name, ignore = BPE_PRE.get((steps[0].get("pattern") or {}).get("Regex"), (None, False))
    # NFC (Qwen2's normalizer) changes only text that is not NFC already; llama.cpp does not normalize
    if name is None or norm.get("type") not in (None, "NFC"):
        raise EdgemmError(f"the tokenizer's normalizer {norm or None} and pre-tokenizer {pre} have no llama.cpp "
                          "equivalent; edgemm exports byte-level BPE with GPT-2's split (ByteLevel, no prefix space), "
                          "Qwen2's or Llama 3's (a Split regex, then ByteLevel without its own regex)")
    has = bool((data.get("model") or {}).get("ignore_merges"))
    if has != ignore:
        raise EdgemmError(f"the tokenizer's ignore_merges is {has}, but llama.cpp's {name} pre-tokenizer "
                          f"{'always' if ignore else 'never'} ignores merges")
    return name


def _spm_fields(data: dict, tokens: list, types: list, merges: list, vocab_size: int) -> dict:
    """A SentencePiece-style tokenizer.json (BPE with byte fallback, spaces as "▁": LLaMA's and Mistral's with "▁"
    prepended by the normalizer or a non-splitting Metaspace pre-tokenizer, Gemma's with none) -> llama.cpp's
    `llama` (SentencePiece) fields, add_space_prefix saying whether "▁" is prepended. llama.cpp merges the adjacent
    pair whose token scores highest; a token's score is minus the rank of the merge that makes it, so the merge order
    is the tokenizer's. Byte tokens <0xXX> get type BYTE, the unknown token UNKNOWN."""
    import re
    import gguf
    norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    space = lambda st: (st.get("type") == "Replace" and st.get("content") == "▁"          # noqa: E731
                        and (st.get("pattern") or {}).get("String") == " ")
    # Gemma's pre-tokenizer splits on " " after the normalizer replaced every space: a no-op
    no_pre = not pre or (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("String") == " ")
    llama_norm = [st.get("type") for st in steps] == ["Prepend", "Replace"] and steps[0].get("prepend") == "▁" \
        and space(steps[1]) and not pre
    gemma_norm = len(steps) == 1 and space(steps[0]) and no_pre
    # Metaspace "first" (transformers' legacy=False) prepends "▁" only at the text's start; llama.cpp's
    # add_space_prefix also after each special token: a prompt holding control tokens ([INST] ...) tokenizes with
    # an extra "▁" after them in stock llama.cpp (edgemm's llamacpp backend tokenizes with tokenizer.json: exact)
    metaspace = not steps and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" \
        and pre.get("prepend_scheme", "always") in ("always", "first") and not pre.get("split", False)
    if not (llama_norm or metaspace or gemma_norm) or data["model"].get("ignore_merges"):
        raise EdgemmError("the tokenizer is a byte-fallback BPE but not LLaMA's SentencePiece form (normalizer "
                          "Prepend('▁') + Replace(' ', '▁'), or a non-splitting Metaspace pre-tokenizer) nor "
                          "Gemma's (Replace(' ', '▁') alone); llama.cpp's llama tokenizer cannot reproduce it")
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
            "unk_id": index.get(unk), "add_space_prefix": not gemma_norm}


def add_tokenizer(w, tok, tf: dict, chat_template: str | None = None) -> None:
    """Write the tokenizer fields `tf` (tokenizer_fields), tok's special tokens and the chat template (None:
    edgemm's format, GGUF_CHAT_TEMPLATE) into the GGUFWriter `w`. bos is written even where prompts start without it
    (Qwen: add_bos_token false, bos = eos as Qwen's own GGUFs have it; llama.cpp would otherwise assume id 11 or 1);
    eot is the chat template's end of turn where it is not eos (Gemma's <end_of_turn>); llama.cpp also ends
    generation on the tokens it knows by name (<|im_end|>, <|eot_id|>, <|endoftext|>, ...); pad only where the
    tokenizer has one."""
    w.add_tokenizer_model(tf["model"])
    w.add_token_list(tf["tokens"])
    w.add_token_types(tf["types"])
    if tf["model"] == "gpt2":
        w.add_tokenizer_pre(tf["pre"])
        w.add_token_merges(tf["merges"])
    else:                             # llama (SentencePiece): scores order the merges; "▁" before the text or not
        w.add_tokenizer_pre("default")
        w.add_token_scores(tf["scores"])
        w.add_add_space_prefix(tf["add_space_prefix"])
        if tf["unk_id"] is not None:
            w.add_unk_token_id(tf["unk_id"])
    w.add_bos_token_id(tok.bos_id if tok.bos_id is not None else tok.eos_id)
    w.add_eos_token_id(tok.eos_id)
    if chat_template:
        from edgemm.importers.tokenizer import template_stop_id
        eot = template_stop_id(tok.tok, chat_template, tok.bos_token, tok.eos_token)
        if eot is not None and eot != tok.eos_id and tok.is_eos(eot):
            w.add_eot_token_id(eot)
    if tok.has_pad:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(tok.add_bos)  # bos first where the tokenizer prepends it (edgemm's format: not in the template)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template or GGUF_CHAT_TEMPLATE)
