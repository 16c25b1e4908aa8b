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
    live = backend.text(sess.state, q3)
    assert sess.state.length == length_before + len(q3)        # only the new turn was fed
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


def test_streaming_pieces_join_to_the_answer_and_stop_strings_cut(backend):
    sess = ChatSession(backend, GenerationConfig(max_new_tokens=12))
    sess.set_image(_image())
    pieces = []
    ans = sess.ask("What shape is the red object?", on_text=pieces.append)
    assert "".join(pieces).strip() == ans
    if len(ans) > 2:
        stop = ans[1:3]
        sess2 = ChatSession(backend, GenerationConfig(max_new_tokens=12, stop=(stop,)))
        sess2.set_image(_image())
        assert stop not in sess2.ask("What shape is the red object?")


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
    # the cache after dropping is exactly a replay of the kept turns with the image
    st, logits = sess._replay(sess.turns)
    assert st.length == sess.state.length
