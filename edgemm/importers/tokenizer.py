"""The tokenizer an import installs beside the weights: tokenizer.json and the chat template."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgemmError


def install_tokenizer(src: Path, tok_dir: Path | None, out: Path, log) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from ..tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, Tokenizer
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
    missing = [t for t in (BOS, EOS) if tok.token_to_id(t) is None]
    if missing:
        raise EdgemmError(f"{f} lacks {' and '.join(missing)}, which edgemm's prompt format needs")
    if tok.token_to_id(PAD) is None:
        tok.add_special_tokens([PAD])
        log(f"note: the tokenizer has no {PAD}; added it as id {tok.token_to_id(PAD)} (used for padding only)")
    Tokenizer(tok).save(out / "tokenizer.json")
    template = None
    for cand in (d / "chat_template.jinja", src / "chat_template.jinja"):
        if cand.is_file():
            template = cand.read_text()
            break
    if template is None:
        for cand in (d / "tokenizer_config.json", src / "tokenizer_config.json"):
            if cand.is_file():
                t = json.loads(cand.read_text()).get("chat_template")
                if isinstance(t, str):
                    template = t
                    break
    (out / "chat_template.jinja").write_text(template or CHAT_TEMPLATE)
