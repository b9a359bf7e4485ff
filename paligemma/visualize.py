"""Pictures of what the model computes: the prefix-LM mask of a prompt, and where answer tokens look.

The model code knows nothing of this module. Attention weights are captured by `capture_attention`,
a context manager that wraps each decoder layer's `self_attn.attend` (the one method that receives
the rotated queries (B, H, T, hd), the keys (B, KV, S, hd) and the additive mask) on the instance,
records softmax weights recomputed from q and k by `attention_weights`, calls the layer's own
method unchanged, and removes the wrapper on exit. It works on trained and inference-optimized
models alike (`inference.FusedAttention` overrides `attend` too).

`answer_attention` turns those weights into one map per answer token, layer and head over the image
patch grid. The map of answer token i is the attention of the query that *predicted* it: the last
prompt position for the first token, the previous answer token for the others (the same rows a
generation loop computes, here in one teacher-forced forward pass). Each map is normalised over the
image positions only (it sums to 1 over the patches), so heads that mostly look at text still show
where their image attention goes; `image_share` keeps the fraction of the whole attention row that
went to the image, to tell those heads apart.

Plotting needs matplotlib, an optional dependency (`pip install paligemma[viz]`); capturing does not.
Figures are written atomically and never over an existing file unless `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .atomic_files import written_atomically
from .attention_mask import prefix_lm_mask
from .errors import UsageError
from .gemma import soft_cap
from .model import PaliGemma


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """Softmax attention weights (B, H, T, S) in float32, from q (B, H, T, hd), k (B, KV, S, hd) and an
    additive mask (B, 1, T, S). Written the plain way (K repeated per query head), apart from
    `gemma.attention`'s grouped arithmetic, so that the two can check each other."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, S, hd): head h reads KV head h // G
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    return (soft_cap(scores, softcap) + mask.float()).softmax(dim=-1)


@contextlib.contextmanager
def capture_attention(model: PaliGemma, last_queries: int | None = None) -> Iterator[list[list[torch.Tensor]]]:
    """Record every decoder layer's attention weights while the block runs.

    Yields `records`: records[layer] is a list with one float32 tensor (B, H, T', S) per forward call
    of that layer (a prefill, each decode step, or a full forward), T' being the call's T queries, or
    only the last `last_queries` of them (a long prompt's full T x S weights would be large).
    """
    layers = [layer.self_attn for layer in model.language_model.layers]
    records: list[list[torch.Tensor]] = [[] for _ in layers]
    for attn, record in zip(layers, records):
        if "attend" in vars(attn):
            raise UsageError("attention is already being captured on this model (nested capture_attention)")
        attn.attend = _recording(attn, record, last_queries)
    try:
        yield records
    finally:
        for attn in layers:
            del attn.attend  # the class's method is visible again


def _recording(attn, record: list, last_queries: int | None):
    """`attn.attend`, also appending its weights to `record`."""
    attend = attn.attend  # the bound method of the layer's class

    def recording_attend(q, k, v, mask):
        rows = slice(None) if last_queries is None else slice(-last_queries, None)
        record.append(attention_weights(q[:, :, rows], k, mask[:, :, rows], attn.scale, attn.softcap).detach().cpu())
        return attend(q, k, v, mask)

    return recording_attend


@dataclass
class AnswerAttention:
    """Where each answer token looked in the image (see the module docstring for which query that is)."""

    maps: torch.Tensor  # (tokens, layers, heads, grid_h, grid_w): each map sums to 1 over the patches
    image_share: torch.Tensor  # (tokens, layers, heads): fraction of the row's attention on image positions
    token_ids: list[int]
    labels: list[str]  # each token as text, for figure titles

    def token(self, index: int) -> torch.Tensor:
        """The map of answer token `index`: (layers, heads, grid_h, grid_w)."""
        return self.maps[index]


