"""Constrained decoding: a grammar masks the logits before each token is sampled (structured output, tool calls).

One engine, llguidance (in the `serve` extra): it reads the tokenizer.json edgemm's tokenizers already are,
compiles a JSON schema in well under a millisecond and computes a token mask in microseconds on the shipped
tokenizer (benchmarks/bench_grammar.py measures it against xgrammar, which needs torch, transformers and triton
besides). It is imported only when a request asks for a grammar.

    g = json_grammar(tok, schema)            # EdgemmError (a 400 in the server) for a schema it cannot compile
    gen = GenerationConfig(..., grammar=g)   # generation.AnswerStream masks every step through g.start()

The mask is applied in one place, AnswerStream.push, which every backend's logits pass through (ChatSession and
the server's batched slots alike). A finished grammar (only end-of-sequence is left) ends the answer with
finish_reason "stop".
"""
from __future__ import annotations

import json

import numpy as np

from .errors import EdgemmError

# JSON whitespace the model may put between tokens: none, one space, or a newline and an indent. Bounded, so a
# model cannot spend its tokens on blanks (llguidance's default allows any run of whitespace).
WHITESPACE = r"(?:\x20|\n[\x20\t]{0,16})?"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise EdgemmError("structured output (response_format, tools) needs llguidance: "
                          "pip install 'edgemm[serve]' (or llguidance)") from None
    return llguidance


def _lltokenizer(tok):
    """The llguidance tokenizer of an edgemm Tokenizer, made once and kept on it."""
    lt = getattr(tok, "_llg", None)
    if lt is None:
        llg = _llguidance()
        lt = llg.LLTokenizer(tok.tok.to_str(), eos_token=list(tok.eos_ids))
        tok._llg = lt
    return lt


class Grammar:
    """A compiled grammar for one request (immutable; `start()` gives each answer its own matcher)."""

    def __init__(self, tok, grammar: str, what: str = "the grammar"):
        """what: the request's part the grammar comes from, named in the error (EdgemmError) if it fails."""
        llg = _llguidance()
        self.lt = _lltokenizer(tok)
        self.grammar = grammar
        err = llg.LLMatcher.validate_grammar(grammar, self.lt)
        self._first = None if err else llg.LLMatcher(self.lt, grammar, log_level=0)
        if err or self._first.is_error():
            why = (err or self._first.get_error()).strip().splitlines()[0][:500]    # (then the grammar's source)
            raise EdgemmError(f"{what} cannot be enforced: {why}")

    def start(self) -> "Constraint":
        m, self._first = (self._first, None) if self._first is not None else (None, None)
        if m is None:
            m = _llguidance().LLMatcher(self.lt, self.grammar, log_level=0)
        return Constraint(m)


class Constraint:
    """One answer under a grammar: mask(logits) before sampling, accept(token) after."""

    def __init__(self, matcher):
        self.m = matcher

    @property
    def done(self) -> bool:
        """Nothing but end-of-sequence can follow (or the matcher failed)."""
        return self.m.is_stopped() or self.m.is_error()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids at -inf (a copy)."""
        bits = np.frombuffer(self.m.compute_bitmask(), np.uint8)
        v = logits.shape[-1]                 # (the model's rows past the tokenizer's vocabulary stay forbidden)
        allowed = np.unpackbits(bits, count=min(8 * bits.size, v), bitorder="little").view(bool)
        if not allowed.any():
            raise EdgemmError(f"the grammar allows no token here ({self.m.get_error() or 'no token of this model fits'})")
        if allowed.size < v:
            allowed = np.concatenate([allowed, np.zeros(v - allowed.size, bool)])
        return np.where(allowed, logits, np.float32(-np.inf))

    def accept(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise EdgemmError(f"the grammar refused token {token}: {self.m.get_error()}")


def _json_options(strict: bool) -> dict:
    # strict: every keyword must be one the engine enforces (an unknown one is an error, as OpenAI's strict mode);
    # otherwise unknown keywords are ignored and the rest still enforced
    return {"whitespace_pattern": WHITESPACE, "lenient": not strict}


def check_schema(schema) -> None:
    """EdgemmError naming what is wrong with a JSON schema (not a JSON Schema, or not one the engine can build)."""
    if not isinstance(schema, (dict, bool)):
        raise EdgemmError("the JSON schema must be an object")
    try:
        from jsonschema.validators import validator_for
    except ImportError:                    # llguidance still refuses what it cannot compile
        return
    from jsonschema.exceptions import SchemaError
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise EdgemmError(f"invalid JSON schema{' at ' + where if where else ''}: {e.message}") from None


def schema_grammar(schema, strict: bool = True) -> str:
    """The llguidance grammar text of a JSON schema (checked: EdgemmError for an invalid one)."""
    check_schema(schema)
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=_json_options(strict))
    except ValueError as e:
        raise EdgemmError(f"invalid JSON schema: {e}") from None


def json_grammar(tok, schema=None, strict: bool = True) -> Grammar:
    """JSON output: any JSON object (schema None, response_format json_object) or JSON valid under `schema`."""
    return Grammar(tok, schema_grammar({"type": "object"} if schema is None else schema, strict), "the JSON schema")


def lark_grammar(tok, lark: str, what: str = "the grammar") -> Grammar:
    """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON schema as a rule)."""
    return Grammar(tok, _llguidance().LLMatcher.grammar_from_lark(lark), what)


def lark_json(schema, strict: bool = True) -> str:
    """A schema as an inline `%json` rule body of a Lark grammar (checked as schema_grammar checks it)."""
    check_schema(schema)
    opts = {**schema, "x-guidance": _json_options(strict)} if isinstance(schema, dict) else schema
    return "%json " + json.dumps(opts)
