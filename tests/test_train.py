"""The demo-model training recipe: batch targets line up with the tokens, and a short run writes a loadable model."""
import numpy as np
import torch

from edgemm import shapes
from edgemm.config import get_preset
from edgemm.tokenizer import Tokenizer, train_tokenizer
from edgemm.train import build_batch, train_demo


def _tok():
    return Tokenizer(train_tokenizer(shapes.corpus_lines(), get_preset("tiny-shapes").decoder.vocab_size))


def test_batch_targets_are_the_next_tokens_and_split_answers_from_questions():
    tok = _tok()
    scenes = [shapes.scene_at("train", i) for i in range(8)]
    ids, tg, qtg, _ = build_batch(tok, scenes, list(range(8)), np.random.default_rng(0), turns=3)
    assert ids.shape == tg.shape == qtg.shape
    for b in range(len(scenes)):
        n = int((ids[b] != tok.pad_id).sum())
        for j in range(ids.shape[1]):
            for t in (tg[b, j], qtg[b, j]):
                if t >= 0:
                    assert j + 1 < n and t == ids[b, j + 1]       # row j predicts token j + 1, never padding
        assert not ((tg[b] >= 0) & (qtg[b] >= 0)).any()           # a row is an answer target or a question one
        # answer targets: exactly the answer words and </s> of the three turns
        answers = [int(x) for x in tg[b] if x >= 0]
        assert answers.count(tok.eos_id) == 3
        text = tok.decode([x for x in answers if x != tok.eos_id])
        assert text.strip() and "?" not in text and "Q:" not in text
        # question targets: every user-turn token after the first one of the sequence, nothing of an answer
        qtext = tok.decode([int(x) for x in qtg[b] if x >= 0])
        assert qtext.count("?") == 3 and qtext.count("A:") == 3
        assert int(qtg[b, -1]) == -100 or n < ids.shape[1]


def test_short_training_run_writes_a_loadable_model(tmp_path):
    from edgemm.checkpoint import load_model
    logs = []
    res = train_demo(tmp_path / "m", steps=4, batch=4, pool=40, turns=2, eval_every=2, threads=1,
                     question_weight=0.5, log=logs.append)
    assert [h["step"] for h in res["history"]] == [2, 4]
    assert all(0.0 <= h["val"]["all"] <= 1.0 for h in res["history"])
    model, tok = load_model(tmp_path / "m")
    assert model.cfg.name == "tiny-shapes"
    assert next(model.parameters()).dtype == torch.float32
    assert any("val accuracy" in m for m in logs)


def test_pooled_aux_labels_describe_each_scene():
    from edgemm.train import _cell_labels, _pooled_heads, _pooled_labels
    scenes = [shapes.scene_at("train", i) for i in range(60)]
    lab, cells, heads = _pooled_labels(scenes, shapes), _cell_labels(scenes, shapes), _pooled_heads(shapes)
    colors, n_col, n_shape = list(shapes.COLORS), len(shapes.COLORS), len(shapes.SHAPES)
    for name, (groups, classes) in heads.items():
        assert lab[name].shape == (60, groups) and 0 <= lab[name].min() and lab[name].max() < classes
    for i, s in enumerate(scenes):
        for c, colour in enumerate(colors):
            objs = [o for o in s.objects if o.color == colour]
            if objs:
                o = objs[0]
                assert (lab["where"][i, c], lab["what"][i, c]) == (o.cell, shapes.SHAPES.index(o.shape))
                assert tuple(cells[i, o.cell]) == (c, shapes.SHAPES.index(o.shape))   # both labellings agree
            else:
                assert (lab["where"][i, c], lab["what"][i, c]) == (shapes.GRID ** 2, n_shape)  # absent
        for k, shape in enumerate(shapes.SHAPES):
            objs = [o for o in s.objects if o.shape == shape]
            want = n_col if not objs else colors.index(objs[0].color) if len(objs) == 1 else n_col + 1
            assert lab["color_of"][i, k] == want
            assert lab["count"][i, k] == len(objs)
            if len(objs) == 1:       # the colour question's answer, as the task asks it
                q = shapes.Question("color", f"What color is the {shape}?", objs[0].color)
                assert colors[lab["color_of"][i, k]] == q.answer
        assert lab["count"][i, -1] == len(s.objects) == (cells[i, :, 0] < n_col).sum()
    assert (lab["color_of"] == n_col + 1).any() and (lab["count"][:, :n_shape] == 0).any()   # all cases occur


