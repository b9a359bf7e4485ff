"""Embedding tables that cost nothing to build on the meta device.

Loaders build the model on the meta device (shapes, no storage) and then fill it from the checkpoint.
`nn.Embedding` initializes its table with `normal_`, which on the meta device runs through torch's
reference ops, and those import torch's compiler stack (`torch._dynamo`): about 1.5 s on the first
load of every process, for numbers that are never used. So on the meta device the table is made
empty, with no initializer; everywhere else it is a plain `nn.Embedding`, initialized as usual.
"""

from __future__ import annotations

import torch
from torch import nn


def new_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num_embeddings, dim): table (num_embeddings, dim), not initialized on the meta device."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num_embeddings, dim, _weight=torch.empty(num_embeddings, dim))
    return nn.Embedding(num_embeddings, dim)
