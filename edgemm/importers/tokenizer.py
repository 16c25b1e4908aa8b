"""The tokenizer an import installs beside the weights: tokenizer.json, the chat template, and the special tokens
(returned for ModelConfig.tokens, so they travel in config.json and every bundle manifest).

The special tokens are read from the source, as transformers reads them: tokenizer_config.json's bos_token /
eos_token / pad_token (a name or an AddedToken dict) and add_bos_token, generation_config.json's eos_token_id (an id
or a list) and pad_token_id, and the chat template's own end of an assistant turn (Qwen's <|im_end|>, Llama 3's
<|eot_id|>, Gemma's <end_of_turn>). Nothing is added to the tokenizer: a token past the model's embedding rows would
have no row (the gguf export then refused the tokenizer). A token that no tokenizer_config.json names (or a source
without one) falls back to the literal <s>, </s>, <pad> (edgemm's own format)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgemmError

STOP_PROBE = "edgemm-stop-probe"


def _read_json(*cands: Path) -> dict | None:
    for f in cands:
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise EdgemmError(f"{f} is not valid JSON ({e})") from None
            return d if isinstance(d, dict) else None
    return None


def _name(v) -> str | None:
    """A tokenizer_config special token: "<s>", an AddedToken dict {"content": "<s>", ...}, or null."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _ids(v) -> list[int]:
    """generation_config's eos_token_id / pad_token_id: an id, a list of ids, or null."""
    vals = v if isinstance(v, list) else [v]
    return [int(x) for x in vals if isinstance(x, int) and not isinstance(x, bool)]


def find_template(src: Path, d: Path) -> str | None:
    for cand in (d / "chat_template.jinja", src / "chat_template.jinja"):
        if cand.is_file():
            return cand.read_text()
    for cand in (d / "chat_template.json", src / "chat_template.json"):     # a processor's (LLaVA-OneVision's)
        t = (_read_json(cand) or {}).get("chat_template")
        if isinstance(t, str):
            return t
    for cand in (d / "tokenizer_config.json", src / "tokenizer_config.json"):
        if cand.is_file():
            t = (_read_json(cand) or {}).get("chat_template")
            if isinstance(t, str):
                return t
            if isinstance(t, list):                # [{"name": "default", "template": ...}, ...]
                for e in t:
                    if isinstance(e, dict) and e.get("name") == "default" and isinstance(e.get("template"), str):
                        return e["template"]
    return None


def template_stop_id(tok, template: str, bos: str, eos: str) -> int | None:
    """The special token the chat template closes an assistant turn with (rendered on a probe conversation: the
    token right after the answer), or None (no template, a template that fails, plain text after the answer)."""
    try:
        from ..chat_template import render_template
        text = render_template(template, [{"role": "user", "text": "hi", "images": []},
                                          {"role": "assistant", "text": STOP_PROBE, "images": []},
                                          {"role": "user", "text": "hi", "images": []}], bos, eos)
    except Exception:           # jinja2 missing, or a template that needs what the probe lacks
        return None
    at = text.find(STOP_PROBE)
    if at < 0:
        return None
    ids = tok.encode(text[at + len(STOP_PROBE):], add_special_tokens=False).ids
    specials = {i for i, a in tok.get_added_tokens_decoder().items() if a.special}
    return ids[0] if ids and ids[0] in specials else None


def special_tokens(tok, tcfg: dict | None, gcfg: dict | None, template: str | None, vocab_size: int | None,
                   where: str, log) -> dict:
    """-> ModelConfig.tokens as a dict {bos, add_bos, eos: [ids], pad} (see the module docstring)."""
    from ..tokenizer import BOS, EOS, PAD
    n = vocab_size or tok.get_vocab_size(with_added_tokens=True)
    gcfg = gcfg or {}

    def tid(name):
        i = tok.token_to_id(name) if name else None
        return i if i is not None and i < n else None

    tcfg = tcfg or {}               # a token it does not name: edgemm's literal name
    bos, eos_name, pad = (tid(_name(tcfg[k]) if k in tcfg else lit)
                          for k, lit in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)))
    if isinstance(tcfg.get("add_bos_token"), bool):
        add_bos = tcfg["add_bos_token"]
    elif tok.post_processor is not None:                # what the tokenizer itself adds (Llama 3's template)
        add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
    else:
        add_bos = True                                  # edgemm's format: every prompt starts with <s>
    eos = [i for i in [eos_name] if i is not None]
    dropped = []
    for i in _ids(gcfg.get("eos_token_id")):
        if i >= n:
            dropped.append(i)
        elif i not in eos:
            eos.append(i)
    if template:
        stop = template_stop_id(tok, template, tok.id_to_token(bos) if bos is not None else "",
                                tok.id_to_token(eos[0]) if eos else "")
        if stop is not None and stop < n and stop not in eos:
            eos.append(stop)
    if dropped:
        log(f"note: generation_config.json's eos_token_id {dropped} are past the model's {n} rows; not used")
    if not eos:
        raise EdgemmError(f"{where} names no end-of-sequence token the model has: tokenizer_config.json's eos_token "
                          "or generation_config.json's eos_token_id (for edgemm's own format: </s>)")
    if pad is None:
        pad = next((i for i in _ids(gcfg.get("pad_token_id")) if i < n), None)
    return {"bos": bos, "add_bos": bool(add_bos and bos is not None), "eos": eos, "pad": pad}


def install_tokenizer(src: Path, tok_dir: Path | None, out: Path, log, vocab_size: int | None = None,
                      adapt_template=None, default_template: str | None = None):
    """Copy the tokenizer and chat template into `out`. -> the special tokens (a ModelConfig.tokens).
    adapt_template: the family's rewrite of its template (edgemm.families.Family.adapt_template), or None;
    default_template: the family's template where the source ships none (Family.chat_template; adapted too)."""
    from tokenizers import Tokenizer as HFTokenizer
    from ..config import TokenConfig
    from ..tokenizer import CHAT_TEMPLATE, Tokenizer
    d = tok_dir or src
    f = d / "tokenizer.json"
    if not f.is_file():
        if tok_dir is None:
            raise EdgemmError(f"{src} ships no tokenizer.json; pass --tokenizer DIR (a directory with the model's "
                              "tokenizer.json, e.g. the Vicuna/LLaMA tokenizer for cogvlm-chat-hf)")
        raise EdgemmError(f"--tokenizer {tok_dir}: no tokenizer.json there")
    try:
        tok = HFTokenizer.from_file(str(f))
    except Exception as e:
        raise EdgemmError(f"cannot read tokenizer {f}: {e}") from None
    template = find_template(src, d) or default_template
    if template and adapt_template is not None:
        template = adapt_template(template)
    tokens = special_tokens(tok, _read_json(d / "tokenizer_config.json", src / "tokenizer_config.json"),
                            _read_json(src / "generation_config.json", d / "generation_config.json"),
                            template, vocab_size, str(d), log)
    Tokenizer(tok, tokens).save(out / "tokenizer.json")
    (out / "chat_template.jinja").write_text(template or CHAT_TEMPLATE)
    return TokenConfig(**tokens)
