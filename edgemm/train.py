"""Train the embedded demo model `tiny-shapes` from scratch on the CPU.

Recipe (sized for 2 CPU cores, < 45 minutes):
- data made once: a pool of rendered training scenes (uint8), questions drawn fresh every step;
- 9 image tokens (48x48 image, 16x16 patches, objects inside the cells of a 3x3 grid);
- several question/answer turns per image (the image costs one tower pass, each turn is supervision);
  loss on the answer tokens and </s>, plus (question_weight) on the question tokens, whose words depend on the
  image ("Where is the red ..." is followed by the red object's shape); multi-turn samples also teach the chat
  format;
- training-only auxiliary heads on the image rows (per row: its cell's colour and shape; on the mean of the
  rows: each colour's cell and shape, each shape's colour, the counts), which make the rows carry
  colour-shape-cell bindings;
- pointer supervision (pointer_weight): head 0 of decoder layer 0, at the word that names the asked object
  ("red" in "Where is the red circle?"), and head 0 of layer 1, at the row before the answer, are taught to
  attend to that object's image row. Binding a word to one object of several is the step that otherwise
  emerges late and by chance: without it, colour and position questions sat near 0.5 (picking one of the
  objects) for thousands of steps in three of four runs; with it they pass 0.85 by step 1000;
- a curriculum of 1-2-object scenes early on; AdamW, linear warm-up then cosine decay.
"""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np


