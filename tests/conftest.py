import pytest
import torch

from edgemm.checkpoint import DEMO_DIR


def make_tokenizer():
    from edgemm import shapes
    from edgemm.tokenizer import Tokenizer, train_tokenizer
    return Tokenizer(train_tokenizer(shapes.corpus_lines(), 512))


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory, tokenizer):
    """A random-weight checkpoint of the tiny-shapes config (fast, independent of the shipped weights)."""
    from edgemm.checkpoint import save_checkpoint
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "random-tiny"
    save_checkpoint(EdgeMM(get_preset("tiny-shapes")).init_weights(1), tokenizer, out)
    return out


requires_demo = pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                                   reason="the shipped tiny-shapes weights are not in this checkout")
