"""Byte-level BPE tokenizer (GPT-2 style, so llama.cpp's `gpt2` tokenizer reads it) and the prompt format.

A prompt is built piece by piece, the same way in training, inference and chat, so a chat turn appended to a
KV cache tokenizes exactly as the whole conversation would:
    <s> [image rows] "Q: {question}\\nA:" " {answer}" </s> "\\nQ: {question}\\nA:" ...
"""
from __future__ import annotations

from pathlib import Path

from .errors import EdgemmError

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
USER_FMT = "Q: {question}\nA:"
ANSWER_FMT = " {answer}"
TURN_SEP = "\n"
# The same format as a Jinja chat template (HF convention), stored with every checkpoint and GGUF file.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}{% if m.get('image') %}<image>{% endif %}Q: {{ m['content'] }}{{ '\\n' }}A:"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def train_tokenizer(lines: list[str], vocab_size: int):
    """Train a byte-level BPE on lines, padded with reserved special tokens to exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, IMAGE],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = []
    for line in lines:   # the pieces as they appear in prompts
        corpus += [USER_FMT.format(question=line), ANSWER_FMT.format(answer=line), TURN_SEP + line]
    tok.train_from_iterator(corpus * 4, trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(vocab_size - n)])
    return tok


class Tokenizer:
    """A tokenizer.json and its special tokens. `tokens` (ModelConfig.tokens, or its dict in a manifest) names
    them for an imported model: bos (None: none, as Qwen), whether prompts start with it, the eos ids (generation
    stops on any; the first closes a turn) and pad (None: padding takes eos). Without it (edgemm's own models,
    checkpoints imported before it was recorded) they are the literal <s>, </s> and <pad>."""
    qformer = None      # InstructBLIP: the Q-Former's own tokenizer (edgemm.qformer.QFormerTokenizer)

    def __init__(self, tok, tokens=None):
        self.tok = tok
        get = (tokens.get if isinstance(tokens, dict) else lambda k, d=None: getattr(tokens, k, d))
        if tokens is not None and get("eos"):
            self.bos_id, self.add_bos = get("bos"), bool(get("add_bos", False)) and get("bos") is not None
            self.eos_ids, pad = [int(i) for i in get("eos")], get("pad")
        else:
            self.bos_id, self.add_bos = tok.token_to_id(BOS), True
            self.eos_ids, pad = [i for i in [tok.token_to_id(EOS)] if i is not None], tok.token_to_id(PAD)
            if self.bos_id is None or not self.eos_ids:
                raise EdgemmError("tokenizer.json lacks the special tokens <s> and </s>, and no special tokens are "
                                  "recorded for it (config.json's tokens: re-import the model with `edgemm import`)")
        self.eos_id = self.eos_ids[0]
        self.has_pad = pad is not None
        self.pad_id = pad if pad is not None else self.eos_id      # padded rows are masked: any id serves
        self._eos = frozenset(self.eos_ids)
        stop = get("stop") if tokens is not None else None      # the model's own stop strings (TokenConfig.stop)
        self.stops = tuple(s for s in stop if isinstance(s, str) and s) if isinstance(stop, list) else ()
        self._cache: dict[str, list[int]] = {}

    def prefix_ids(self) -> list[int]:
        """What every prompt starts with: [bos], or [] where the tokenizer prepends nothing (Qwen)."""
        return [self.bos_id] if self.add_bos else []

    def is_eos(self, t: int) -> bool:
        return t in self._eos

    @property
    def bos_token(self) -> str:
        """bos as text, for chat templates ("" where there is none)."""
        return self.tok.id_to_token(self.bos_id) if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return self.tok.id_to_token(self.eos_id)

    @classmethod
    def load(cls, path: str | Path, data: bytes | None = None, tokens=None) -> "Tokenizer":
        """From a tokenizer.json path, or from its bytes (`data`, already read and checked; path names it);
        tokens: the model's special tokens (ModelConfig.tokens or its dict), see the class."""
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_str(data.decode("utf-8")) if data is not None else HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON
            raise EdgemmError(f"cannot read tokenizer {path}: {str(e)[:200]}") from None
        return cls(tok, tokens)

    def save(self, path: str | Path) -> None:
        self.tok.save(str(path))

    def ordinary_ids(self, vocab_size: int) -> list[int]:
        """The ids below vocab_size that are not special or added tokens (<pad>, <image>, the <reserved_i> padding:
        rows a model may never have trained, whose activations no calibration set covers)."""
        added = set(self.tok.get_added_tokens_decoder())
        ids = [i for i in range(vocab_size) if i not in added]
        return ids or list(range(vocab_size))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self.tok.encode(text, add_special_tokens=False).ids
            if len(self._cache) < 100_000:
                self._cache[text] = ids
        return list(ids)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    # ---- prompt pieces ------------------------------------------------------
    def user_turn(self, question: str, first: bool) -> list[int]:
        text = USER_FMT.format(question=question.strip())
        return self.encode(text if first else TURN_SEP + text)

    def answer(self, answer: str) -> list[int]:
        return self.encode(ANSWER_FMT.format(answer=answer)) + [self.eos_id]
