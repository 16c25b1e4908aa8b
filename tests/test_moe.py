"""Mixture of experts (MoE-LLaVA): LlavaForConditionalGeneration with a Mixtral text_config, imported and checked
against transformers' forward (logits and the experts the router picks), then exported and validated."""
import importlib.util
import json

import pytest
import torch

from edgemm.checkpoint import load_checkpoint
from edgemm.config import DecoderConfig, ModelConfig
from edgemm.errors import EdgemmError
from edgemm.importers import import_checkpoint

from .test_import import write_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

IMAGE_TOKEN = 3


def _llava_with(text, seed=0):
    """A tiny random LlavaForConditionalGeneration around the given text_config, weights well away from init (the
    router's too: distinct expert choices)."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _tiny_moe_llava(seed=0, experts=4, top_k=2):
    from transformers import MixtralConfig
    return _llava_with(MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     rms_norm_eps=1e-5, num_local_experts=experts, num_experts_per_tok=top_k,
                                     tie_word_embeddings=False), seed)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("moe")
    hf = _tiny_moe_llava()
    src = tmp / "moe-llava-hf"
    hf.save_pretrained(src, safe_serialization=True)
    write_tokenizer(src)
    summary = import_checkpoint(src, tmp / "ck", log=None)
    return hf, tmp / "ck", summary


def _hooks(modules, store):
    return [m.register_forward_hook(lambda mod, a, out, i=i: store[i].append(out)) for i, m in enumerate(modules)]


def _matches_transformers(hf, m):
    """Logits within 1e-4 of transformers' forward on an image+text prompt (segment by segment through the KV cache,
    and in one pass) and over greedy decode steps; the router of every MoE layer picks transformers' experts on
    every token of the prompt."""
    from edgemm.model import KVCache
    d = m.cfg.decoder
    n_img = m.cfg.n_image_rows
    g = torch.Generator().manual_seed(5)
    px = torch.randn(1, 3, 16, 16, generator=g)
    pre, post = torch.randint(4, 500, (1, 5), generator=g), torch.randint(4, 500, (1, 6), generator=g)
    ids = torch.cat([pre, torch.full((1, n_img), IMAGE_TOKEN), post], 1)
    moe = [i for i in range(d.n_layers) if d.is_moe_layer(i)]
    assert moe
    gates = [hf.model.language_model.layers[i].mlp.gate for i in moe]
    theirs, ours = [[] for _ in gates], [[] for _ in gates]
    hs = _hooks(gates, theirs)
    mods = [m.decoder.layers[i].text.moe for i in moe]
    for j, mod in enumerate(mods):                            # record our router's choices, segment by segment
        route = mod.route
        mod.route = lambda x, j=j, route=route: (lambda r: (ours[j].append(r[1]), r)[1])(route(x))
    try:
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=px).logits[0]
            cache, pos = KVCache.empty(d, max_len=64), 0
            for kind, data in (("text", pre), ("image", m.encode_image(px)), ("text", post)):
                lg, pos = m.forward_segment(kind, data, cache, pos)
            assert (lg[0, -1] - ref[-1]).abs().max().item() <= 1e-4
            picked = [torch.cat(o).sort(-1).values for o in ours]     # [tokens, k] per layer, sequence order
            for j in range(len(gates)):
                want = theirs[j][0][2].sort(-1).values                 # the TopKRouter's (logits, weights, indices)
                assert want.shape == picked[j].shape == (ids.shape[1], d.experts_top_k)
                assert torch.equal(want, picked[j]), f"layer {moe[j]}: the router picked other experts"
                assert len(set(want[:, 0].tolist())) > 1                 # not one expert for every token
            got = m.forward_full([("text", pre), ("image", m.encode_image(px)), ("text", post)])[0]
            assert (got - ref).abs().max().item() <= 1e-4
            seq = ids
            for _ in range(3):                                          # greedy decode steps through the cache
                t = lg[0, -1].argmax().view(1, 1)
                seq = torch.cat([seq, t], 1)
                lg, pos = m.forward_segment("text", t, cache, pos)
                want = hf(input_ids=seq, pixel_values=px).logits[0, -1]
                assert (lg[0, -1] - want).abs().max().item() <= 1e-4
    finally:
        for h in hs:
            h.remove()
        for mod in mods:
            del mod.route


def test_mixtral_import_matches_transformers_logits_and_experts(imported):
    hf, ck, summary = imported
    assert "mixture of experts" in summary["variants"]
    m, _ = load_checkpoint(ck)
    d = m.cfg.decoder
    assert (d.n_experts, d.experts_top_k, d.norm_topk_prob) == (4, 2, True)
    assert all(d.is_moe_layer(i) for i in range(d.n_layers))
    _matches_transformers(hf, m)


def test_qwen3_moe_import_matches_transformers_logits_and_experts(tmp_path):
    """Qwen3-MoE: per-head Q/K RMSNorm, experts of their own width, a dense layer (mlp_only_layers), top-k
    weights not renormalised."""
    from transformers import Qwen3MoeConfig
    hf = _llava_with(Qwen3MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    rms_norm_eps=1e-5, max_position_embeddings=256, num_experts=4,
                                    num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1],
                                    tie_word_embeddings=False), seed=1)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    write_tokenizer(tmp_path / "src")
    summary = import_checkpoint(tmp_path / "src", tmp_path / "ck", log=None)
    assert {"mixture of experts", "per-head q/k norm"} <= set(summary["variants"])
    m, _ = load_checkpoint(tmp_path / "ck")
    d = m.cfg.decoder
    assert [d.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert (d.moe_ffn_dim, d.norm_topk_prob) == (24, False)
    _matches_transformers(hf, m)


def test_fused_expert_layout_imports_the_same(imported, tmp_path):
    """transformers 5 holds experts fused (mlp.gate, mlp.experts.gate_up_proj / down_proj) and saves them per
    expert (block_sparse_moe.experts.e.w1/w2/w3); a checkpoint in the fused layout imports to the same tensors."""
    import shutil
    from safetensors.torch import save_file
    hf, ck, _ = imported
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)
    src = tmp_path / "fused"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(ck.parent / "moe-llava-hf" / "config.json", src / "config.json")
    write_tokenizer(src)
    import_checkpoint(src, tmp_path / "ck", log=None)
    a, b = load_checkpoint(ck)[0].state_dict(), load_checkpoint(tmp_path / "ck")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_moe_layer_pattern_and_refusals():
    c = DecoderConfig(n_layers=4, n_experts=4, experts_top_k=1, moe_every=2, moe_dense_layers=[3],
                      single_branch=True)
    assert [i for i in range(4) if c.is_moe_layer(i)] == [1]      # (i + 1) % 2 == 0, layer 3 dense
    with pytest.raises(EdgemmError, match="single_branch"):
        ModelConfig(decoder=DecoderConfig(n_experts=4)).validate()  # routed-expert + MoE
    with pytest.raises(EdgemmError, match="top_k"):
        ModelConfig(decoder=DecoderConfig(n_experts=2, experts_top_k=3, single_branch=True)).validate()


def test_qwen3_head_dim_of_its_own_imports_and_exports(tmp_path):
    """Real Qwen3-MoE checkpoints set head_dim apart from hidden_size / heads (128 at 2048 x 32): Q and the attention
    output are n_heads * head_dim wide. The import matches transformers; onnx validates; gguf refuses by name."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from transformers import Qwen3MoeConfig
    from edgemm.errors import UnsupportedVariant
    from edgemm.export.onnx import export_onnx
    hf = _llava_with(Qwen3MoeConfig(vocab_size=512, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    rms_norm_eps=1e-5, max_position_embeddings=256, num_experts=4,
                                    num_experts_per_tok=2, tie_word_embeddings=False), seed=2)
    hf.save_pretrained(tmp_path / "src", safe_serialization=True)
    write_tokenizer(tmp_path / "src")
    summary = import_checkpoint(tmp_path / "src", tmp_path / "ck", log=None)
    assert "head_dim of its own" in summary["variants"]
    m, _ = load_checkpoint(tmp_path / "ck")
    d = m.cfg.decoder
    assert (d.head_dim, d.attn_width, d.d_model) == (16, 64, 32)
    assert tuple(m.decoder.layers[0].text.o.weight.shape) == (32, 64)
    _matches_transformers(hf, m)
    from edgemm.info import param_counts
    assert d.qk_norm and param_counts(m.cfg) == m.param_counts()      # info's count includes the q/k norm weights
    man = export_onnx(str(tmp_path / "ck"), tmp_path / "b", precision="fp32", log=None)
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    from edgemm.export.trt import export_trt                          # the standard-op (window) attention too
    man = export_trt(str(tmp_path / "ck"), tmp_path / "t", precision="fp16", no_build=True, log=None)
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    from edgemm.export.gguf import export_gguf
    with pytest.raises(UnsupportedVariant, match="targets that can: onnx, trt"):
        export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "g", log=None)
    assert not (tmp_path / "g").exists()


