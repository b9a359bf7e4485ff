"""A SigLIP-style dual encoder: how PaliGemma's vision tower is pretrained, in miniature.

Before PaliGemma ever sees a prompt, its vision tower is trained as half of a *dual encoder*:

    image (B, 3, S, S) --SigLIP tower--> patch features (B, N, Dv) --MAP head--> (B, Dv) --proj--> (B, E)
    text ids (B, L)    --text tower ---> token features (B, L, Dt) --last token--> (B, Dt) --proj--> (B, E)

and the two embeddings of matching image/text pairs are pulled together, all other pairs of the
batch pushed apart, by a contrastive loss (paligemma.losses: CLIP's softmax or SigLIP's sigmoid).
After pretraining, the pooling head and the text tower are thrown away and only the tower's patch
features go on to the language model: `DualEncoder.vision` has exactly the parameters of
`PaliGemma.vision_tower` and loads into it by name (`vision_tower_state_dict`).

The text tower is built from the same pre-LN transformer layers as the vision tower (as in
big_vision's SigLIP), with bidirectional attention over the non-padding tokens and the feature of
the last real token as the sentence's summary (big_vision's `pool_type="last"`). The image side is
pooled by a multihead attention-pooling ("MAP") head: one learned query attends over all patches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .losses import CLIP_INIT_LOG_SCALE, SIGLIP_INIT_BIAS, SIGLIP_INIT_LOG_SCALE, clip_loss, siglip_loss
from .siglip import SiglipEncoderLayer, SiglipMLP, SiglipVisionTower

LossKind = Literal["sigmoid", "softmax"]
LOSS_KINDS = ("sigmoid", "softmax")


@dataclass
class TextTowerConfig:
    """A small transformer over caption tokens. Field names match VisionConfig so the layers are shared."""

    vocab_size: int
    max_length: int = 48
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class DualEncoderConfig:
    vision: VisionConfig
    text: TextTowerConfig
    embed_dim: int = 128
    loss: LossKind = "sigmoid"

    def __post_init__(self):
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")

    def to_dict(self) -> dict:
        return {"vision": asdict(self.vision), "text": asdict(self.text), "embed_dim": self.embed_dim,
                "loss": self.loss}

    @classmethod
    def from_dict(cls, raw: dict) -> "DualEncoderConfig":
        return cls(vision=VisionConfig(**raw["vision"]), text=TextTowerConfig(**raw["text"]),
                   embed_dim=int(raw["embed_dim"]), loss=raw["loss"])


class MapHead(nn.Module):
    """Multihead attention pooling: a learned probe token attends over (B, N, D) -> (B, D)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, D)
        pooled, _ = self.attention(probe, x, x, need_weights=False)  # (B, 1, D)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class TextTower(nn.Module):
    """(B, L) token ids + (B, L) bool mask (True on real tokens, right-padded) -> (B, D_text)."""

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_length, config.hidden_size)
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.config.max_length:
            raise ValueError(f"text of {length} tokens is longer than the text tower's max_length "
                             f"{self.config.max_length}")
        x = self.token_embedding(input_ids) + self.position_embedding.weight[:length]  # (B, L, D)
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_layernorm(x)
        last = mask.sum(dim=1) - 1  # (B,) index of each row's last real token
        return x[torch.arange(x.shape[0]), last]


class DualEncoder(nn.Module):
    """SigLIP tower + MAP head and a text tower, projected to one embedding space of size embed_dim."""

    def __init__(self, config: DualEncoderConfig):
        super().__init__()
        self.config = config
        self.vision = SiglipVisionTower(config.vision)
        self.image_pool = MapHead(config.vision)
        self.image_projection = nn.Linear(config.vision.hidden_size, config.embed_dim)
        self.text = TextTower(config.text)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim)
        # Learned temperature (as a log-scale) and, for the sigmoid loss, a learned bias.
        sigmoid = config.loss == "sigmoid"
        self.log_scale = nn.Parameter(torch.tensor(SIGLIP_INIT_LOG_SCALE if sigmoid else CLIP_INIT_LOG_SCALE))
        self.bias = nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS if sigmoid else 0.0), requires_grad=sigmoid)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, E) unit-length image embeddings."""
        pooled = self.image_pool(self.vision(pixel_values))  # (B, Dv)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> (B, E) unit-length text embeddings."""
        return F.normalize(self.text_projection(self.text(input_ids, mask)), dim=-1)

    def loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """The configured contrastive loss of a batch of matching pairs (row i of each is pair i)."""
        if self.config.loss == "sigmoid":
            return siglip_loss(image_embeds, text_embeds, self.log_scale, self.bias)
        return clip_loss(image_embeds, text_embeds, self.log_scale)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.loss(self.encode_images(pixel_values), self.encode_texts(input_ids, mask))

    def vision_tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The tower's weights under PaliGemma's names (`vision_tower.…`), for `PaliGemma.load_state_dict`."""
        return {f"vision_tower.{name}": tensor for name, tensor in self.vision.state_dict().items()}


def pad_texts(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (B, L) ids and (B, L) bool mask of real tokens."""
    if any(len(tokens) == 0 for tokens in token_lists):
        raise ValueError("every text needs at least one token")
    length = max(len(tokens) for tokens in token_lists)
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), length), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = True
    return ids, mask


@torch.no_grad()
def retrieval_recall_at_1(image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                          captions: list[str]) -> tuple[float, float]:
    """(image->text, text->image) recall@1 over n pairs. A retrieved item counts as correct when its
    caption is the query's caption, so two scenes with the same caption are interchangeable."""
    similarity = image_embeds @ text_embeds.T  # (n images, n texts)
    best_text = similarity.argmax(dim=1).tolist()
    best_image = similarity.argmax(dim=0).tolist()
    image_to_text = sum(captions[j] == captions[i] for i, j in enumerate(best_text)) / len(captions)
    text_to_image = sum(captions[j] == captions[i] for i, j in enumerate(best_image)) / len(captions)
    return image_to_text, text_to_image


@torch.no_grad()
def zero_shot_predictions(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> list[int]:
    """For each image (n, E), the index of the most similar class prompt (k, E)."""
    return (image_embeds @ class_embeds.T).argmax(dim=1).tolist()