@torch.no_grad()
def answer_attention(model: PaliGemma, processor, image, prompt: str, token_ids: Sequence[int]) -> AnswerAttention:
    """Attention over the image patches of each of `token_ids`, the answer generated for (image, prompt).

    One forward pass over the prompt and the answer (teacher forcing: the answer tokens are the
    causal suffix, as during generation) computes the same attention rows as the generation did.
    """
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        raise UsageError("answer_attention needs at least one answer token")
    inputs = processor(images=[image], prompts=[prompt])
    prompt_ids = inputs["input_ids"]  # (1, P): one prompt, no padding
    fed = torch.tensor([token_ids[:-1]], dtype=torch.long)  # the last answer token is predicted, never fed
    input_ids = torch.cat([prompt_ids, fed], dim=1)
    token_type_ids = torch.cat([torch.zeros_like(prompt_ids), torch.ones_like(fed)], dim=1)
    device = model.device
    with capture_attention(model, last_queries=len(token_ids)) as records:
        model(input_ids.to(device), pixel_values=inputs["pixel_values"].to(device),
              token_type_ids=token_type_ids.to(device))
    weights = torch.stack([layer[0][0] for layer in records])  # (layers, heads, tokens, S)
    image_positions = (prompt_ids[0] == model.config.image_token_index).nonzero()[:, 0]
    side = model.config.vision.image_size // model.config.vision.patch_size
    if len(image_positions) != side * side:
        raise UsageError(f"answer_attention maps one image of {side * side} patches; the prompt has "
                         f"{len(image_positions)} image tokens")
    on_image = weights[..., image_positions].permute(2, 0, 1, 3)  # (tokens, layers, heads, patches)
    share = on_image.sum(-1)
    maps = on_image / share[..., None].clamp_min(torch.finfo(torch.float32).tiny)
    labels = [_label(processor.tokenizer, t) for t in token_ids]
    return AnswerAttention(maps.reshape(*maps.shape[:3], side, side), share, token_ids, labels)


def _label(tokenizer, token_id: int) -> str:
    """A token as short readable text: "<eos>", "<loc0717>", "triangle"."""
    if token_id == tokenizer.eos_id:
        return "<eos>"
    return tokenizer.id_to_piece(token_id).replace("\u2581", " ").strip() or repr(tokenizer.id_to_piece(token_id))


def spread(count: int, most: int) -> list[int]:
    """At most `most` indices of range(count), evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


# ---------------------------------------------------------------------- figures (matplotlib)

def plot_answer_attention(image, attention: AnswerAttention, out_path: str | os.PathLike,
                          layers: Sequence[int] | None = None, max_tokens: int = 12,
                          overwrite: bool = False) -> None:
    """A grid over the image: one row per layer, one column per answer token (the first `max_tokens`),
    each cell the map averaged over the heads. `layers` default: all, or 8 evenly spaced in deeper models."""
    num_layers = attention.maps.shape[1]
    layers = spread(num_layers, 8) if layers is None else _check_indices(layers, num_layers, "layer")
    tokens = list(range(min(max_tokens, len(attention.token_ids))))
    cells = [[(attention.maps[t, layer].mean(0), attention.image_share[t, layer].mean(),
               f"{attention.labels[t]}" if row == 0 else None) for t in tokens] for row, layer in enumerate(layers)]
    _plot_grid(image, cells, [f"layer {layer}" for layer in layers], "mean over heads; % = attention on the image",
               out_path, overwrite)


def plot_token_attention(image, attention: AnswerAttention, token_index: int, out_path: str | os.PathLike,
                         layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                         overwrite: bool = False) -> None:
    """One answer token's maps: one row per layer, one column per head and a last column for their mean."""
    if not -len(attention.token_ids) <= token_index < len(attention.token_ids):
        raise UsageError(f"token {token_index} is out of range: the answer has {len(attention.token_ids)} tokens")
    maps, share = attention.maps[token_index], attention.image_share[token_index]  # (L, H, h, w), (L, H)
    layers = spread(maps.shape[0], 8) if layers is None else _check_indices(layers, maps.shape[0], "layer")
    heads = list(range(maps.shape[1])) if heads is None else _check_indices(heads, maps.shape[1], "head")
    cells = []
    for row, layer in enumerate(layers):
        cells.append([(maps[layer, h], share[layer, h], f"head {h}" if row == 0 else None) for h in heads]
                     + [(maps[layer, heads].mean(0), share[layer, heads].mean(), "mean" if row == 0 else None)])
    title = f"answer token {token_index}: {attention.labels[token_index]!r}; % = attention on the image"
    _plot_grid(image, cells, [f"layer {layer}" for layer in layers], title, out_path, overwrite)