def test_onnx_export_validates(imported, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from edgemm.export.onnx import export_onnx
    _, ck, _ = imported
    with pytest.raises(EdgemmError, match="decoder=int4"):                      # int4 experts: int4 bundles only
        export_onnx(str(ck), tmp_path / "x", precision="fp32", log=None, moe_form="ort-qmoe4")
    assert not (tmp_path / "x").exists()
    man = export_onnx(str(ck), tmp_path / "b", precision="fp32", log=None)
    assert man["stages"]["decoder_text"]["moe"]["form"] == "ort-moe"            # the default: the faster one
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    assert "MoE" in {n.op_type for n in onnx.load(str(tmp_path / "b" / "decoder_text.onnx")).graph.node}


def test_cli_moe_form(imported, tmp_path):
    """--moe-form on the command line: the form is the manifest's and the graph's; misuse is a one-line error."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from click.testing import CliRunner
    from edgemm.cli import main
    _, ck, _ = imported
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--moe-form", "dense", "-o", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "d" / "edgemm.json").read_text())
    assert man["stages"]["decoder_text"]["moe"]["form"] == "dense"
    assert "MoE" not in {n.op_type for n in onnx.load(str(tmp_path / "d" / "decoder_text.onnx")).graph.node}
    for args, msg in ((["--moe-form", "ort-qmoe4"], "decoder=int4"),
                      (["--target", "gguf", "--moe-form", "dense"], "--moe-form applies to --target onnx")):
        r = CliRunner().invoke(main, ["export", "--model", str(ck), *args, "-o", str(tmp_path / "x")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "x").exists()


def test_info_counts_match_the_model(imported):
    from edgemm.info import describe_config, param_counts
    _, ck, _ = imported
    m, _ = load_checkpoint(ck)
    text = sum(p.numel() for n, p in m.named_parameters() if ".text." in n)
    assert param_counts(m.cfg)["text_branch"] == text
    d = m.cfg.decoder
    stored, read = d.ffn_params()
    moe = sum(p.numel() for n, p in m.named_parameters() if ".moe." in n)
    assert stored == moe
    assert stored - read == (d.n_experts - d.experts_top_k) * 3 * d.d_model * d.moe_ffn_dim * d.n_layers
    assert any("top-2" in line for line in describe_config(m.cfg, "test"))


def test_trt_export_standard_ops_validates(imported, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from edgemm.export.trt import export_trt
    _, ck, _ = imported
    man = export_trt(str(ck), tmp_path / "t", precision="fp16", no_build=True, log=None)
    for s in ("decoder_text", "decoder_image"):
        g = onnx.load(str(tmp_path / "t" / f"{s}.onnx")).graph
        assert all(n.domain in ("", "ai.onnx") for n in g.node)
        assert man["stages"][s]["moe"]["form"] == "dense"


def test_moe_block_matches_qwen3_moe_without_renormalisation():
    """The router options Qwen3-MoE uses (norm_topk_prob off, an expert width of its own, decoder_sparse_step and
    mlp_only_layers) against transformers' Qwen3-MoE classes: the same output and the same experts."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe import modeling_qwen3_moe as q3
    from edgemm.moe import MoE
    hc = Qwen3MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                        num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=5, decoder_sparse_step=2,
                        mlp_only_layers=[3], num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    c = DecoderConfig(d_model=32, n_heads=4, n_layers=5, ffn_dim=40, n_experts=6, experts_top_k=2,
                      expert_ffn_dim=24, moe_every=2, moe_dense_layers=[3], norm_topk_prob=False, single_branch=True)
    layers = [q3.Qwen3MoeDecoderLayer(hc, i) for i in range(5)]
    assert [isinstance(la.mlp, q3.Qwen3MoeSparseMoeBlock) for la in layers] == [c.is_moe_layer(i) for i in range(5)]
    torch.manual_seed(0)
    blk = q3.Qwen3MoeSparseMoeBlock(hc).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)
    ours = MoE(c)
    F = hc.moe_intermediate_size
    with torch.no_grad():
        ours.router.weight.copy_(blk.gate.weight)
        ours.gate.copy_(blk.experts.gate_up_proj[:, :F])
        ours.up.copy_(blk.experts.gate_up_proj[:, F:])
        ours.down.copy_(blk.experts.down_proj)
        x = torch.randn(1, 9, 32)
        want_idx = blk.gate(x.view(-1, 32))[2].sort(-1).values
        got_idx = ours.route(x.view(-1, 32))[1].sort(-1).values
        assert torch.equal(want_idx, got_idx)
        assert (ours(x) - blk(x)).abs().max().item() <= 1e-5
        w = ours.route(x.view(-1, 32))[0]
        assert (w.sum(-1) < 1 - 1e-3).all()                     # not renormalised: the check can tell


