"""Grammar engines for structured output, measured where edgemm would use them: the cost of one token mask (and
of compiling a request's JSON schema) on a tokenizer.json, llguidance against xgrammar.

    python benchmarks/bench_grammar.py                       # the shipped tiny-shapes tokenizer
    python benchmarks/bench_grammar.py --tokenizer path/to/tokenizer.json --repeat 20

    python benchmarks/bench_grammar.py --decode torch,ort,llamacpp --rounds 3   # + decode tok/s with and without

Each engine compiles the same schema (nested object, enum, array), then walks a valid document token by token:
compute the mask of allowed next tokens, consume the token. Reported: compile ms, mask us/token (median over the
document's tokens and the repeats). xgrammar is measured only where it imports (it needs torch, transformers and
triton; `pip install --no-deps --target DIR xgrammar apache-tvm-ffi` and PYTHONPATH=DIR is enough here).

--decode: what the mask costs where edgemm pays it, decoding the shipped model on each backend named (in process,
through generation.AnswerStream as the server's slots run it): tokens/s of answers under the schema (edgemm.grammar,
--tokens of them) against free answers of the same lengths (ignore_eos: the same KV lengths, the same work but the
mask), one after the other, --rounds times; printed per backend: the medians and the schema's cost in percent.
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


def decode_rates(b, grammar, n_tokens: int, seed: int) -> tuple[float, float]:
    """Tokens/s of decoding (backend step + mask + sampling) -> (free, under grammar): answers under `grammar`
    until n_tokens, each followed by a free answer of the same length (ignore_eos: the same KV lengths, the same
    work but the mask), so a busy machine slows both alike."""
    from edgemm.generation import AnswerStream, GenerationConfig
    tok = b.tokenizer
    prompt = tok.prefix_ids() + tok.user_turn("Describe a shape as JSON.", first=True)
    st = b.new_state(max_len=min(b.context_length, 512))
    spent, n, i = {True: 0.0, False: 0.0}, 0, 0

    def one(g, length):
        st.length = st.pos = 0
        logits = b.text(st, prompt)
        ans = AnswerStream(tok, GenerationConfig(max_new_tokens=length, temperature=1.0, seed=seed + i, grammar=g,
                                                 ignore_eos=True))
        t0 = time.perf_counter()
        while not ans.push(logits)[1]:
            logits = b.text(st, [ans.ids[-1]])
        spent[g is not None] += time.perf_counter() - t0
        return len(ans.ids)
    while n < n_tokens:
        k = one(grammar, 200)
        one(None, k)
        n, i = n + k, i + 1
    return n / spent[False], n / spent[True]


def open_backend(name: str, threads: int, tmp: str):
    from edgemm.runtimes import load_backend
    if name == "llamacpp":
        from edgemm.export.gguf import export_gguf
        export_gguf(model="tiny-shapes", out=Path(tmp) / "tiny-f32", precision={"vision": "f32", "decoder": "f32"},
                    log=None)
        return load_backend("llamacpp", bundle=str(Path(tmp) / "tiny-f32"), threads=threads)
    if name == "ort":                   # the shipped model's cached fp32 ONNX bundle (what `auto` runs)
        return load_backend("auto", model="tiny-shapes", threads=threads)
    return load_backend(name, model="tiny-shapes", device="cpu", threads=threads)


def bench_decode(names: list[str], n_tokens: int, rounds: int, threads: int) -> list[dict]:
    import tempfile
    from edgemm.grammar import json_grammar
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            b = open_backend(name, threads, tmp)
            g = json_grammar(b.tokenizer, SCHEMA)
            decode_rates(b, g, 20, 0)                            # warm-up
            free, schema = [], []
            for r in range(rounds):
                f, s = decode_rates(b, g, n_tokens, 100 * r)
                free.append(f)
                schema.append(s)
            f, s = statistics.median(free), statistics.median(schema)
            rows.append({"backend": b.describe(), "free_tok_s": f, "schema_tok_s": s, "cost_pct": 100 * (f - s) / f})
            print(f"{b.describe()}: decode {f:.1f} tok/s free, {s:.1f} tok/s under the schema "
                  f"({rows[-1]['cost_pct']:+.1f}% cost; {rounds} interleaved rounds of {n_tokens} tokens)")
            if hasattr(b, "close"):
                b.close()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: the shipped tiny-shapes one)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--decode", help="also decode tok/s with and without the schema on these backends "
                                     "(comma-separated: torch,ort,llamacpp)")
    ap.add_argument("--tokens", type=int, default=300, help="--decode: answer tokens per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="--decode: interleaved rounds")
    ap.add_argument("--threads", type=int, default=1, help="--decode: backend threads")
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
    out = {"mask": [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]}
    if a.decode:
        out["decode"] = bench_decode(a.decode.split(","), a.tokens, a.rounds, a.threads)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
