"""Generation, sampling, chat with a KV cache across turns, context overflow."""
import numpy as np
import pytest
import torch

from edgemm import shapes
from edgemm.errors import EdgemmError
from edgemm.generation import ChatSession, GenerationConfig, Sampler
from edgemm.runtimes.torch_backend import TorchBackend


@pytest.fixture()
def backend(random_ckpt):
    return TorchBackend.open(model=str(random_ckpt), device="cpu")


def _image(i=0):
    return shapes.render(shapes.scene_at("test", i))


def test_chat_turns_reuse_the_cache_and_match_full_recompute(backend):
    sess = ChatSession(backend, GenerationConfig(max_new_tokens=4))
    sess.set_image(_image())
    sess.ask("What color is the circle?")
    sess.ask("Where is the red square?")
    q3 = backend.tokenizer.user_turn("How many shapes are there?", first=False)
    length_before = sess.state.length
    assert sess.pending[-1] == backend.tokenizer.eos_id          # the closing </s> waits for the next question
    live = backend.text(sess.state, sess.pending + q3)
    assert sess.state.length == length_before + len(sess.pending) + len(q3)   # only the new turn was fed
    # the whole conversation recomputed in one pass, routed per row
    tok = backend.tokenizer
    ids = []
    for i, (q, a) in enumerate(sess.turns):
        ids += tok.user_turn(q, first=(i == 0)) + a
    ids += q3
    with torch.no_grad():
        full = backend.model.forward_full([("text", torch.tensor([[tok.bos_id]])),
                                           ("image", torch.from_numpy(sess.rows)), ("text", torch.tensor([ids]))])
    assert np.abs(live - full[0, -1].numpy()).max() <= 1e-5


def test_sampler_modes():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler(GenerationConfig())(logits) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=3))(logits) == 1
    assert Sampler(GenerationConfig(temperature=1.0, top_p=0.01, seed=3))(logits) == 1
    draws = lambda seed: [Sampler(GenerationConfig(temperature=2.0, seed=seed))(logits) for _ in range(1)]
    s1 = Sampler(GenerationConfig(temperature=5.0, seed=7))
    s2 = Sampler(GenerationConfig(temperature=5.0, seed=7))
    a, b = [s1(logits) for _ in range(50)], [s2(logits) for _ in range(50)]
    assert a == b and len(set(a)) > 1                          # seeded, and really sampling
    s3 = Sampler(GenerationConfig(temperature=5.0, top_k=2, seed=1))
    assert set(s3(logits) for _ in range(100)) <= {1, 2}
    with pytest.raises(EdgemmError):
        GenerationConfig(top_p=0)


class Scripted:
    """A backend whose text branch answers a fixed token script (one-hot logits); counts its calls."""

    def __init__(self, real, script):
        self.cfg, self.tokenizer, self.real = real.cfg, real.tokenizer, real
        self.script, self.calls, self.fed = list(script), {"text": 0, "image": 0}, []
        self.context_length = real.context_length

    def new_state(self, max_len=None):
        return self.real.new_state(max_len)

    def vision(self, px):
        return self.real.vision(px)

    def image(self, st, rows):
        self.calls["image"] += 1
        st.length += rows.shape[1]
        return np.zeros(self.tokenizer.vocab_size, np.float32)

    def text(self, st, ids):
        self.calls["text"] += 1
        self.fed.append(list(ids))
        st.length += len(ids)
        z = np.zeros(self.tokenizer.vocab_size, np.float32)
        if list(ids) != [self.tokenizer.bos_id]:                # the prefix's <s>: its logits are not read
            z[self.script.pop(0) if self.script else self.tokenizer.eos_id] = 1
        return z


def test_streaming_pieces_join_to_the_answer_and_stop_strings_cut(backend):
    tok = backend.tokenizer
    ids = tok.encode(" red circle at the top")
    b = Scripted(backend, ids)
    sess = ChatSession(b, GenerationConfig(max_new_tokens=12))
    sess.set_image(_image())
    pieces = []
    ans = sess.ask("What shape is the red object?", on_text=pieces.append)
    assert ans == "red circle at the top" and "".join(pieces).strip() == ans and len(pieces) == len(ids)
    b2 = Scripted(backend, ids)
    sess2 = ChatSession(b2, GenerationConfig(max_new_tokens=12, stop=("le a",)))
    sess2.set_image(_image())
    pieces = []
    assert sess2.ask("What shape is the red object?", on_text=pieces.append) == "red circ"
    assert "".join(pieces).strip() == "red circ"
    assert sess2.pending[-1] == tok.eos_id and len(sess2.pending) == 2     # the cut token and </s>, unfed


