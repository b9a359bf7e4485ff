"""PaliGemma: SigLIP image features, projected into Gemma's embedding space, decoded with text.

    image (B_img, 3, H, W) --SigLIP--> (B_img, N, D_vis) --projector--> (B_img, N, D)
    ids (B, T) --embed * sqrt(D)--> (B, T, D), with each `<image>` position replaced by an image feature
    --Gemma decoder, prefix-LM mask--> (B, T, D) --tied LM head (+ Gemma 2 soft-cap)--> logits (B, T, V)

The module knows nothing of tokenizers, files or sampling: it maps tensors to tensors. Generation
uses `encode_images` once, then `prefill` and `decode_step` over a `KVCache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention_mask import prefix_lm_mask
from .checkpoint_layout import save_model
from .config import PaliGemmaConfig
from .gemma import GemmaDecoder, RMSNorm, soft_cap
from .kv_cache import KVCache
from .siglip import SiglipVisionTower

IGNORE_INDEX = -100


@dataclass
class PaliGemmaOutput:
    logits: torch.Tensor  # (B, T, V); (N, V) at the N labelled positions with forward(loss_only=True)
    loss: torch.Tensor | None = None


class MultiModalProjector(nn.Module):
    """A single linear map from SigLIP width to Gemma width; no activation in any released model."""

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision.hidden_size, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = GemmaDecoder(config.text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    # ------------------------------------------------------------------ pieces

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def num_parameters(self) -> int:
        """Parameter count, the tied LM head counted once (as transformers counts it)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> "PaliGemma":
        """Fresh weights for training from scratch: N(0, std) matrices and embeddings, zero biases,
        LayerNorms at identity, RMSNorm weights 0 (their scale is 1 + w). PyTorch's defaults would
        give the embedding N(0, 1), which times sqrt(D) swamps everything else."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.zero_()
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) -> projected image features (num_images, N, D). Not scaled by sqrt(D)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), scaled by sqrt(D), with `<image>` positions holding image features.

        `image_features` (num_images, N, D) fill the `<image>` positions in reading order: row 0's
        images first. Only text is scaled, matching big_vision and transformers 5.x.
        """
        image_positions = input_ids == self.config.image_token_index  # (B, T)
        embeds = self.embed_text(input_ids.masked_fill(image_positions, self.config.pad_token_id))
        num_image_tokens = int(image_positions.sum())
        if image_features is None:
            if num_image_tokens:
                raise ValueError(f"input_ids hold {num_image_tokens} <image> tokens but no pixel_values were given")
            return embeds
        n = self.config.num_image_tokens
        per_row = image_positions.sum(-1)
        if num_image_tokens != image_features.shape[0] * n or bool((per_row % n).any()):
            raise ValueError(f"input_ids hold {per_row.tolist()} <image> tokens per row, but {image_features.shape[0]} "
                             f"image(s) of {n} tokens each were given: every image needs exactly {n} <image> tokens")
        return embeds.masked_scatter(image_positions[..., None], image_features.to(embeds.dtype))

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D) scaled by sqrt(D); no image handling."""
        table = self.language_model.embed_tokens
        # transformers casts the scale to the weight dtype first: sqrt(2048) is 45.25 in bfloat16.
        return table(input_ids) * torch.tensor(math.sqrt(self.config.text.hidden_size), dtype=table.weight.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., D) -> logits (..., V), soft-capped for Gemma 2."""
        if hasattr(self, "lm_head"):
            logits = self.lm_head(hidden)
        else:  # tied: the embedding table is the output matrix
            logits = F.linear(hidden, self.language_model.embed_tokens.weight)
        return soft_cap(logits, self.config.text.final_logit_softcapping)

    def run_decoder(self, embeds: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, is_prefix: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Run the decoder on (B, T, D) embeddings; with a cache, they go in the next T slots."""
        dtype = embeds.dtype
        if cache is None:
            slots = torch.arange(embeds.shape[1], device=embeds.device)
            key_valid, key_is_prefix = valid, is_prefix
        else:
            slots = cache.reserve(embeds.shape[1], valid, is_prefix)
            key_valid, key_is_prefix = cache.valid[:, :cache.length], cache.is_prefix[:, :cache.length]
        masks = {window: prefix_lm_mask(slots, is_prefix, key_valid, key_is_prefix, window, dtype)
                 for window in self.language_model.attention_windows}
        return self.language_model(embeds, positions, masks, cache, slots)

    # ------------------------------------------------------------------ full forward (training, scoring)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, loss_only: bool = False) -> PaliGemmaOutput:
        """Logits for every position, and the suffix loss when `labels` are given.

        input_ids (B, T); pixel_values (num_images, 3, H, W) or precomputed `image_features`;
        attention_mask (B, T): 1 = token, 0 = padding; token_type_ids (B, T): 0 = prefix
        (bidirectional), 1 = suffix (causal), None = all prefix; labels (B, T): -100 = ignored;
        position_ids (B, T): defaults to counting real tokens from 1, so padding is skipped.
        loss_only (training): the LM head runs only at the N positions that predict a label, and
        `logits` are (N, V), row-major over (B, T - 1); the loss is the same. The full (B, T, V) float32
        logits of a 257k vocabulary, their softmax and gradient take ~0.28 GiB each for 288 tokens.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                             ("labels", labels), ("position_ids", position_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)} but input_ids has {tuple(input_ids.shape)}")
        if loss_only and labels is None:
            raise ValueError("loss_only=True needs labels")
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        embeds = self.embed(input_ids, image_features)
        valid = attention_mask.bool()
        is_prefix = (token_type_ids == 0) & valid
        # HF counts positions from 1 (big_vision from 0): RoPE is relative, but matching keeps rounding equal.
        positions = attention_mask.long().cumsum(-1) if position_ids is None else position_ids
        hidden = self.run_decoder(embeds, positions, valid, is_prefix)  # (B, T, D)
        if loss_only:
            targets = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): position t predicts token t + 1
            logits = self.logits(hidden[:, :-1][targets])  # (N, V)
            return PaliGemmaOutput(logits=logits, loss=F.cross_entropy(logits.float(), labels[:, 1:][targets]))
        logits = self.logits(hidden)
        loss = None if labels is None else next_token_loss(logits, labels)
        return PaliGemmaOutput(logits=logits, loss=loss)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache,
                image_features: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Write a left-padded prompt batch (B, T) into an empty cache; return next-token logits (B, V).

        The whole prompt is the prefix unless token_type_ids mark a suffix already begun.
        """
        if cache.length:
            raise ValueError("prefill needs an empty KV cache")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        valid = attention_mask.bool()
        embeds = self.embed(input_ids, image_features)
        hidden = self.run_decoder(embeds, attention_mask.long().cumsum(-1), valid, (token_type_ids == 0) & valid, cache)
        return self.logits(hidden[:, -1])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new suffix token per row, tokens (B,) at RoPE positions (B,); returns logits (B, V)."""
        embeds = self.embed_text(tokens[:, None])  # a sampled <image> id is just a token here, as in transformers
        ones = torch.ones_like(tokens[:, None], dtype=torch.bool)
        hidden = self.run_decoder(embeds, positions[:, None], ones, ~ones, cache)
        return self.logits(hidden[:, 0])

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config.text, batch_size, max_len, self.dtype, self.device)

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory, max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write config.json and safetensors (HF hub layout) loadable by `load_model` and transformers."""
        save_model(self, directory, max_shard_bytes=max_shard_bytes)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at position t, over labels that are not -100.

    PaliGemma's processor puts -100 on the image, the prefix and padding, so only the suffix (the
    answer and its <eos>) is learned. Computed in float32 whatever the model's dtype.
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