def _pixels(batch_u8, cfg):
    import torch
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(cfg.vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.vision.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def build_batch(tok, scenes, idx, rng, turns: int):
    """Token ids [B, T] after the image, answer targets [B, T] and question targets [B, T] (-100 elsewhere).

    Row j predicts token j + 1. Answer targets are the answer tokens and </s>; question targets are the tokens
    of the user turns (the words of a question depend on the image: "Where is the red ..." is followed by the
    red object's shape, so they carry dense supervision of the same binding the answers need).
    """
    from . import shapes
    seqs, tgts, qtgts, pointers = [], [], [], []
    for b, i in enumerate(idx):
        ids, tgt, qtgt = [], [], []
        for t in range(turns):
            q = shapes.ask(scenes[i], shapes.QTYPES[int(rng.integers(4))], rng)
            u = tok.user_turn(q.question, first=(t == 0))
            a = tok.answer(q.answer)
            ptr = _pointer(scenes[i], q)
            if ptr is not None:                                  # (keyword row, answer row, object cell)
                word, cell = ptr
                pointers.append((b, len(ids) + _word_token(tok, q.question, word, t == 0), len(ids) + len(u) - 1,
                                 cell))
            if qtgt:
                qtgt[-1] = u[0]                          # the </s> row of the previous turn predicts the next
            ids += u + a
            tgt += [-100] * (len(u) - 1) + a + [-100]   # the row before each answer token predicts it
            qtgt += u[1:] + [-100] * (len(a) + 1)
        seqs.append(ids)
        tgts.append(tgt)
        qtgts.append(qtgt)
    T = max(map(len, seqs))
    ids = np.full((len(idx), T), tok.pad_id, dtype=np.int64)
    tg = np.full((len(idx), T), -100, dtype=np.int64)
    qtg = np.full((len(idx), T), -100, dtype=np.int64)
    for b, (s, t, qt) in enumerate(zip(seqs, tgts, qtgts)):
        ids[b, : len(s)], tg[b, : len(t)], qtg[b, : len(qt)] = s, t, qt
    return ids, tg, qtg, np.array(pointers, dtype=np.int64).reshape(-1, 4)


def _pointer_loss(model, args, layer: int, b, rows, targets):
    """Cross-entropy of head 0's attention in decoder `layer`, at query rows (b, rows), toward target rows.

    args: the layer's inputs (x, route mask, cos, sin, ...) as forward_full called it. Queries see rows <= their
    own (causal). This teaches the look-up "the word red -> the red object's image row" directly.
    """
    import torch
    from .model import apply_rope, routed
    x, route, cos, sin = args[:4]
    lay, c = model.decoder.layers[layer], model.cfg.decoder
    E, H = c.head_dim, c.n_heads
    qkv = routed(lay.attn_norm(x), route, lay.text.qkv, lay.vision.qkv)          # [B, N, (H + 2K) E]
    q = apply_rope(qkv[..., :E].unsqueeze(1), cos, sin)[:, 0]                    # head 0: [B, N, E]
    k = apply_rope(qkv[..., H * E: H * E + E].unsqueeze(1), cos, sin)[:, 0]
    logits = torch.einsum("pe,pne->pn", q[b, rows], k[b]) / E ** 0.5              # [P, N]
    n = torch.arange(x.shape[1])
    logits = logits.masked_fill(n[None, :] > rows[:, None], float("-inf"))
    return torch.nn.functional.cross_entropy(logits, targets)


def _pointer(scene, q):
    """(the word that names the object a question is about, that object's cell), or None for counts."""
    from . import shapes
    words = q.question.rstrip("?").split()
    if q.qtype in ("shape", "position"):                          # "... the red object?", "... the red circle?"
        word = next(w for w in words if w in shapes.COLORS)
        return word, next(o.cell for o in scene.objects if o.color == word)
    if q.qtype == "color":                                        # "What color is the circle?" (a unique shape)
        return words[-1], next(o.cell for o in scene.objects if o.shape == words[-1])
    return None


@functools.lru_cache(maxsize=4096)         # the task has a few hundred (question, word, first) triples
def _word_token(tok, question: str, word: str, first: bool) -> int:
    """Index, in tok.user_turn(question, first), of the token holding the last character of `word`."""
    from .tokenizer import TURN_SEP, USER_FMT
    text = USER_FMT.format(question=question.strip())
    text = text if first else TURN_SEP + text
    end = text.index(" " + word + " " if " " + word + " " in text else " " + word) + len(word) + 1
    offsets = tok.tok.encode(text, add_special_tokens=False).offsets
    return next(k for k, (s, e) in enumerate(offsets) if s < end <= e)


def train_demo(out: str | Path, steps: int = 5000, batch: int = 48, pool: int = 40000, turns: int = 3,
               lr: float = 1.5e-3, warmup: int = 200, curriculum: float = 0.3, aux_weight: float = 0.5,
               question_weight: float = 0.5, aux_where: bool = True, pointer_weight: float = 0.5, seed: int = 0,
               threads: int | None = None, eval_every: int = 500, config=None, log=print) -> dict:
    import torch
    import torch.nn.functional as F
    from . import shapes
    from .checkpoint import save_checkpoint
    from .config import get_preset
    from .model import EdgeMM
    from .tokenizer import Tokenizer, train_tokenizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = config or get_preset("tiny-shapes")                 # config: another shape of the family (probes)
    tok = Tokenizer(train_tokenizer(shapes.corpus_lines(), cfg.decoder.vocab_size))
    model = EdgeMM(cfg).init_weights(seed)

    t0 = time.time()
    scenes = [shapes.scene_at("train", i) for i in range(pool)]
    # curriculum pool: the same kind of scenes cut to 1-2 objects (easy grounding first)
    n_easy = pool // 4
    easy = [shapes.Scene(s.objects[: 1 + i % 2], s.background, s.noise, s.seed)
            for i, s in enumerate(scenes[:n_easy])]
    scenes = scenes + easy
    images = np.stack([shapes.render(s) for s in scenes])
    val = shapes.make_split("val", 400)
    log(f"pool of {pool} scenes rendered in {time.time() - t0:.0f}s")

    # Training-only auxiliary heads (not part of the shipped model):
    # - per patch row: the colour and the shape in its grid cell (or none). Dense supervision grounds the tower.
    # - pooled (aux_where), on the *mean* of the patch rows: for every colour, the cell and the shape of its
    #   object; for every shape, the colour of its object when it is the only one; the count of every shape and
    #   of all objects. A mean of rows can only say "the red one is a circle at top left" if each row binds its
    #   colour, shape and cell, which makes every question type readable from an average of the image rows
    #   instead of a retrieval the decoder has to discover.
    n_col, n_shape = len(shapes.COLORS), len(shapes.SHAPES)
    d = cfg.decoder.d_model
    aux = torch.nn.ModuleDict({"color": torch.nn.Linear(d, n_col + 1), "shape": torch.nn.Linear(d, n_shape + 1)})
    pooled_heads = _pooled_heads(shapes)                       # name -> (groups, classes)
    if aux_where:
        for name, (groups, classes) in pooled_heads.items():
            aux[name] = torch.nn.Linear(d, groups * classes)
    cell_labels = _cell_labels(scenes, shapes)
    pooled_labels = _pooled_labels(scenes, shapes)
    params = list(model.named_parameters()) + list(aux.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2 and "pos" not in n]
    no_decay = [p for n, p in params if p.dim() < 2 or "pos" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = np.random.default_rng(seed)
    bos = torch.full((batch, 1), tok.bos_id)
    # pointer supervision: the inputs of decoder layers 0 and 1, for the attention of their head 0
    layer_inputs = {}
    for k in (0, 1):
        model.decoder.layers[k].register_forward_pre_hook(lambda m, args, k=k: layer_inputs.__setitem__(k, args))
    history = []
    aux_hits = 0.0
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        p_easy = max(0.1, 1.0 - step / (curriculum * steps))  # share of easy scenes, decaying to 10%
        n_e = int(rng.binomial(batch, p_easy))
        idx = np.concatenate([rng.integers(pool, pool + n_easy, n_e), rng.integers(0, pool, batch - n_e)])
        ids, tg, qtg, ptr = (torch.from_numpy(a) for a in build_batch(tok, scenes, idx, rng, turns))
        img = model.encode_image(_pixels(images[idx], cfg))
        layer_inputs.clear()
        logits = model.forward_full([("text", bos), ("image", img), ("text", ids)])
        logits = logits[:, 1 + img.shape[1]:]
        flat = logits.reshape(-1, logits.shape[-1])
        loss = F.cross_entropy(flat, tg.reshape(-1), ignore_index=-100)
        if question_weight:
            loss = loss + question_weight * F.cross_entropy(flat, qtg.reshape(-1), ignore_index=-100)
        if aux_weight:
            patches = img[:, 1:-1]                                       # [B, 9, D] without boi/eoi
            lab = torch.from_numpy(cell_labels[idx])                     # [B, 9, 2]
            for k, name in enumerate(("color", "shape")):
                a = aux[name](patches)
                loss = loss + aux_weight * F.cross_entropy(a.reshape(-1, a.shape[-1]), lab[..., k].reshape(-1))
                if name == "shape":
                    aux_hits = aux_hits + (a.argmax(-1) == lab[..., 1]).float().mean().item()
            if aux_where:
                pooled = patches.mean(1)
                for name, (groups, classes) in pooled_heads.items():
                    a = aux[name](pooled).view(-1, classes)               # [B * groups, classes]
                    target = torch.from_numpy(pooled_labels[name][idx]).reshape(-1)
                    loss = loss + aux_weight * F.cross_entropy(a, target)
        if pointer_weight and len(ptr):
            # rows of the whole sequence: <s>, boi, 9 patches, eoi, then the text; the object's patch row is 2 + cell
            off = 1 + img.shape[1]
            for layer, col in ((0, 1), (1, 2)):    # layer 0 at the naming word, layer 1 at the answer row
                loss = loss + pointer_weight * _pointer_loss(model, layer_inputs[layer], layer, ptr[:, 0],
                                                             ptr[:, col] + off, 2 + ptr[:, 3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"aux shape acc {aux_hits / 50:.3f} {(time.time() - t0) / step:.3f}s/step")
            aux_hits = 0.0
        if step % eval_every == 0 or step == steps:
            acc = teacher_forced_accuracy(model, tok, val)
            history.append({"step": step, "val": acc, "elapsed_s": round(time.time() - t0)})
            log(f"step {step} val accuracy {acc}")
            save_checkpoint(model, tok, out, dtype=torch.float16)     # fp16 storage: ~13 MB shipped
    return {"history": history, "train_seconds": round(time.time() - t0)}


def _cell_labels(scenes, shapes) -> np.ndarray:
    """[N, 9, 2] (colour index, shape index) per grid cell; the last class of each means empty."""
    lab = np.empty((len(scenes), shapes.GRID ** 2, 2), dtype=np.int64)
    lab[..., 0], lab[..., 1] = len(shapes.COLORS), len(shapes.SHAPES)
    colors = list(shapes.COLORS)
    for i, s in enumerate(scenes):
        for o in s.objects:
            lab[i, o.cell] = colors.index(o.color), shapes.SHAPES.index(o.shape)
    return lab


def _pooled_heads(shapes) -> dict:
    """The pooled auxiliary heads: name -> (label groups, classes per group)."""
    n_col, n_shape = len(shapes.COLORS), len(shapes.SHAPES)
    return {"where": (n_col, shapes.GRID ** 2 + 1),            # each colour's cell, or absent
            "what": (n_col, n_shape + 1),                      # each colour's shape, or absent
            "color_of": (n_shape, n_col + 2),                  # each shape's colour, or none, or several
            "count": (n_shape + 1, 5)}                         # objects of each shape, and in all (0-4)


def _pooled_labels(scenes, shapes) -> dict:
    """name -> int64 [N, groups] labels of the pooled heads (see _pooled_heads)."""
    heads = _pooled_heads(shapes)
    n_col, n_cell, n_shape = len(shapes.COLORS), shapes.GRID ** 2, len(shapes.SHAPES)
    lab = {name: np.empty((len(scenes), g), dtype=np.int64) for name, (g, _) in heads.items()}
    lab["where"][:], lab["what"][:], lab["color_of"][:] = n_cell, n_shape, n_col
    colors = list(shapes.COLORS)
    for i, s in enumerate(scenes):
        counts = [0] * n_shape
        for o in s.objects:
            c, k = colors.index(o.color), shapes.SHAPES.index(o.shape)
            lab["where"][i, c], lab["what"][i, c] = o.cell, k
            lab["color_of"][i, k] = c if counts[k] == 0 else n_col + 1
            counts[k] += 1
        lab["count"][i] = counts + [len(s.objects)]
    return lab


def teacher_forced_accuracy(model, tok, items, batch: int = 100) -> dict:
    """Exact match under greedy decoding, computed in one pass: every answer token and </s> must be argmax."""
    import torch
    from . import shapes
    model.eval()
    right = {t: 0 for t in shapes.QTYPES}
    total = {t: 0 for t in shapes.QTYPES}
    with torch.no_grad():
        for s in range(0, len(items), batch):
            chunk = items[s: s + batch]
            seqs = [(tok.user_turn(q.question, True), tok.answer(q.answer)) for _, q in chunk]
            T = max(len(u) + len(a) for u, a in seqs)
            ids = torch.full((len(chunk), T), tok.pad_id)
            for b, (u, a) in enumerate(seqs):
                ids[b, : len(u) + len(a)] = torch.tensor(u + a)
            img = model.encode_image(_pixels(np.stack([im for im, _ in chunk]), model.cfg))
            bos = torch.full((len(chunk), 1), tok.bos_id)
            logits = model.forward_full([("text", bos), ("image", img), ("text", ids)])[:, 1 + img.shape[1]:]
            pred = logits.argmax(-1)
            for b, ((u, a), (_, q)) in enumerate(zip(seqs, chunk)):
                ok = pred[b, len(u) - 1: len(u) - 1 + len(a)].tolist() == a
                right[q.qtype] += ok
                total[q.qtype] += 1
    out = {t: round(right[t] / max(total[t], 1), 3) for t in shapes.QTYPES}
    out["all"] = round(sum(right.values()) / max(sum(total.values()), 1), 3)
    return out
