"""Tiny random PaliGemma configs and checkpoints shared by the tests.

A checkpoint is made by transformers (the reference) with random weights and written with its own
`save_pretrained`, so every parity test loads exactly what the reference computes with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.model import IGNORE_INDEX

IMAGE_TOKEN_ID = 255  # last id of the tiny vocabularies below


def tiny_config(family: str = "gemma", *, kv_heads: int = 1, heads: int = 4, head_dim: int = 16,
                hidden: int = 48, image_size: int = 16, patch_size: int = 4, window: int | None = 8,
                layers: int = 3, vocab: int = 256) -> PaliGemmaConfig:
    """A PaliGemma small enough to run in milliseconds; head_dim != hidden/heads on purpose."""
    gemma2 = dict(query_pre_attn_scalar=head_dim * 2, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                  sliding_window=window) if family == "gemma2" else {}
    return PaliGemmaConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            patch_size=patch_size, image_size=image_size),
        text=TextConfig(model_type=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        head_dim=head_dim, max_position_embeddings=512, **gemma2),
        image_token_index=IMAGE_TOKEN_ID,
    )


# (name, config): MQA and GQA and MHA, both families, three image sizes, a window shorter than the inputs.
TINY_CONFIGS = {
    "gemma-mqa": tiny_config("gemma", kv_heads=1),
    "gemma-gqa-28px": tiny_config("gemma", kv_heads=2, image_size=28, patch_size=14),
    "gemma2-gqa-window6": tiny_config("gemma2", kv_heads=2, window=6),
    "gemma2-mha-32px": tiny_config("gemma2", kv_heads=4, heads=4, image_size=32, patch_size=8, window=10),
}


def hf_reference(config: PaliGemmaConfig, seed: int = 0, lively: bool = False):
    """transformers' PaliGemmaForConditionalGeneration for `config`, randomly initialised, eager attention.

    Norm weights are randomised too (transformers starts them at zero, which would hide a missing
    "1 +" or a norm applied in the wrong place), and query/key weights enlarged so attention logits
    reach the range where soft-capping changes them. `lively` shrinks the embedding and enlarges the
    decoder's other matrices, so that greedy decoding does not just repeat one token forever (a
    random tied-embedding model otherwise echoes its input), which would make generation tests weak.
    """
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = HFConfig(**config.to_hf_dict())
    hf_config._attn_implementation = "eager"
    hf_config.text_config._attn_implementation = "eager"
    hf_config.vision_config._attn_implementation = "eager"
    model = PaliGemmaForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.3)
            elif "embed_tokens" in name:
                param.normal_(0.0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                param.normal_(0.0, 0.35)  # large attention logits, so Gemma 2's soft-cap really bites
            if lively and "language_model" in name:
                if "embed_tokens" in name:
                    param.normal_(0.0, 0.05)
                elif any(k in name for k in ("o_proj", "v_proj", "gate_proj", "up_proj", "down_proj")):
                    param.normal_(0.0, 0.3)
    return model


def write_hf_checkpoint(config: PaliGemmaConfig, directory, seed: int = 0, lively: bool = False):
    """Save a random reference model to `directory`; returns the reference model."""
    model = hf_reference(config, seed, lively)
    model.save_pretrained(directory)
    return model


def write_complete_checkpoint(directory, family: str, spm_model_path, spm_layout, image_size: int = 28,
                              patch_size: int = 14, **config_kwargs):
    """A checkpoint folder as users download it: random (lively) weights written by transformers,
    the test tokenizer and a Hub-style preprocessor_config.json. Returns the reference model."""
    import dataclasses
    import json
    import shutil

    base = tiny_config(family, image_size=image_size, patch_size=patch_size, **config_kwargs)
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=spm_layout.vocab_size),
                                 image_token_index=spm_layout.image_id)
    reference = write_hf_checkpoint(config, directory, lively=True)
    shutil.copy(spm_model_path, Path(directory) / "tokenizer.model")
    preprocessor = hub_preprocessor_config(image_size, config.num_image_tokens)
    (Path(directory) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return reference


def random_batch(config: PaliGemmaConfig, batch: int = 2, prompt_len: int = 6, suffix_len: int = 5,
                 seed: int = 0) -> dict:
    """One image per row: [<image>*N] prompt | suffix, with token_type_ids and suffix labels."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    text = torch.randint(3, IMAGE_TOKEN_ID, (batch, prompt_len + suffix_len), generator=g)
    input_ids = torch.cat([torch.full((batch, n), IMAGE_TOKEN_ID), text], dim=1)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, n + prompt_len:] = 1
    labels = torch.where(token_type_ids == 1, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    size = config.vision.image_size
    return dict(input_ids=input_ids, token_type_ids=token_type_ids, labels=labels,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.rand(batch, 3, size, size, generator=g) * 2 - 1)


def tiny_paligemma_config(vocab_size: int, image_token_index: int, image_size: int = 28, patch_size: int = 14):
    """A small PaliGemmaConfig whose vocabulary fits a `build_paligemma_spm` tokenizer."""
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          patch_size=patch_size, image_size=image_size)
    text = TextConfig(model_type="gemma", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return PaliGemmaConfig(vision=vision, text=text, image_token_index=image_token_index)


def hub_preprocessor_config(image_size: int, image_seq_length: int) -> dict:
    """The released PaliGemma preprocessor_config.json, at another resolution."""
    return {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_seq_length": image_seq_length,
            "image_std": [0.5, 0.5, 0.5], "processor_class": "PaliGemmaProcessor", "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"height": image_size, "width": image_size}}
