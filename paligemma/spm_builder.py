"""Train a small SentencePiece model with Gemma's (PaliGemma's) special-token layout.

Used by the tests and to build the demo model's tokenizer. The layout follows the real Gemma
tokenizer, scaled down:

    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 <mask>   5 "\\n"
    6 .. 261          <0x00> .. <0xFF>   (byte fallback)
    262 .. V-1        pieces learned from the corpus (BPE, digits split, no dummy prefix)
    V .. V+1023       <loc0000> .. <loc1023>
    V+1024 .. V+1151  <seg000> .. <seg127>
    V+1152            <image>            (only with image_token=True)

The special pieces use Gemma's names (`<bos>`/`<eos>`, not `<s>`/`</s>`): transformers'
`GemmaTokenizer` assumes them, and would otherwise append its own `<bos>` as a new id.
SentencePiece's trainer always puts user-defined symbols right after the special ids; Gemma has
`<loc>`/`<seg>` after the learned vocabulary, so they are appended to the trained model afterwards.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from .tokenizer import IMAGE_TOKEN, NUM_LOC_TOKENS, NUM_SEG_TOKENS

LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG_TOKENS))

# SentencePiece's ModelProto.SentencePiece.Type enum value for user-defined pieces.
_USER_DEFINED = 4


@dataclass(frozen=True)
class SpmLayout:
    """Where the special pieces of a model built by `build_paligemma_spm` live."""

    pad_id: int
    eos_id: int
    bos_id: int
    unk_id: int
    mask_id: int
    newline_id: int
    loc_start: int  # id of <loc0000>; <locNNNN> is loc_start + NNNN
    seg_start: int  # id of <seg000>
    image_id: int | None  # id of <image>, None when built with image_token=False
    vocab_size: int  # number of pieces in the model


def build_paligemma_spm(corpus_lines: Iterable[str], out_path: str | Path, vocab_size: int = 512,
                        image_token: bool = True) -> SpmLayout:
    """Train a BPE SentencePiece model on `corpus_lines` and write it to `out_path`.

    `vocab_size` counts the special pieces, the 256 byte pieces and the learned pieces, not the
    1152 `<loc>`/`<seg>` pieces and `<image>` appended after them. It is an upper bound: a small
    corpus yields fewer learned pieces. Training is single-threaded and deterministic.
    """
    lines = [line for line in (str(x).strip() for x in corpus_lines) if line]
    if not lines:
        raise ValueError("build_paligemma_spm needs at least one non-empty corpus line")
    if vocab_size < 262 + 8:
        raise ValueError(f"vocab_size {vocab_size} is too small: 262 ids are taken by special and byte pieces")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, pad_piece="<pad>", eos_id=1, eos_piece="<eos>", bos_id=2, bos_piece="<bos>",
        unk_id=3, unk_piece="<unk>", control_symbols=["<mask>"], user_defined_symbols=["\n"],
        # Gemma's normaliser settings: text is kept as is, spaces become "▁", no leading "▁".
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    extra = list(LOC_TOKENS) + list(SEG_TOKENS) + ([IMAGE_TOKEN] if image_token else [])
    data = buffer.getvalue() + b"".join(_user_defined_piece(piece) for piece in extra)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(data)

    sp = spm.SentencePieceProcessor(model_proto=data)
    base = sp.get_piece_size() - len(extra)
    layout = SpmLayout(
        pad_id=sp.pad_id(), eos_id=sp.eos_id(), bos_id=sp.bos_id(), unk_id=sp.unk_id(),
        mask_id=sp.piece_to_id("<mask>"), newline_id=sp.piece_to_id("\n"),
        loc_start=base, seg_start=base + len(LOC_TOKENS),
        image_id=base + len(LOC_TOKENS) + len(SEG_TOKENS) if image_token else None,
        vocab_size=sp.get_piece_size(),
    )
    if (layout.pad_id, layout.eos_id, layout.bos_id, layout.unk_id, layout.mask_id, layout.newline_id) \
            != (0, 1, 2, 3, 4, 5) or sp.piece_to_id(LOC_TOKENS[0]) != layout.loc_start:
        raise RuntimeError(f"unexpected SentencePiece layout {layout}")  # a sentencepiece behaviour change
    return layout


def _user_defined_piece(piece: str) -> bytes:
    """`ModelProto.pieces` entry (field 1) for a user-defined piece, in protobuf wire format.

    Protobuf parsers append repeated-field entries in the order they appear, even when they come
    after other fields, so concatenating these to a serialised model appends pieces to its
    vocabulary without needing the protobuf package.
    """
    text = piece.encode("utf-8")
    body = (b"\x0a" + _varint(len(text)) + text  # field 1 (piece): length-delimited
            + b"\x15" + struct.pack("<f", 0.0)  # field 2 (score): fixed32 float
            + b"\x18" + _varint(_USER_DEFINED))  # field 3 (type): varint
    return b"\x0a" + _varint(len(body)) + body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