def plot_prefix_lm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                        image_token_index: int, out_path: str | os.PathLike, overwrite: bool = False) -> None:
    """The prefix-LM mask of one row (T,) as the model builds it (`attention_mask.prefix_lm_mask`): a
    cell is coloured when its query may attend to its key, in the colour of the key's part (image,
    prefix, suffix); padding keys are never attended to."""
    valid = attention_mask.bool()[None]
    is_prefix = (token_type_ids == 0)[None] & valid
    slots = torch.arange(input_ids.shape[-1])
    allowed = (prefix_lm_mask(slots, is_prefix, valid, is_prefix, None, torch.float32)[0, 0] == 0).numpy()
    kinds = np.where(~valid[0].numpy(), "padding", np.where((input_ids == image_token_index).numpy(), "image",
                                                            np.where(is_prefix[0].numpy(), "prefix", "suffix")))
    colours = {"image": (0.12, 0.47, 0.71), "prefix": (0.17, 0.63, 0.17), "suffix": (1.0, 0.5, 0.05),
               "padding": (0.5, 0.5, 0.5)}
    key_colours = np.array([colours[kind] for kind in kinds])  # (S, 3)
    picture = np.where(allowed[..., None], key_colours[None], 1.0)  # (T, S, 3), white = masked
    fig = _figure(figsize=(5.2, 5.6))
    ax = fig.subplots()
    ax.imshow(picture, interpolation="nearest")
    start, legend = 0, []
    for kind, length in _runs(kinds):
        ax.axhline(start - 0.5, color="black", linewidth=0.5)
        ax.axvline(start - 0.5, color="black", linewidth=0.5)
        legend.append(ax.fill_between([], [], color=colours[kind], label=f"{kind}: {length} tokens"))
        start += length
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    ax.set_xlabel("key position (attended to)", fontsize=8)
    ax.set_ylabel("query position (attending)", fontsize=8)
    ax.set_title("prefix-LM mask: coloured = may attend (the key's part), white = masked", fontsize=9)
    _save(fig, out_path, overwrite)


def _runs(values: np.ndarray) -> list[tuple[str, int]]:
    """Consecutive equal values as (value, run length)."""
    runs: list[tuple[str, int]] = []
    for value in values.tolist():
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def _plot_grid(image, cells, row_labels: list[str], title: str, out_path, overwrite: bool) -> None:
    """cells[row][col] = (map (h, w), image share, column title or None), each map drawn over the image.
    Every cell has its own colour scale: the figure shows where each map looks, the % how much."""
    picture = np.asarray(image.convert("RGB"))
    height, width = picture.shape[:2]
    rows, cols = len(cells), len(cells[0])
    fig = _figure(figsize=(1.45 * cols + 0.6, 1.45 * rows + 0.5), dpi=90)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(cells):
        for c, (heat, share, column_title) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(picture)
            # The processor stretches the image to a square, so the patch grid stretches back over it.
            ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=(0, width, height, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"{100 * float(share):.0f}%", fontsize=7, labelpad=1)
            if column_title:
                ax.set_title(column_title, fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, out_path, overwrite)


def check_figure_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early on a figure path that cannot be written: matplotlib not installed, unknown format,
    missing folder, or an existing file (unless `overwrite`)."""
    path = Path(path)
    formats = _figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"{path}: unknown figure format {path.suffix!r} (use one of {', '.join(sorted(formats))})")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists: remove it or choose another name")
    return path


def _save(fig, out_path, overwrite: bool) -> None:
    path = check_figure_path(out_path, overwrite)
    with written_atomically(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), bbox_inches="tight")


def _figure(**kwargs):
    """A matplotlib Figure of its own: no pyplot, so no global state and no change to the user's backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("figures need matplotlib: pip install 'paligemma[viz]' (or pip install matplotlib)") from None
    return Figure(**kwargs)


def _check_indices(indices: Sequence[int], count: int, name: str) -> list[int]:
    indices = [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < count]
    if bad or not indices:
        raise UsageError(f"{name}s {bad or indices} are not in 0..{count - 1}")
    return indices