def test_layer_pattern_without_renormalisation_both_forms_validate_and_bench_counts_the_chosen_experts(tmp_path):
    """Dense and MoE layers mixed (every other layer, one forced dense), no renormalisation, Qwen3's per-head Q/K
    norm: both onnx MoE forms and the int4 one (QMoE) validate against the reference; bench's bytes per decode step
    count top_k of n_experts for the MoE op and every expert for the dense form (which computes them all)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from edgemm.bench import decode_weight_bytes
    from edgemm.checkpoint import DEMO_DIR
    from edgemm.config import VisionConfig
    from edgemm.export.onnx import export_onnx
    from edgemm.model import EdgeMM
    from edgemm.tokenizer import Tokenizer
    cfg = ModelConfig(vision=VisionConfig(width=32, layers=1, heads=2, mlp_dim=64),
                      decoder=DecoderConfig(d_model=64, n_layers=4, ffn_dim=96, n_experts=4, experts_top_k=2,
                                            expert_ffn_dim=64, moe_every=2, moe_dense_layers=[3],
                                            norm_topk_prob=False, qk_norm=True, single_branch=True)).validate()
    m = EdgeMM(cfg).init_weights(3).eval()
    assert ["moe" in la.text._modules for la in m.decoder.layers] == [False, True, False, False]
    tok = Tokenizer.load(DEMO_DIR / "tokenizer.json")
    wb = {}
    for form in ("ort-moe", "dense"):
        man = export_onnx((m, tok), tmp_path / form, precision="fp32", log=None, moe_form=form)
        assert man["stages"]["decoder_text"]["moe"]["form"] == form
        ops = {n.op_type for n in onnx.load(str(tmp_path / form / "decoder_text.onnx")).graph.node}
        assert ("MoE" in ops) == (form == "ort-moe")
        wb[form] = decode_weight_bytes(tmp_path / form)
    experts = sum(p.numel() for n, p in m.named_parameters() if n.endswith(("moe.gate", "moe.up", "moe.down")))
    unread = 4 * experts * (1 - cfg.decoder.experts_top_k / cfg.decoder.n_experts)
    assert wb["dense"] - wb["ort-moe"] == pytest.approx(unread, abs=256)         # (+ the dense form's constants)
    man = export_onnx((m, tok), tmp_path / "int4", precision="int4", log=None)   # int4: QMoE experts
    assert man["stages"]["decoder_text"]["moe"]["form"] == "ort-qmoe4"
    assert "QMoE" in {n.op_type for n in onnx.load(str(tmp_path / "int4" / "decoder_text.onnx")).graph.node}


def test_qmoe_int4_layout_matches_the_dequantized_experts():
    """The int4 packing QMoE reads (low nibble first, code - 8, block scales): ONNX Runtime's QMoE equals the
    reference MoE run on the dequantized experts, to float rounding (so the layout, not the int4 error, is tested)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import numpy as np
    from onnx import TensorProto
    from onnx.helper import make_tensor_value_info as vi
    from edgemm.export.graph import Graph, moe_mlp, qmoe_int4
    from edgemm.moe import MoE
    c = DecoderConfig(d_model=64, n_experts=4, experts_top_k=2, expert_ffn_dim=32, single_branch=True)
    moe = MoE(c)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    gr = Graph()
    moe_mlp(gr, "x", moe, "l0", "ort-qmoe4")
    gr.op("Identity", [gr.nodes[-1].output[0]], out="y")
    model = gr.model("t", [vi("x", TensorProto.FLOAT, [1, 7, 64])], [vi("y", TensorProto.FLOAT, [1, 7, 64])])
    assert any(n.op_type == "QMoE" for n in model.graph.node)
    x = torch.randn(1, 7, 64, generator=g)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x.numpy()})[0]

    def deq(w):                                                 # unpack in the test: nibbles, minus 8, times scale
        q, s = qmoe_int4(w.detach().numpy())
        codes = np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:-1], -1).astype(np.float32) - 8
        return torch.from_numpy(codes * np.repeat(s, 32, -1))
    with torch.no_grad():
        ref = moe(x)
        moe.gate.copy_(deq(moe.gate))
        moe.up.copy_(deq(moe.up))
        moe.down.copy_(deq(moe.down))
        want = moe(x)
    assert np.abs(y - want.numpy()).max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert np.abs(y - ref.numpy()).max() > 1e-3                 # int4 does change the result: the check can tell