def test_pointers_name_the_asked_object_and_its_rows():
    tok = _tok()
    scenes = [shapes.scene_at("train", i) for i in range(16)]
    ids, _, _, ptr = build_batch(tok, scenes, list(range(16)), np.random.default_rng(1), turns=3)
    assert len(ptr) > 10
    for b, word_row, answer_row, cell in ptr:
        word = tok.decode([int(ids[b, word_row])]).strip()
        objs = [o for o in scenes[b].objects if o.cell == cell]
        assert len(objs) == 1 and word in (objs[0].color, objs[0].shape)       # the row names the object
        assert tok.decode(ids[b, : answer_row + 1].tolist()).endswith("A:")     # the row before the answer
        assert word_row < answer_row


def test_pointer_loss_reads_the_attention_the_layer_computes():
    """The pointer loss's logits, softmaxed and applied to head 0's values, give head 0's real attention output."""
    from edgemm.model import EdgeMM, routed
    from edgemm.train import _pointer_loss
    cfg = get_preset("tiny-shapes")
    model = EdgeMM(cfg).init_weights(3).eval()
    tok = _tok()
    scenes = [shapes.scene_at("train", i) for i in range(4)]
    ids, _, _, ptr = (torch.from_numpy(a) for a in build_batch(tok, scenes, [0, 1, 2, 3],
                                                               np.random.default_rng(2), turns=2))
    img = model.encode_image(torch.randn(4, 3, 48, 48))
    seen, outs = {}, {}
    lay = model.decoder.layers[1]
    h1 = lay.register_forward_pre_hook(lambda m, args: seen.__setitem__("args", args))
    h2 = lay.text.o.register_forward_pre_hook(lambda m, args: outs.__setitem__("a", args[0]))
    with torch.no_grad():
        model.forward_full([("text", torch.full((4, 1), tok.bos_id)), ("image", img), ("text", ids)])
    h1.remove(), h2.remove()
    x, route, cos, sin = seen["args"][:4]
    E, H = cfg.decoder.head_dim, cfg.decoder.n_heads
    off = 1 + img.shape[1]
    rows = ptr[:, 2] + off
    # recompute head 0 from the same pieces the loss uses, and compare with the layer's own output
    import torch.nn.functional as F
    from edgemm.model import apply_rope
    qkv = routed(lay.attn_norm(x), route, lay.text.qkv, lay.vision.qkv)
    q = apply_rope(qkv[..., :E].unsqueeze(1), cos, sin)[:, 0]
    k = apply_rope(qkv[..., H * E: H * E + E].unsqueeze(1), cos, sin)[:, 0]
    v = qkv[..., 2 * H * E: 2 * H * E + E]
    b = ptr[:, 0]
    logits = torch.einsum("pe,pne->pn", q[b, rows], k[b]) / E ** 0.5
    logits = logits.masked_fill(torch.arange(x.shape[1])[None] > rows[:, None], float("-inf"))
    head0 = torch.einsum("pn,pne->pe", logits.softmax(-1), v[b])
    text_rows = (~route).nonzero()[:, 0].tolist()
    real = outs["a"][b, [text_rows.index(int(r)) for r in rows], :E]
    assert torch.allclose(head0, real, atol=1e-5)
    # and the loss is the cross-entropy of exactly these logits toward the object rows
    targets = 2 + ptr[:, 3]
    with torch.no_grad():
        got = _pointer_loss(model, seen["args"], 1, b, rows, targets)
    assert torch.allclose(got, F.cross_entropy(logits, targets), atol=1e-6)
    assert got > 0.5                     # random weights do not point yet: the loss has something to teach
