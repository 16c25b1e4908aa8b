"""Train the embedded demo model `tiny-shapes` from scratch on the CPU.

Recipe (sized for 2 CPU cores, < 45 minutes):
- data made once: a pool of rendered training scenes (uint8), questions drawn fresh every step;
- 9 image tokens (48x48 image, 16x16 patches, objects inside the cells of a 3x3 grid);
- several question/answer turns per image (the image costs one tower pass, each turn is supervision),
  loss on answer tokens and </s> only; multi-turn samples also teach the chat format;
- AdamW, linear warm-up then cosine decay.
"""
from __future__ import annotations

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
    """Token ids [B, T] after the image, and targets [B, T] (-100 except answer tokens)."""
    from . import shapes
    seqs, tgts = [], []
    for i in idx:
        ids, tgt = [], []
        for t in range(turns):
            q = shapes.ask(scenes[i], shapes.QTYPES[int(rng.integers(4))], rng)
            u = tok.user_turn(q.question, first=(t == 0))
            a = tok.answer(q.answer)
            ids += u + a
            tgt += [-100] * (len(u) - 1) + a + [-100]   # the row before each answer token predicts it
        seqs.append(ids)
        tgts.append(tgt)
    T = max(map(len, seqs))
    ids = np.full((len(idx), T), tok.pad_id, dtype=np.int64)
    tg = np.full((len(idx), T), -100, dtype=np.int64)
    for b, (s, t) in enumerate(zip(seqs, tgts)):
        ids[b, : len(s)], tg[b, : len(t)] = s, t
    return ids, tg


def train_demo(out: str | Path, steps: int = 7000, batch: int = 48, pool: int = 40000, turns: int = 3,
               lr: float = 1.5e-3, warmup: int = 200, curriculum: float = 0.3, aux_weight: float = 0.5, seed: int = 0, threads: int | None = None,
               eval_every: int = 250, log=print) -> dict:
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
    cfg = get_preset("tiny-shapes")
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

    # Training-only auxiliary heads: each patch row predicts the colour and shape in its grid cell (or none).
    # Dense supervision grounds the vision tower quickly; the heads are not part of the shipped model.
    aux = torch.nn.ModuleDict({"color": torch.nn.Linear(cfg.decoder.d_model, len(shapes.COLORS) + 1),
                               "shape": torch.nn.Linear(cfg.decoder.d_model, len(shapes.SHAPES) + 1)})
    cell_labels = _cell_labels(scenes, shapes)
    params = list(model.named_parameters()) + list(aux.named_parameters())
    decay = [p for n, p in params if p.dim() >= 2 and "pos" not in n]
    no_decay = [p for n, p in params if p.dim() < 2 or "pos" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng = np.random.default_rng(seed)
    bos = torch.full((batch, 1), tok.bos_id)
    history = []
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        p_easy = max(0.1, 1.0 - step / (curriculum * steps))  # share of easy scenes, decaying to 10%
        n_e = int(rng.binomial(batch, p_easy))
        idx = np.concatenate([rng.integers(pool, pool + n_easy, n_e), rng.integers(0, pool, batch - n_e)])
        ids, tg = build_batch(tok, scenes, idx, rng, turns)
        ids, tg = torch.from_numpy(ids), torch.from_numpy(tg)
        img = model.encode_image(_pixels(images[idx], cfg))
        logits = model.forward_full([("text", bos), ("image", img), ("text", ids)])
        logits = logits[:, 1 + img.shape[1]:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=-100)
        if aux_weight:
            patches = img[:, 1:-1]                                       # [B, 9, D] without boi/eoi
            lab = torch.from_numpy(cell_labels[idx])                     # [B, 9, 2]
            for k, name in enumerate(("color", "shape")):
                a = aux[name](patches)
                loss = loss + aux_weight * F.cross_entropy(a.reshape(-1, a.shape[-1]), lab[..., k].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            log(f"step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{(time.time() - t0) / step:.3f}s/step")
        if step % eval_every == 0 or step == steps:
            acc = teacher_forced_accuracy(model, tok, val)
            history.append({"step": step, "val": acc, "elapsed_s": round(time.time() - t0)})
            log(f"step {step} val accuracy {acc}")
            save_checkpoint(model, tok, out, dtype=torch.float16)     # fp16 storage: ~10 MB shipped
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