def test_one_question_makes_no_decoder_call_after_the_answer(backend):
    """bos, image, question, then one call per generated token but the last: the answer's </s> (and the last
    token's logits) are never computed for a question nobody follows up."""
    tok = backend.tokenizer
    ids = tok.encode(" blue")
    for max_new, want_text in ((8, 2 + len(ids)), (len(ids), 2 + len(ids) - 1)):
        b = Scripted(backend, ids)
        sess = ChatSession(b, GenerationConfig(max_new_tokens=max_new))
        sess.set_image(_image())
        assert sess.ask("What color is the circle?") == "blue"
        assert b.calls == {"text": want_text, "image": 1}, (max_new, b.calls)
        # a second question carries the first turn's unfed ids in its own call
        b.script = ids[:]
        sess.ask("And the square?")
        q2 = tok.user_turn("And the square?", first=False)
        unfed = [] if max_new > len(ids) else ids[-1:]
        assert b.fed[want_text] == unfed + [tok.eos_id] + q2       # </s> went in with the next question


def test_incremental_detokenization_matches_a_full_decode(backend):
    from edgemm.generation import TextStream
    tok = backend.tokenizer
    text = "what color é is the ✓ circle? 3 shapes"
    ids = tok.encode(text)
    st = TextStream(tok)
    assert "".join(st.add(t) for t in ids) == tok.decode(ids) == text


def test_an_answer_cut_inside_a_character_ends_as_the_tokenizer_decodes_it(backend):
    """An answer whose last tokens end inside a UTF-8 character (a length limit, or a small model's byte tokens):
    the held-back bytes join the text when it ends, U+FFFD where they end early, so the answer's text is the
    decode of its ids (what transformers' decode and the tests' references give), not the text before them."""
    import numpy as np
    from edgemm.generation import AnswerStream, GenerationConfig
    tok = backend.tokenizer
    ids = tok.encode("ok é")
    cut = next(n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).endswith("\ufffd"))   # inside "é"
    ans = AnswerStream(tok, GenerationConfig(max_new_tokens=cut))
    pieces, done = [], False
    for t in ids[:cut]:
        logits = np.full(tok.vocab_size, -1e9, np.float32)
        logits[t] = 0.0
        piece, done = ans.push(logits)
        pieces.append(piece)
    assert done and ans.finish_reason == "length" and ans.ids == ids[:cut]
    assert "".join(pieces) == ans.text == tok.decode(ids[:cut]) and ans.text.endswith("\ufffd"), (pieces, ans.text)


def test_empty_and_too_long_prompts(backend):
    sess = ChatSession(backend)
    sess.set_image(_image())
    with pytest.raises(EdgemmError, match="empty"):
        sess.ask("   ")
    with pytest.raises(EdgemmError, match="context holds"):
        sess.ask("why " * 600)


def test_full_context_drops_oldest_turns_and_keeps_the_image(random_ckpt):
    b = TorchBackend.open(model=str(random_ckpt), device="cpu")
    b.cfg.decoder.max_seq_len = 80            # tiny context: a few turns fill it
    notes = []
    sess = ChatSession(b, GenerationConfig(max_new_tokens=6), log=notes.append)
    sess.set_image(_image())
    for i in range(8):
        sess.ask(f"Where is the {list(shapes.COLORS)[i % 6]} circle?")
        assert sess.state.length <= 80
    assert len(notes) == 1 and "dropping the oldest turns" in notes[0]
    assert 0 < len(sess.turns) < 8 and sess.rows is not None
    # the cache after dropping is exactly a replay of the kept turns with the image: same next-token logits
    q = b.tokenizer.user_turn("How many shapes are there?", first=False)
    live = b.text(sess.state, sess.pending + q)
    replay = sess._replay(sess.turns, 80)
    assert replay.length == sess.state.length - len(q)
    np.testing.assert_allclose(b.text(replay, q), live, atol=1e-5)


def test_eval_feeds_no_closing_token_and_allocates_one_cache(backend):
    """evaluate() over several questions: the answer's </s> is never fed (one decoder call fewer per question
    than closing each turn), and the KV cache is allocated once, sized to the need, then rewound per image."""
    from edgemm.evaluate import evaluate
    tok = backend.tokenizer
    calls = {"text": [], "new_state": []}
    real_text, real_new = backend.text, backend.new_state

    def text(st, ids):
        calls["text"].append(list(ids))
        return real_text(st, ids)

    def new_state(max_len=None):
        calls["new_state"].append(max_len)
        return real_new(max_len)
    backend.text, backend.new_state = text, new_state
    res = evaluate(backend, limit=6, progress=False, max_new_tokens=8)
    assert res["total"] == 6
    assert not any(tok.eos_id in ids for ids in calls["text"])
    assert len(calls["new_state"]) == 1 and calls["new_state"][0] < backend.context_length
    n_prompt = sum(1 for ids in calls["text"] if len(ids) > 1 or ids == [tok.bos_id])
    assert n_prompt == 2 * 6                                   # bos and the question, per question
