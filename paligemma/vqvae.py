"""big_vision's VQ-VAE mask codec for PaliGemma `segment` answers: 16 codes <-> a 64x64 mask. torch only.

A `segment` answer carries each mask as 16 `<segNNN>` tokens: the codes (0..127) of a 4x4 grid of
vectors from a 128-entry codebook. big_vision decodes them with the decoder of a small VQ-VAE
trained on Open Images masks (`vae-oid.npz`) and makes training targets with its encoder:

    decoder: codes (B, 16) -> codebook rows (B, 4, 4, D), row-major -> 1x1 conv (D -> 128) + ReLU
             -> 2 ResBlocks(128) -> 4 x [ConvTranspose(k4, s2) + ReLU], channels 128, 64, 32, 16
             -> 1x1 conv (16 -> 1): (B, 64, 64), about [-1, 1] (not clipped; thresholded at 0)
    encoder: mask (B, 64, 64) in [0, 1] -> 2 (x - 0.5) -> 4 x [Conv(stride 2, TF 'SAME') + ReLU]
             -> 2 ResBlocks -> Conv(stride 1, 'SAME') to D -> nearest codebook row per cell (B, 16)
    ResBlock: x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))   (no activation after the sum)

Sources: big_vision/evaluators/proj/paligemma/transfers/segmentation.py (Flax `Decoder`, `ResBlock`,
`_get_params`) and big_vision/pp/proj/paligemma/segmentation.py (`encode_to_codebook_indices`: the
order of the layers and their strides and paddings, not their sizes). The sizes come from the model
big_vision's PaliGemma README names as the codec's architecture, Ning et al. 2023 (AiT,
arXiv 2301.02229), whose PyTorch code is where the checkpoint's names come from: github.com/
SwinTransformer/AiT, vae/models/VQVAE.py (`VQVAE`, `ResBlock_v1`, `VectorQuantizerEMA`) built with
vae/configs/insseg/ait_insseg_vqvae.py (64x64 masks, 1 channel, hidden_dim 16, downsample_ratio 16,
2 ResBlocks, 128 codes of 512). Its constructor gives

    encoder: Conv2d(1, 16, 4, stride 2, padding 1) + ReLU, then 3 x [Conv2d(c, 2c, 4, 2, 1) + ReLU]
             (16 -> 32 -> 64 -> 128), 2 ResBlocks(128), Conv2d(128, 512, 1)
    decoder: Conv2d(512, 128, 1) + ReLU, 2 ResBlocks(128), ConvTranspose2d(128, 128, 4, 2, 1) + ReLU,
             then 3 x [ConvTranspose2d(c, c/2, 4, 2, 1) + ReLU] (-> 64, 32, 16), Conv2d(16, 1, 1)

so the encoder is the decoder's mirror: widths 16, 32, 64, 128 and 4x4 kernels, for which TF 'SAME'
at stride 2 on even sizes pads 1 on each side, PyTorch's padding=1 (big_vision's TF port and the
PyTorch original compute the same). `MaskCodecConfig()`'s defaults are these shapes (tested in
tests/test_vqvae_encoder.py against a table written from that constructor).

`vae-oid.npz` is a PyTorch state dict saved with numpy, and the module tree here reproduces its names,
so it loads without renaming: `_vq_vae._embedding` (128, D), `decoder.{0,12}` 1x1 convs,
`decoder.{2,3}.net.{0,2,4}` ResBlock convs, `decoder.{4,6,8,10}` transposed convs,
`encoder.{0,2,4,6}` stride-2 convs, `encoder.{8,9}.net.*`, `encoder.10`; weights in PyTorch layouts
(Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw)). big_vision transposes them (2, 3, 1, 0)
for Flax/TF, and its Flax `ConvTranspose(k=4, s=2, padding=2, transpose_kernel=True)` (flipped,
in/out-swapped kernel over the 2x-dilated input padded by 2) is exactly
`nn.ConvTranspose2d(k=4, s=2, padding=1)` (padding k - 1 - 2 = 1): 4 -> 8 -> 16 -> 32 -> 64.
The encoder convs use TensorFlow's 'SAME' padding (asymmetric for odd kernels at stride 2), reproduced
here for any kernel size, and loading infers the encoder's widths and kernels from the tensors'
shapes, so narrower codecs in the same layout load too (the demo model's: widths 8, 16, 32, 32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import PaliGemmaError

GRID = 4  # codes form a GRID x GRID grid
NUM_TOKENS = GRID * GRID  # 16 <seg> tokens per mask
MASK_SIZE = 64  # decoded / encoded mask side
MASK_CODEC_FILE = "mask_codec.safetensors"  # a checkpoint's own codec for `segment` answers, when it has one
_NUM_LAYERS = 4  # stride-2 layers: 64 = 4 * 2**4
_NUM_RES_BLOCKS = 2


class MaskCodecError(PaliGemmaError, ValueError):
    """A mask codec file is unreadable or not a codec of this architecture."""


@dataclass(frozen=True)
class MaskCodecConfig:
    """Shapes of the codec; the defaults are `vae-oid.npz`'s (AiT's instance-mask VQ-VAE, module docstring)."""

    num_codes: int = 128
    embed_dim: int = 512  # D, the codebook vector size (`_vq_vae._embedding` is (num_codes, D))
    hidden: int = 128  # decoder 1x1 conv and ResBlocks; the transposed convs output hidden / 1, 2, 4, 8
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)  # outputs of the 4 stride-2 convs (AiT's)
    encoder_kernel: int = 4  # kernel of the stride-2 encoder convs
    encoder_out_kernel: int = 1  # kernel of the last encoder conv (-> D)

    def __post_init__(self):
        object.__setattr__(self, "encoder_channels", tuple(int(c) for c in self.encoder_channels))
        if len(self.encoder_channels) != _NUM_LAYERS:
            raise ValueError(f"encoder_channels needs {_NUM_LAYERS} widths, got {self.encoder_channels}")
        if self.hidden % 2 ** (_NUM_LAYERS - 1) or min(self.num_codes, self.embed_dim, self.hidden) < 1:
            raise ValueError(f"hidden must be a positive multiple of {2 ** (_NUM_LAYERS - 1)}, got {self}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """Outputs of the 4 transposed convs: big_vision halves `dim` after each, from 128."""
        return tuple(self.hidden // 2**i for i in range(_NUM_LAYERS))


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: out = ceil(in / stride), extra padding at the end."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: (left, right, top, bottom)
        return super().forward(F.pad(x, pads))


class ResBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(conv3x3(x))))); `net.{0,2,4}` as in the checkpoint."""

    def __init__(self, channels: int, same_padding: bool = False):
        super().__init__()
        conv = (lambda k: SameConv2d(channels, channels, k)) if same_padding else \
            (lambda k: nn.Conv2d(channels, channels, k, padding=k // 2))
        self.net = nn.Sequential(conv(3), nn.ReLU(), conv(3), nn.ReLU(), conv(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    """The codebook, named like the checkpoint (`_vq_vae._embedding`), and nearest-row lookup."""

    def __init__(self, num_codes: int, embed_dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.empty(num_codes, embed_dim))
        nn.init.uniform_(self._embedding, -1 / num_codes, 1 / num_codes)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest row (squared L2; the first one on ties, like tf.argmin)."""
        e = self._embedding
        distances = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return distances.argmin(1)


class MaskCodec(nn.Module):
    """The VQ-VAE: `decode` codes -> 64x64 masks, `encode` masks -> codes, `forward` for training."""

    def __init__(self, config: MaskCodecConfig | None = None, with_encoder: bool = True):
        super().__init__()
        self.config = config = config or MaskCodecConfig()
        self._vq_vae = VectorQuantizer(config.num_codes, config.embed_dim)
        up = config.decoder_channels
        decoder: list[nn.Module] = [nn.Conv2d(config.embed_dim, config.hidden, 1), nn.ReLU()]
        decoder += [ResBlock(config.hidden) for _ in range(_NUM_RES_BLOCKS)]
        for c_in, c_out in zip((config.hidden,) + up[:-1], up):
            decoder += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU()]
        decoder.append(nn.Conv2d(up[-1], 1, 1))
        self.decoder = nn.Sequential(*decoder)  # indices 0..12 as in the checkpoint
        self.encoder: nn.Sequential | None = None
        if with_encoder:
            enc = config.encoder_channels
            encoder: list[nn.Module] = []
            for c_in, c_out in zip((1,) + enc[:-1], enc):
                encoder += [SameConv2d(c_in, c_out, config.encoder_kernel, stride=2), nn.ReLU()]
            encoder += [ResBlock(enc[-1], same_padding=True) for _ in range(_NUM_RES_BLOCKS)]
            encoder.append(SameConv2d(enc[-1], config.embed_dim, config.encoder_out_kernel))
            self.encoder = nn.Sequential(*encoder)  # indices 0..10 as in the checkpoint

    @property
    def codebook(self) -> torch.Tensor:
        return self._vq_vae._embedding  # (num_codes, D)

    # ------------------------------------------------------------------ decode

    def decode(self, codes: torch.Tensor | np.ndarray | list) -> torch.Tensor:
        """(B, 16) codes in 0..num_codes-1 -> (B, 64, 64) float masks, > 0 inside the object."""
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.codebook.device)
        if codes.ndim != 2 or codes.shape[1] != NUM_TOKENS:
            raise ValueError(f"codes must be (batch, {NUM_TOKENS}), got {tuple(codes.shape)}")
        if codes.numel() and not (0 <= int(codes.min()) and int(codes.max()) < self.config.num_codes):
            raise ValueError(f"codes must be in 0..{self.config.num_codes - 1}")
        return self.decode_vectors(self.codebook[codes])

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, 16, D) codebook vectors (row-major over the 4x4 grid) -> (B, 64, 64)."""
        x = vectors.reshape(vectors.shape[0], GRID, GRID, vectors.shape[-1]).permute(0, 3, 1, 2)  # (B, D, 4, 4)
        return self.decoder(x)[:, 0]

    # ------------------------------------------------------------------ encode

    def encode_vectors(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 64, 64) masks in [0, 1] -> (B, 16, D) unquantised encoder outputs, row-major."""
        if self.encoder is None:
            raise RuntimeError("this codec has no encoder (its checkpoint held only the decoder)")
        masks = torch.as_tensor(masks, dtype=self.codebook.dtype, device=self.codebook.device)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must be (batch, {MASK_SIZE}, {MASK_SIZE}), got {tuple(masks.shape)}")
        z = self.encoder(2.0 * (masks[:, None] - 0.5))  # (B, D, 4, 4); big_vision's _norm to [-1, 1]
        return z.permute(0, 2, 3, 1).reshape(z.shape[0], NUM_TOKENS, z.shape[1])

    def encode(self, masks: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, 64, 64) masks in [0, 1] (bool is fine) -> (B, 16) codes, the nearest codebook rows."""
        z = self.encode_vectors(masks)
        return self._vq_vae.nearest(z.reshape(-1, z.shape[-1])).reshape(z.shape[0], NUM_TOKENS)

    # ------------------------------------------------------------------ training

    def forward(self, masks: torch.Tensor, commitment: float = 0.25):
        """Training pass: (reconstruction (B, 64, 64) in decoder units, codes (B, 16), VQ loss).

        Straight-through quantisation; the VQ loss is codebook + commitment * encoder-commitment
        (van den Oord et al.). Train the reconstruction against `2 * mask - 1`.
        """
        z = self.encode_vectors(masks)
        codes = self._vq_vae.nearest(z.detach().reshape(-1, z.shape[-1])).reshape(z.shape[0], NUM_TOKENS)
        q = self.codebook[codes]
        vq_loss = F.mse_loss(q, z.detach()) + commitment * F.mse_loss(z, q.detach())
        return self.decode_vectors(z + (q - z).detach()), codes, vq_loss


# ---------------------------------------------------------------------- files

_IGNORED_PREFIX = "_vq_vae."  # the checkpoint may carry quantizer training state (EMA statistics)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> MaskCodecConfig:
    """The config whose modules have these checkpoint shapes (big_vision names)."""
    try:
        num_codes, embed_dim = shapes["_vq_vae._embedding"]
        hidden = shapes["decoder.0.weight"][0]
        kwargs = {}
        if "encoder.0.weight" in shapes:
            kwargs["encoder_channels"] = tuple(shapes[f"encoder.{2 * i}.weight"][0] for i in range(_NUM_LAYERS))
            kwargs["encoder_kernel"] = shapes["encoder.0.weight"][-1]
            kwargs["encoder_out_kernel"] = shapes["encoder.10.weight"][-1]
    except (KeyError, ValueError, IndexError) as err:
        raise MaskCodecError(f"not a big_vision mask VQ-VAE checkpoint (missing or odd {err})") from None
    return MaskCodecConfig(num_codes, embed_dim, hidden, **kwargs)


def codec_from_state_dict(state: Mapping[str, torch.Tensor | np.ndarray]) -> MaskCodec:
    """A codec holding exactly these tensors (big_vision names); strict: a missing, unexpected or
    misshapen tensor raises, naming it. Training state under `_vq_vae.` other than the codebook is
    ignored. Without `encoder.*` tensors the codec is decoder-only."""
    state = {k: torch.as_tensor(np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v)
             for k, v in state.items()
             if not (k.startswith(_IGNORED_PREFIX) and k != "_vq_vae._embedding")}
    config = config_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        codec = MaskCodec(config, with_encoder=any(k.startswith("encoder.") for k in state))
    expected = {k: tuple(v.shape) for k, v in codec.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshapen = sorted(f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                       for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshapen:
        raise MaskCodecError(f"mask codec checkpoint does not match the architecture: missing {missing}, "
                             f"unexpected {unexpected}, misshapen {misshapen}")
    codec.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return codec.eval()


def load_mask_codec(path: str | os.PathLike) -> MaskCodec:
    """Load big_vision's `vae-oid.npz` (or any .npz in its layout) or a `.safetensors` from `save_mask_codec`."""
    path = os.fspath(path)
    if not path.endswith((".npz", ".safetensors")):
        raise MaskCodecError(f"mask codec files are .npz (big_vision) or .safetensors, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask codec {path} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                state = {k: npz[k] for k in npz.files}
        else:
            from safetensors.torch import load_file
            state = load_file(path)
    except Exception as err:  # numpy, zipfile and safetensors raise several unrelated types for a bad file
        raise MaskCodecError(f"{path} is not a readable mask codec ({err})") from None
    return codec_from_state_dict(state)


def save_mask_codec(codec: MaskCodec, path: str | os.PathLike) -> None:
    """Write the codec as safetensors under big_vision's names (the shapes say the config)."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in codec.state_dict().items()}, os.fspath(path),
              metadata={"format": "pt", "kind": "paligemma-mask-vqvae"})


def fit_mask_codec(codec: MaskCodec, masks: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 3e-3,
                   generator: torch.Generator | None = None, warmup_fraction: float = 0.3,
                   restart_every: int = 25) -> list[float]:
    """Train `codec` on (N, 64, 64) masks in [0, 1] with Adam: MSE to `2 * mask - 1` + VQ loss.

    A plain loop for small jobs and tests; returns each step's loss and leaves the codec in eval mode.
    Against codebook collapse: the first `warmup_fraction` of the steps train a plain autoencoder
    (no quantisation), then the codebook starts at encoder outputs, and every `restart_every` steps
    codes no mask of a batch used are moved onto encoder outputs of that batch.
    """
    masks = torch.as_tensor(masks, dtype=torch.float32)
    optimizer = torch.optim.Adam(codec.parameters(), lr=lr)
    warmup = int(steps * warmup_fraction)
    used = torch.zeros(codec.config.num_codes, dtype=torch.bool)
    codec.train()
    losses = []
    for step in range(steps):
        batch = masks[torch.randint(len(masks), (min(batch_size, len(masks)),), generator=generator)]
        if step < warmup:
            z = codec.encode_vectors(batch)
            loss = F.mse_loss(codec.decode_vectors(z), 2 * batch - 1)
        else:
            if step == warmup:
                _reset_codes(codec, masks, torch.ones_like(used), generator)
            elif restart_every and (step - warmup) % restart_every == 0:
                _reset_codes(codec, masks, ~used, generator)
                used.zero_()
            recon, codes, vq_loss = codec(batch)
            used[codes.flatten()] = True
            loss = F.mse_loss(recon, 2 * batch - 1) + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    codec.eval()
    return losses


@torch.no_grad()
def _reset_codes(codec: MaskCodec, masks: torch.Tensor, which: torch.Tensor, generator) -> None:
    """Move the codebook rows selected by `which` (bool) onto random encoder outputs of `masks`."""
    count = int(which.sum())
    if count == 0:
        return
    z = codec.encode_vectors(masks[torch.randperm(len(masks), generator=generator)[:256]])
    z = z.reshape(-1, z.shape[-1])
    picks = torch.randint(len(z), (count,), generator=generator)
    noise = torch.randn(count, z.shape[-1], generator=generator) * (1e-2 * z.std() + 1e-6)
    codec.codebook[which] = z[picks] + noise
