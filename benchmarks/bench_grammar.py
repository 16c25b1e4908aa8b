"""Grammar engines for structured output, measured where edgemm would use them: the cost of one token mask (and
of compiling a request's JSON schema) on a tokenizer.json, llguidance against xgrammar.

    python benchmarks/bench_grammar.py                       # the shipped tiny-shapes tokenizer
    python benchmarks/bench_grammar.py --tokenizer path/to/tokenizer.json --repeat 20

Each engine compiles the same schema (nested object, enum, array), then walks a valid document token by token:
compute the mask of allowed next tokens, consume the token. Reported: compile ms, mask us/token (median over the
document's tokens and the repeats). xgrammar is measured only where it imports (it needs torch, transformers and
triton; `pip install --no-deps --target DIR xgrammar apache-tvm-ffi` and PYTHONPATH=DIR is enough here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
        "color": {"enum": ["red", "green", "blue"]},
        "where": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                  "required": ["x", "y"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["shape", "color", "where", "tags"],
    "additionalProperties": False,
}
DOC = {"shape": "circle", "color": "red", "where": {"x": 12, "y": 40}, "tags": ["small", "left of the square"]}


def bench_llguidance(tok_json: str, ids: list[int], eos: int, repeat: int) -> dict:
    import llguidance
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok_json, eos_token=eos)
    t_tok = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False})
    compile_s, mask_s = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        m = llguidance.LLMatcher(lt, grammar)
        compile_s.append(time.perf_counter() - t0)
        assert not m.is_error(), m.get_error()
        for t in ids + [eos]:
            t0 = time.perf_counter()
            mask = m.compute_bitmask()
            mask_s.append(time.perf_counter() - t0)
            assert mask[t // 8] >> (t % 8) & 1, f"token {t} masked"
            assert m.consume_token(t), m.get_error()
    return {"engine": f"llguidance {llguidance.__version__}", "tokenizer_s": t_tok, "compile_s": compile_s,
            "mask_s": mask_s}


def bench_xgrammar(tok_json: str, ids: list[int], eos: int, repeat: int) -> dict:
    import importlib.metadata
    import torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok_json))
    info = xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    t_tok = time.perf_counter() - t0
    compile_s, mask_s = [], []
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    for _ in range(repeat):
        t0 = time.perf_counter()
        g = comp.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
        m = xgr.GrammarMatcher(g)
        compile_s.append(time.perf_counter() - t0)
        for t in ids + [eos]:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            mask_s.append(time.perf_counter() - t0)
            assert int(bitmask[0, t // 32]) >> (t % 32) & 1, f"token {t} masked"
            assert m.accept_token(t), t
    del torch
    return {"engine": f"xgrammar {importlib.metadata.version('xgrammar')}", "tokenizer_s": t_tok,
            "compile_s": compile_s, "mask_s": mask_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: the shipped tiny-shapes one)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    from edgemm.checkpoint import DEMO_DIR
    from tokenizers import Tokenizer
    path = a.tokenizer or str(DEMO_DIR / "tokenizer.json")
    tok = Tokenizer.from_file(path)
    tok_json = tok.to_str()
    eos = next((tok.token_to_id(s) for s in ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
                if tok.token_to_id(s) is not None), 0)
    ids = tok.encode(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False).ids
    print(f"tokenizer {path}: {tok.get_vocab_size()} tokens; the document is {len(ids)} tokens; eos {eos}")
    rows = []
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
        try:
            r = fn(tok_json, ids, eos, a.repeat)
        except ImportError as e:
            print(f"{name}: not importable here ({e})")
            continue
        r["compile_ms"] = 1e3 * statistics.median(r["compile_s"])
        r["mask_us_median"] = 1e6 * statistics.median(r["mask_s"])
        r["mask_us_mean"] = 1e6 * statistics.fmean(r["mask_s"])
        rows.append(r)
        print(f"{r['engine']:>20}: tokenizer {1e3 * r['tokenizer_s']:7.1f} ms (once per model), "
              f"compile {r['compile_ms']:7.2f} ms/request, mask {r['mask_us_median']:7.1f} us/token median "
              f"({r['mask_us_mean']:.1f} mean)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
