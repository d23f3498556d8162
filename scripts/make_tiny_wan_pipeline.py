"""Write a tiny random Wan 2.1 pipeline in diffusers' folder layout, offline, in seconds.

    python scripts/make_tiny_wan_pipeline.py OUT_DIR [--weights causal.safetensors] [--seed 0]

OUT_DIR gets what a real ``Wan2.1-T2V-1.3B-Diffusers`` folder holds, every model tiny and random
(seeded): ``model_index.json``, ``transformer/`` (``WanTransformer3DModel``, 2 blocks, 24 wide),
``vae/`` (``AutoencoderKLWan``: 8x spatial, 4x temporal compression as Wan's, 4 latent channels),
``text_encoder/`` (``UMT5EncoderModel``, 2 layers, 32 wide), ``tokenizer/`` (a Unigram tokenizer
built with the ``tokenizers`` library over a small vocabulary, loaded by ``AutoTokenizer`` as a
``T5TokenizerFast``; sentencepiece is not needed) and ``scheduler/`` (Wan's UniPC flow-matching
config, flow shift 3). ``model_index.json`` also names ``_ca2vdm_default_size``: the pixel frame
size ``ca2vdm.load_pipeline`` generates at by default (diffusers ignores keys starting with ``_``).

``--weights FILE`` also writes the transformer's weights in Wan's own key layout as the causal
checkpoints ship them (``blocks.0.self_attn.q.weight``, ...; with the ``model.`` prefix), other
random values (seed + 1): a ``.safetensors`` flat, a ``.pt`` as ``{"generator_ema": {...}}``
(read back only with ``torch.load(weights_only=True)``). Nothing is downloaded.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

WORDS = ("a the of on in at and with red blue green white black small big old young cat dog car wave waves "
         "beach sea sky sun night day street city forest tree trees bird birds man woman child runs walks "
         "drives flies breaks falls moving slowly fast down up over under through boat mountain snow rain").split()
PIXEL_SIZE = (32, 48)  # (H, W) the tiny pipeline generates at by default: 4 x 6 latent
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0]
LATENTS_STD = [1.5, 0.7, 2.0, 1.1]


def tokenizer(out: Path) -> None:
    """A Unigram tokenizer (umT5's model type) saved as ``T5TokenizerFast``: ▁-prefixed pieces, ``</s>`` appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    chars = sorted({c for w in WORDS for c in w})
    pieces = [(s, 0.0) for s in specials] + [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -4.0)]
    pieces += [(c, -6.0) for c in chars]  # any lower-case word still tokenizes, letter by letter
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(out)


def make(out, seed: int = 0, weights=None) -> Path:
    """Write the tiny pipeline to ``out`` (created; existing files of the same names are replaced)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer(out / "tokenizer")
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out / "tokenizer"))
    torch.manual_seed(seed)
    text_cfg = UMT5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    UMT5EncoderModel(text_cfg).save_pretrained(out / "text_encoder")
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    vae.save_pretrained(out / "vae")
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=48,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        eps=1e-6, rope_max_seq_len=1024)
    with torch.no_grad():  # diffusers zero-inits some tables: make every weight count
        for p in transformer.parameters():
            p.add_(0.02 * torch.randn_like(p))
    transformer.save_pretrained(out / "transformer")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                            num_train_timesteps=1000).save_pretrained(out / "scheduler")
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
             "_ca2vdm_default_size": list(PIXEL_SIZE),
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    if weights is not None:
        write_causal_weights(transformer, weights, seed + 1)
    return out


def write_causal_weights(transformer, file, seed: int) -> Path:
    """``transformer``'s architecture with other random weights, in Wan's own key layout with the
    ``model.`` prefix (Self-Forcing's): flat safetensors, or a ``.pt`` holding ``generator_ema``."""
    from ca2vdm.safefile import save_safetensors

    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in transformer.state_dict().items()}
    original = {"model." + k: v.contiguous() for k, v in diffusers_to_original(state).items()}
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix == ".safetensors":
        save_safetensors(original, file)
    else:
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        torch.save({"generator_ema": original}, tmp)
        os.replace(tmp, file)
    return file


# diffusers' names -> Wan's own (the inverse of diffusers' convert_wan_transformer_to_diffusers)
_ORIGINAL = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
             ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
             ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
             ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
             ("condition_embedder.time_proj", "time_projection.1"),
             ("scale_shift_table", "head.modulation"), ("proj_out", "head.head"),
             (".attn1.to_q", ".self_attn.q"), (".attn1.to_k", ".self_attn.k"), (".attn1.to_v", ".self_attn.v"),
             (".attn1.to_out.0", ".self_attn.o"), (".attn1.norm_q", ".self_attn.norm_q"),
             (".attn1.norm_k", ".self_attn.norm_k"),
             (".attn2.to_q", ".cross_attn.q"), (".attn2.to_k", ".cross_attn.k"), (".attn2.to_v", ".cross_attn.v"),
             (".attn2.to_out.0", ".cross_attn.o"), (".attn2.norm_q", ".cross_attn.norm_q"),
             (".attn2.norm_k", ".cross_attn.norm_k"),
             (".norm2", ".norm3"), (".ffn.net.0.proj", ".ffn.0"), (".ffn.net.2", ".ffn.2")]


def diffusers_to_original(state: dict) -> dict:
    """A diffusers ``WanTransformer3DModel`` state dict in Wan's own names (blocks' tables: ``modulation``)."""
    out = {}
    for k, v in state.items():
        if k.startswith("blocks.") and k.endswith(".scale_shift_table"):
            k = k.replace(".scale_shift_table", ".modulation")
        else:
            for a, b in _ORIGINAL:
                if a in k and (not a.startswith(("scale", "proj")) or k.startswith(a)):
                    k = k.replace(a, b)
                    break
        out[k] = v
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder to write the pipeline to")
    p.add_argument("--weights", help="also write a causal-checkpoint-style weights file (.safetensors or .pt)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = make(args.out_dir, args.seed, args.weights)
    print(f"wrote a tiny Wan 2.1 pipeline to {out}" + (f" and causal weights to {args.weights}" if args.weights else ""))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
