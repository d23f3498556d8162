"""Wan's text conditioning (ca2vdm/text.py): umT5 from a local folder, precomputed states, the chooser.

A tiny tokenizer built offline with ``tokenizers`` (word level, ``</s>`` appended as T5's is) and a
tiny random ``UMT5EncoderModel`` saved as a diffusers pipeline's ``tokenizer/`` and
``text_encoder/``; the reference is diffusers' own ``WanPipeline.encode_prompt``. Each test names
the break it was checked to fail on.
"""

import pytest
import torch

pytest.importorskip("diffusers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel  # noqa: E402

from ca2vdm.text import PrecomputedText, TextEncoder, UMT5TextEncoder, save_prompt_states, text_encoder_for  # noqa: E402

WORDS = "a wave breaks on the beach red car drives down street at night & cat".split()
PROMPTS = ["a wave breaks on the beach", "  a red   car drives down the street at night ", "a cat &amp; a car"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A diffusers-layout folder: tokenizer/ (a fast tokenizer) and text_encoder/ (random umT5, 24 wide)."""
    root = tmp_path_factory.mktemp("wan")
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(cfg).save_pretrained(root / "text_encoder")
    return root


def pipeline_states(folder, prompts, dtype):
    """diffusers' WanPipeline.encode_prompt over its own copy of the folder's tokenizer and encoder."""
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype),
                       vae=None, scheduler=None)
    with torch.no_grad():
        states, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512,
                                       device=torch.device("cpu"))
    return states


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_umt5_states_equal_wan_pipeline(wan_folder, dtype):
    """Our states equal WanPipeline.encode_prompt's bitwise, in float32 and bfloat16: 512 positions,
    zero past each prompt's tokens (prompts of different lengths, one needing html unescaping and
    whitespace collapsed); the mask marks the tokens. Breaks tried: no zeroing past the tokens (the
    encoder's output at the padding kept); padding to the longest prompt instead of 512; the prompt
    not cleaned; the encoder always in float32 (the bfloat16 case fails)."""
    enc = UMT5TextEncoder(wan_folder, dtype=dtype)
    assert enc.model.dtype == dtype
    states, mask = enc.encode(PROMPTS)
    ref = pipeline_states(wan_folder, PROMPTS, dtype)
    assert ref.dtype == dtype and states.shape == ref.shape == (3, 512, 24)
    assert torch.equal(states, ref.float())
    assert mask.sum(1).tolist() == [7, 10, 6]  # words + </s>; "&amp;" -> "&" (one word)
    assert torch.equal(states[~mask], torch.zeros_like(states[~mask])) and states[mask].abs().min() > 0


def test_precomputed_file_and_the_chooser(wan_folder, tmp_path):
    """States saved to a safetensors file read back equal to the encoder's (bitwise, bf16), a prompt not
    in the file is a clear error, and ``text_encoder_for`` picks umT5 for a folder, the file for a
    .safetensors and MiniLM for None. Breaks tried: saving the padded 512 rows and reading them
    as the tokens (mask wrong); the named error removed (a bare KeyError from the dict); the chooser
    sending files to umT5."""
    enc = text_encoder_for(wan_folder, dtype=torch.bfloat16)
    assert isinstance(enc, UMT5TextEncoder)
    file = tmp_path / "prompts.safetensors"
    save_prompt_states(file, enc, PROMPTS)
    pre = text_encoder_for(file)
    assert isinstance(pre, PrecomputedText) and pre.dim == 24
    got, want = pre.encode(PROMPTS[::-1]), enc.encode(PROMPTS[::-1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(KeyError, match="no states for"):
        pre.encode(["a prompt nobody saved"])
    assert isinstance(text_encoder_for(None), TextEncoder)
    with pytest.raises(FileNotFoundError, match="text encoder"):
        text_encoder_for(tmp_path / "missing")