# --------------------------------------------------------------------------- gguf (llama arch, Mixtral layout)
needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")


@needs_llama
def test_gguf_moe_loads_in_stock_llama_cpp_and_agrees_on_top1(tmp_path, tokenizer):
    """The MoE-LLaVA decoder as llama.cpp's `llama` arch with ffn_gate_inp + ffn_{gate,up,down}_exps and the
    expert counts: the export validates itself in llama.cpp, and stock llama-cpp-python's greedy tokens equal the
    reference's on a text prompt."""
    import numpy as np
    from gguf import GGUFReader
    from llama_cpp import Llama
    from edgemm.export.gguf import export_gguf
    from edgemm.model import KVCache
    hf = _tiny_moe_llava(seed=4)
    src = tmp_path / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tokenizer.save(src / "tokenizer.json")
    import_checkpoint(src, tmp_path / "ck", log=None)
    man = export_gguf(model=str(tmp_path / "ck"), out=tmp_path / "g", precision="f32", log=None)
    dec = tmp_path / "g" / man["stages"]["decoder"]["file"]
    r = GGUFReader(str(dec))
    assert int(r.fields["llama.expert_count"].parts[-1][0]) == 4
    assert int(r.fields["llama.expert_used_count"].parts[-1][0]) == 2
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert shapes["blk.1.ffn_gate_exps.weight"] == [32, 48, 4] and shapes["blk.1.ffn_down_exps.weight"] == [48, 32, 4]
    assert shapes["blk.1.ffn_gate_inp.weight"] == [32, 4] and "blk.1.ffn_gate.weight" not in shapes
    m, _ = load_checkpoint(tmp_path / "ck")
    ids = torch.randint(4, 500, (1, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        cache, pos = KVCache.empty(m.cfg.decoder, max_len=32), 0
        lg, pos = m.forward_segment("text", ids, cache, pos)
        want = []
        for _ in range(6):
            want.append(int(lg[0, -1].argmax()))
            lg, pos = m.forward_segment("text", torch.tensor([[want[-1]]]), cache, pos)
    llm = Llama(model_path=str(dec), n_ctx=32, n_threads=2, verbose=False, logits_all=True)
    llm.eval(ids[0].tolist())
    first = np.asarray(llm.scores[llm.n_tokens - 1], np.float32)
    with torch.no_grad():
        ref = m.forward_segment("text", ids, KVCache.empty(m.cfg.decoder, max_len=32), 0)[0][0, -1].numpy()
    assert np.abs(first - ref).max() <= 1e-2 * max(1.0, float(np.abs(ref).max()))   # (f16 KV cache in llama.cpp)
    got = []
    for _ in range(6):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    assert got == want


def test_gguf_refuses_what_llama_cpp_llama_moe_cannot_compute(tmp_path):
    """llama.cpp's llama arch puts experts in every layer and renormalises the top-k weights; Qwen3-MoE's dense
    layers, plain top-k weights and per-head Q/K norm are refused, naming the targets that can."""
    from edgemm.config import AdapterConfig, VisionConfig
    from edgemm.errors import UnsupportedVariant
    from edgemm.export.gguf import check_supported
    base = dict(d_model=64, n_layers=2, n_experts=4, experts_top_k=2, single_branch=True)
    for extra in ({"moe_every": 2}, {"norm_topk_prob": False}, {"qk_norm": True}):
        cfg = ModelConfig(vision=VisionConfig(arch="clip", gelu="quick"), adapter=AdapterConfig(kind="mlp"),
                          decoder=DecoderConfig(**base, **extra)).validate()
        with pytest.raises(UnsupportedVariant, match="targets that can: .*onnx"):
            check_supported(cfg, log=lambda *_: None)
    check_supported(ModelConfig(vision=VisionConfig(arch="clip", gelu="quick"), adapter=AdapterConfig(kind="mlp"),
                                decoder=DecoderConfig(**base)).validate(), log=lambda *_: None)
