"""Any-resolution tiling (LLaVA-NeXT): edgemm import of transformers' LlavaNextForConditionalGeneration, checked
against transformers' own processor and model on images of several aspect ratios; the ONNX export of such a model."""
import numpy as np
import pytest
import torch

from edgemm.checkpoint import load_checkpoint
from edgemm.importers import import_checkpoint

from .test_import import write_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

IMAGE_TOKEN = 3
S = 16                                      # the tower's image size (patch 4: 16 rows per tile)
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
SIZES = [(40, 20), (20, 44), (30, 30), (64, 14)]            # (width, height): wide, tall, square, very wide


def _tiny_llava_next(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    text = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=S, patch_size=4, hidden_act="quick_gelu", projection_dim=16)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():                 # every weight (image_newline too) well away from its init
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _processor():
    from transformers import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=PINPOINTS)


def _image(w, h, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava-next")
    model = _tiny_llava_next()
    src = d / "hf"
    model.save_pretrained(src, safe_serialization=True, max_shard_size="100KB")     # sharded, with an index
    assert (src / "model.safetensors.index.json").is_file()
    _processor().save_pretrained(src)
    write_tokenizer(src)
    summary = import_checkpoint(src, d / "ck", log=None)
    return model, summary, d / "ck"


def test_import_matches_transformers_on_three_aspect_ratios(imported):
    from PIL import Image
    from edgemm.anyres import n_tiles, preprocess_tiles
    model, summary, ck = imported
    assert summary["family"] == "llava_next" and "any-resolution tiling" in summary["variants"]
    m, _ = load_checkpoint(ck)
    from edgemm.info import checkpoint_param_counts
    assert checkpoint_param_counts(ck) == m.param_counts()     # `edgemm info`'s count, from the file headers
    assert m.cfg.vision.grid_pinpoints == PINPOINTS and m.cfg.adapter.image_newline
    proc = _processor()
    counts = set()
    for i, (w, h) in enumerate(SIZES):
        img = _image(w, h, i)
        hf = proc(images=[Image.fromarray(img)], return_tensors="pt")
        px, (hh, ww) = preprocess_tiles(img, m.cfg.vision)
        assert (hh, ww) == (h, w) and hf["image_sizes"][0].tolist() == [h, w]
        assert px.shape[0] == hf["pixel_values"].shape[1] == n_tiles(m.cfg.vision, h, w)        # tile count
        assert np.abs(px - hf["pixel_values"][0].numpy()).max() <= 1e-5                           # the tiles
        with torch.no_grad():
            want = model.model.get_image_features(pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
                                                  ).pooler_output[0]
            got = m.encode_image_tiled(torch.from_numpy(px), h, w)[0]
        assert got.shape == want.shape and m.cfg.image_rows_for(w, h) == want.shape[0]          # image rows
        counts.add(want.shape[0])
        assert (got - want).abs().max().item() <= 1e-4                                            # vision rows
        g = torch.Generator().manual_seed(i)
        pre, post = torch.randint(4, 500, (1, 4), generator=g), torch.randint(4, 500, (1, 5), generator=g)
        ids = torch.cat([pre, torch.full((1, want.shape[0]), IMAGE_TOKEN), post], 1)
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"]).logits[0]
            lg = m.forward_full([("text", pre), ("image", got[None]), ("text", post)])[0]
        assert lg.shape == ref.shape and (lg - ref).abs().max().item() <= 1e-4                    # logits
    assert len(counts) >= 3                 # the aspect ratios really give different row counts


def test_image_rows_equal_the_processors_token_count(imported):
    """LlavaNextProcessor expands <image> to as many tokens as edgemm's cfg.image_rows_for says."""
    from PIL import Image
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    _, _, ck = imported
    m, _ = load_checkpoint(ck)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ck / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    proc = LlavaNextProcessor(image_processor=_processor(), tokenizer=tok, patch_size=4, image_token="<image>",
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    for i, (w, h) in enumerate(SIZES):
        ids = proc(images=[Image.fromarray(_image(w, h, i))], text="<image> w5", return_tensors="pt")["input_ids"][0]
        assert int((ids == IMAGE_TOKEN).sum()) == m.cfg.image_rows_for(w, h)


def test_max_tiles_is_transformers_over_the_pinpoints_that_fit(imported):
    """max_tiles=2 computes what transformers computes with only the <= 2-tile pinpoints; max_tiles=1 (none fit
    here) is the overview alone plus the newline row."""
    import copy
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil
    from edgemm.anyres import n_tiles, preprocess_tiles
    model, _, ck = imported
    m, _ = load_checkpoint(ck)
    small = [p for p in PINPOINTS if (p[0] // S) * (p[1] // S) <= 2]
    hf_small = copy.deepcopy(model)
    hf_small.config.image_grid_pinpoints = small
    hf_small.model.config.image_grid_pinpoints = small
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=small)
    for i, (w, h) in enumerate(SIZES[:3]):
        img = _image(w, h, i)
        hf = proc(images=[Image.fromarray(img)], return_tensors="pt")
        px, _ = preprocess_tiles(img, m.cfg.vision, max_tiles=2)
        assert px.shape[0] == hf["pixel_values"].shape[1] <= 3
        with torch.no_grad():
            want = hf_small.model.get_image_features(pixel_values=hf["pixel_values"],
                                                     image_sizes=hf["image_sizes"]).pooler_output[0]
            got = m.encode_image_tiled(torch.from_numpy(px), h, w, max_tiles=2)[0]
        assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4
        one, _ = preprocess_tiles(img, m.cfg.vision, max_tiles=1)
        assert one.shape[0] == n_tiles(m.cfg.vision, h, w, 1) == 1
        with torch.no_grad():
            rows = m.encode_image_tiled(torch.from_numpy(one), h, w, max_tiles=1)[0]
        assert rows.shape[0] == 16 + 1 == m.cfg.image_rows_for(w, h, max_tiles=1)
        assert torch.equal(rows[-1], m.adapter.image_newline.detach())
        assert (rows[:16] - want[:16]).abs().max().item() <= 1e-4          # the overview's rows


def test_onnx_and_trt_bundles_validate_and_run(imported, tmp_path):
    """The exporters' own validation passes (tile batch through the vision stage, packed rows through the decoder);
    the ort backend's host path (tiles, unpad, newline from the manifest) gives the reference's rows and answer;
    --max-tiles at export is the bundle's default, overridable at run time; trt profiles span the tile batch."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.tilings import image_rows
    from edgemm.tilings import set_max_tiles
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    from edgemm.export.trt import export_trt
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes import load_backend
    _, _, ck = imported
    man = export_onnx(str(ck), tmp_path / "onnx", precision="fp32", log=None)
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    assert man["anyres"]["max_tile_batch"] == 5 and man["anyres"]["max_image_rows"] == 16 + 8 * 9
    ort = load_backend("ort", bundle=str(tmp_path / "onnx"), device="cpu")
    ref = load_backend("torch", model=str(ck), device="cpu")
    for i, (w, h) in enumerate(SIZES[:3]):
        img = _image(w, h, i)
        got, want = image_rows(ort, img), image_rows(ref, img)
        assert got.shape == want.shape == (1, ref.cfg.image_rows_for(w, h), 32)
        assert np.abs(got - want).max() <= 1e-4
        gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
        assert answer(ort, img, "w5 w6", gen) == answer(ref, img, "w5 w6", gen)
    set_max_tiles(ort.cfg, 1, ort.manifest)
    assert image_rows(ort, _image(40, 20, 0)).shape[1] == 17
    Image.fromarray(_image(40, 20, 0)).save(tmp_path / "wide.png")
    r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "onnx"), "--backend", "ort", "--device", "cpu",
                                  "--max-tiles", "2", "--image", str(tmp_path / "wide.png"), "--max-new-tokens",
                                  "2", "w5"])
    assert r.exit_code == 0, r.output
    man = export_trt(str(ck), tmp_path / "trt", precision="fp16", no_build=True, log=None, max_tiles=2)
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    assert man["model"]["vision"]["max_tiles"] == 2 and man["anyres"]["max_tile_batch"] == 3
    for prof in man["trt"]["profiles"].values():
        assert prof["vision"]["pixels"]["min"][0] == 1 and prof["vision"]["pixels"]["max"][0] >= 3
        assert prof["decoder_image"]["image_rows"]["max"][1] == 16 + 8 * 5        # the [32, 16] pinpoint
    qdq = load_backend("trt", bundle=str(tmp_path / "trt"), device="cpu")
    with pytest.raises(Exception, match="profiles stop at 3"):
        set_max_tiles(qdq.cfg, 4, qdq.manifest)


def test_info_and_bench_report_image_rows_per_image(imported):
    from edgemm.bench import _timings
    from edgemm.info import describe_config
    from edgemm.runtimes import load_backend
    _, _, ck = imported
    b = load_backend("torch", model=str(ck), device="cpu")
    line = next(s for s in describe_config(b.cfg, "test") if s.startswith("vision:"))
    assert f"640x480: {b.cfg.image_rows_for(640, 480)} rows" in line and "at most 88 rows (5 tiles)" in line
    one, default = _timings(b, 1, 0, 2, settings=(1, None))          # the 48x48 test image: a 2x2 grid
    assert (one["image_rows"], one["max_tiles"]) == (17, 1)
    assert (default["image_rows"], default["max_tiles"]) == (16 + 8 * 9, None)
    assert b.cfg.vision.max_tiles is None                            # the backend's own budget is restored


def test_refusals_are_one_line_errors():
    from edgemm.tilings import set_max_tiles
    from edgemm.config import ModelConfig, get_preset
    from edgemm.errors import EdgemmError
    with pytest.raises(EdgemmError, match="fixed-size"):
        set_max_tiles(get_preset("tiny-shapes"), 2)
    base = {"vision": {"arch": "clip", "image_size": 16, "patch_size": 4, "width": 24, "heads": 2},
            "adapter": {"kind": "mlp", "image_newline": True}, "decoder": {"single_branch": True}}
    ok = ModelConfig.from_dict({**base, "vision": {**base["vision"], "grid_pinpoints": PINPOINTS}})
    assert "any-resolution tiling" in ok.variants() and ok.n_image_rows == 88
    with pytest.raises(EdgemmError, match="multiples of image_size"):
        ModelConfig.from_dict({**base, "vision": {**base["vision"], "grid_pinpoints": [[16, 20]]}})
    with pytest.raises(EdgemmError, match="max_tiles"):
        ModelConfig.from_dict({**base, "vision": {**base["vision"], "grid_pinpoints": PINPOINTS, "max_tiles": 0}})
