"""BLIP-2 / InstructBLIP above the core: the Q-Former's own tokenizer (InstructBLIP's instruction input). Its config
fields, parameter count and `edgemm info`'s line are its spec's (edgemm/blocks/kinds/qformer.py). The torch blocks
(the BLIP tower, the Q-Former connector) are in edgemm.blocks.vision and edgemm.blocks.qformer; this module imports no torch and nothing of bundle or checkpoint
(they call it: the tokenizer's file in a checkpoint or bundle is theirs to read).
"""
from __future__ import annotations


# --------------------------------------------------------------------------- InstructBLIP's instruction input
QFORMER_TOKENIZER = "qformer_tokenizer.json"       # in edgemm checkpoints and bundles (a bundle's manifest lists it)
SOURCE_DIR = "qformer_tokenizer"                   # InstructBlipProcessor.save_pretrained's subfolder


def limits(cfg) -> tuple[int, str]:
    """(the most ids, the side cut) of the question: InstructBLIP's processor keeps the first qformer_positions
    (where transformers' model would fail past them); LLaMA-VID's vlm_attention tokenizes with truncation_side
    'left' and max_length 256 (its BertTokenizer from init_bert), so a long question keeps its end."""
    if cfg.adapter.kind == "llamavid":
        return min(256, cfg.adapter.qformer_positions), "left"
    return cfg.adapter.qformer_positions, "right"


class QFormerTokenizer:
    """The Q-Former's own tokenizer (InstructBLIP, LLaMA-VID: BERT WordPiece), as their processors call it: the
    text with its special tokens ([CLS] ... [SEP]), unpadded, truncated to `max_length` ids on `side` (special
    tokens kept; edgemm.qformer.limits)."""

    def __init__(self, tok, max_length: int, side: str = "right"):
        self.tok, self.max_length = tok, int(max_length)
        tok.no_padding()
        tok.enable_truncation(self.max_length, direction=side)

    @classmethod
    def load(cls, path, lim: tuple[int, str], data: bytes | None = None) -> "QFormerTokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from .errors import EdgemmError
        try:
            tok = HFTokenizer.from_str(data.decode("utf-8")) if data is not None else HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise EdgemmError(f"cannot read the Q-Former tokenizer {path}: {str(e)[:200]}") from None
        return cls(tok, *lim)

    def save(self, path) -> None:
        self.tok.save(str(path))

    def __call__(self, text: str):
        """-> (ids, mask) int64 [1, T]: the instruction inputs of the vision stage."""
        import numpy as np
        ids = self.tok.encode(text).ids
        return np.asarray([ids], np.int64), np.ones((1, len(ids)), np.int64)


def instruction(tokenizer, cfg, text: str):
    """The question's Q-Former inputs (ids, mask) for an InstructBLIP model; () for any other model, so callers
    write vision(pixels, *instruction(...))."""
    if not cfg.reads_question:
        return ()
    q = getattr(tokenizer, "qformer", None)
    if q is None:
        from .errors import EdgemmError
        raise EdgemmError("this InstructBLIP model has no Q-Former tokenizer loaded (qformer_tokenizer.json); "
                          "re-import the model, or re-export the bundle, with this edgemm")
    return q(text)


def import_tokenizer(src, tok_dir, cfg) -> QFormerTokenizer:
    """`edgemm import` of InstructBLIP: the source's qformer_tokenizer/tokenizer.json (the processor layout), or
    --tokenizer DIR's (saved as qformer_tokenizer.json). A missing one is an error that says what to pass."""
    from pathlib import Path
    from .errors import EdgemmError
    cands = [Path(d) / SOURCE_DIR / "tokenizer.json" for d in ([tok_dir] if tok_dir else []) + [src]]
    f = next((c for c in cands if c.is_file()), None)
    if f is None:
        why = ("bert-base-uncased's tokenizer.json: LLaMA-VID's code loads it from the hub" if cfg.adapter.kind ==
               "llamavid" else "InstructBlipProcessor.save_pretrained writes it; save the model's processor there")
        raise EdgemmError(f"{src} has no {SOURCE_DIR}/tokenizer.json, the Q-Former's own tokenizer ({why}); put it "
                          f"in {src / SOURCE_DIR}, or pass --tokenizer DIR with a {SOURCE_DIR}/tokenizer.json in DIR")
    q = QFormerTokenizer.load(f, limits(cfg))
    n = q.tok.get_vocab_size()
    if n > cfg.adapter.qformer_vocab:
        raise EdgemmError(f"{f}: {n} tokens, more than the Q-Former's {cfg.adapter.qformer_vocab} word embeddings; "
                          "it is not this model's Q-Former tokenizer")
    return q


def attach_checkpoint_tokenizer(tok, path, cfg) -> None:
    """load_checkpoint: an InstructBLIP checkpoint's Q-Former tokenizer onto its Tokenizer (`tok.qformer`)."""
    from pathlib import Path
    from .errors import EdgemmError
    f = Path(path) / QFORMER_TOKENIZER
    if not f.is_file():
        raise EdgemmError(f"{path} is an InstructBLIP checkpoint without {QFORMER_TOKENIZER} (the Q-Former's "
                          "tokenizer); re-import it with `edgemm import` from a source with qformer_tokenizer/")
    tok.qformer = QFormerTokenizer.load(f, limits(cfg))


def bundle_fields(tok, out, cfg) -> dict:
    """An export of an InstructBLIP model: writes qformer_tokenizer.json into the bundle -> the manifest fields."""
    if not cfg.reads_question:
        return {}
    q = getattr(tok, "qformer", None)
    if q is None:
        from .errors import EdgemmError
        raise EdgemmError("the model has no Q-Former tokenizer (qformer_tokenizer.json) for its bundle; "
                          "re-import it with `edgemm import`")
    q.save(out / QFORMER_TOKENIZER)
    return {"qformer_tokenizer": QFORMER_TOKENIZER,
            "instruction": {"inputs": "qformer_input_ids, qformer_attention_mask [batch, instruction_len] int64",
                            "text": "the question of the turn the image comes with, tokenized by the Q-Former "
                                    "tokenizer with its special tokens (InstructBlipProcessor)",
                            "max_length": limits(cfg)[0], "truncation_side": limits(cfg)[1]}}


def attach_bundle_tokenizer(tok, bundle, m: dict, read) -> None:
    """Bundle backends: the manifest's qformer_tokenizer onto `tok`. `read(rel)` -> (the file's path inside the
    bundle, its bytes as hashed when the bundle is verified, else None): edgemm.bundle.load_tokenizer's reader."""
    from .config import ModelConfig
    cfg = ModelConfig.from_dict(m["model"])
    if not cfg.reads_question:
        return
    from .errors import EdgemmError
    rel = m.get("qformer_tokenizer")
    if not isinstance(rel, str):
        raise EdgemmError(f"bundle {bundle}: an InstructBLIP bundle without the Q-Former tokenizer in its "
                          "manifest; re-export it with this edgemm")
    p, data = read(rel)
    tok.qformer = QFormerTokenizer.load(p, limits(cfg), data)
