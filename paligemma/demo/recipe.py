"""How the bundled demo model is made: its tokenizer, its architecture and its starting weights.

The demo model is a real PaliGemma, only small: a 4-layer SigLIP tower on 112x112 images (8x8 = 64
image tokens) and a 4-layer Gemma 1 decoder (MQA, like PaliGemma 1), about 6M parameters, with a
SentencePiece tokenizer trained on the shapes world's sentences and Gemma's special-token layout.
It is trained from scratch by `paligemma.demo.train` with the library's own fine-tuning code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import PaliGemmaConfig, TextConfig, VisionConfig
from ..model import PaliGemma
from ..spm_builder import SpmLayout, build_paligemma_spm
from ..tokenizer import IMAGE_TOKEN, NUM_LOC_TOKENS
from .scenes import corpus_lines

DEMO_IMAGE_SIZE = 112  # the scenes are drawn at 224 px; the processor resizes them, as for any photo
DEMO_PATCH_SIZE = 14  # 8x8 = 64 image tokens (96 px / patch 8 learned no faster per step: model card)
SCENE_SIZE = 224
TOKENIZER_VOCAB = 400  # special + byte pieces + learned pieces (the corpus yields fewer)
# Seeds of training scenes count up from TRAIN_SEED0; evaluation scenes start far away, so a
# held-out scene is never one the model was trained on.
TRAIN_SEED0 = 0
EVAL_SEED0 = 10**9


def demo_vision_config(image_size: int = DEMO_IMAGE_SIZE, patch_size: int | None = None) -> VisionConfig:
    """The demo's SigLIP tower (also the image half of the contrastive dual encoder)."""
    return VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
                        patch_size=patch_size or DEMO_PATCH_SIZE, image_size=image_size)


def demo_config(layout: SpmLayout) -> PaliGemmaConfig:
    """The demo architecture for a tokenizer layout (the vocabulary size comes from the tokenizer)."""
    vocab = math.ceil(layout.vocab_size / 64) * 64  # padded like the released 257216-row tables
    vision = demo_vision_config()
    text = TextConfig(model_type="gemma", vocab_size=vocab, hidden_size=256, intermediate_size=1024,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                      max_position_embeddings=256)
    return PaliGemmaConfig(vision=vision, text=text, image_token_index=layout.image_id,
                           pad_token_id=layout.pad_id, eos_token_id=layout.eos_id, bos_token_id=layout.bos_id)


def preprocessor_config(image_size: int, num_image_tokens: int) -> dict:
    """preprocessor_config.json as on the Hub for PaliGemma, at the demo's resolution."""
    return {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor", "image_seq_length": num_image_tokens,
            "image_std": [0.5, 0.5, 0.5], "processor_class": "PaliGemmaProcessor", "resample": 3,
            "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size}}


def tokenizer_config() -> dict:
    """tokenizer_config.json: lets transformers' AutoProcessor load the folder as a PaliGemmaProcessor."""
    return {"tokenizer_class": "GemmaTokenizer", "processor_class": "PaliGemmaProcessor", "bos_token": "<bos>",
            "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "padding_side": "left",
            "add_bos_token": False, "add_eos_token": False, "extra_special_tokens": [IMAGE_TOKEN]}


@torch.no_grad()
def init_location_embeddings(model: PaliGemma, layout: SpmLayout, std: float = 0.02) -> None:
    """Start `<loc0000>`..`<loc1023>` as smooth sinusoidal codes of their value plus noise.

    From scratch, each of the 1024 location tokens would be an unrelated class, and a box off by
    one bin as wrong as one off by 500. With the LM head tied to the embedding, nearby values
    starting out similar lets the model learn coordinates as a quantity rather than 1024 labels.
    """
    table = model.language_model.embed_tokens.weight  # (V, D)
    dim = table.shape[1]
    values = torch.arange(NUM_LOC_TOKENS, dtype=torch.float32)[:, None] / (NUM_LOC_TOKENS - 1)  # (1024, 1) in [0, 1]
    frequencies = torch.pi * torch.arange(1, dim // 2 + 1, dtype=torch.float32)[None] / 4  # slow to fast
    codes = torch.cat([torch.sin(values * frequencies), torch.cos(values * frequencies)], dim=1)  # (1024, D)
    codes = codes / codes.std() * std
    table[layout.loc_start:layout.loc_start + NUM_LOC_TOKENS] = codes + torch.randn_like(codes) * std / 2


def create_initial_checkpoint(out_dir: str | Path, seed: int = 0, vision_tower: str | Path | None = None) -> Path:
    """Write an untrained demo checkpoint (weights, config, tokenizer, preprocessing) to `out_dir`.

    `vision_tower`: a safetensors file of `vision_tower.*` weights (a contrastively pretrained tower
    from `paligemma.demo.pretrain_vision`) to start from instead of random ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = build_paligemma_spm(corpus_lines(), out_dir / "tokenizer.model", vocab_size=TOKENIZER_VOCAB)
    config = demo_config(layout)
    torch.manual_seed(seed)
    model = PaliGemma(config).init_weights(seed=seed)
    init_location_embeddings(model, layout)
    if vision_tower is not None:
        load_vision_tower(model, vision_tower)
    model.save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(DEMO_IMAGE_SIZE, config.num_image_tokens), indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    return out_dir


def load_vision_tower(model: PaliGemma, path: str | Path) -> None:
    """Copy a pretrained tower's `vision_tower.*` tensors into `model`; every tower weight must be there."""
    tower = load_file(str(path))
    expected = {k for k in model.state_dict() if k.startswith("vision_tower.")}
    if set(tower) != expected:
        missing, unexpected = sorted(expected - set(tower)), sorted(set(tower) - expected)
        raise ValueError(f"{path} does not match the demo's vision tower: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was it pretrained with the same image and patch size?)")
    model.load_state_dict(tower, strict=False)
