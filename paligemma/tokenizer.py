"""PaliGemma's tokenizer: Gemma's SentencePiece model plus the `<image>`, `<locNNNN>` and `<segNNN>` tokens.

Loads a checkpoint's `tokenizer.model` with sentencepiece or, failing that, its `tokenizer.json`
with the optional `tokenizers` package. Token ids are the ones transformers produces for the same
files (`GemmaTokenizer` / `PaliGemmaProcessor`), including its one addition to plain SentencePiece:
special-token strings typed in the text ("<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<image>",
...) become their ids instead of being spelled out piece by piece.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Protocol

from .errors import PaliGemmaError

NUM_LOC_TOKENS = 1024
NUM_SEG_TOKENS = 128
IMAGE_TOKEN = "<image>"


class TokenizerError(PaliGemmaError, ValueError):
    """A tokenizer file is missing, unreadable, or inconsistent with the model config."""


class _Backend(Protocol):
    size: int
    special_pieces: dict[str, int]  # pieces HF matches in raw text but the backend itself would spell out

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def is_control(self, token_id: int) -> bool: ...


class Tokenizer:
    """Text <-> token ids for PaliGemma. Build with `Tokenizer.from_file` or `Tokenizer.from_pretrained`."""

    def __init__(self, backend: _Backend, image_token_index: int | None = None, source: str = "tokenizer"):
        self._backend = backend
        self._source = source
        self._pad_id, self._bos_id, self._eos_id, self._unk_id = (
            self._require_piece(p) for p in ("<pad>", "<bos>", "<eos>", "<unk>"))
        self._image_id = self._resolve_image_id(image_token_index)
        self._loc_start = self._contiguous_block([f"<loc{i:04d}>" for i in range(NUM_LOC_TOKENS)])
        self._seg_start = self._contiguous_block([f"<seg{i:03d}>" for i in range(NUM_SEG_TOKENS)])
        specials = dict(backend.special_pieces)
        if backend.piece_to_id(IMAGE_TOKEN) is None:
            specials[IMAGE_TOKEN] = self._image_id  # transformers appends <image> as an added token
        self._special_strings = specials
        # Longest first, so the regex takes the leftmost-longest match like HF's added-token matcher.
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) \
            if specials else None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | Path, image_token_index: int | None = None) -> "Tokenizer":
        """Load a SentencePiece `*.model` or a `tokenizers` `*.json` file.

        `image_token_index` is the config's id for `<image>`; it may lie past the end of the
        vocabulary (as in the released checkpoints: 257152 after 257152 pieces). If the tokenizer
        has an `<image>` piece, its id must agree.
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist")
        backend = _TokenizersBackend(path) if path.suffix == ".json" else _SentencePieceBackend(path)
        return cls(backend, image_token_index, source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | Path, image_token_index: int | None = None) -> "Tokenizer":
        """Load from a checkpoint directory: `tokenizer.model` if present, else `tokenizer.json`."""
        directory = Path(directory)
        for name in ("tokenizer.model", "tokenizer.json"):
            if (directory / name).is_file():
                return cls.from_file(directory / name, image_token_index)
        raise TokenizerError(f"{str(directory)!r} has neither tokenizer.model nor tokenizer.json")

    # ------------------------------------------------------------------ ids

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def image_id(self) -> int:
        return self._image_id

    @property
    def vocab_size(self) -> int:
        """Number of ids in use: the tokenizer's pieces, plus `<image>` when it comes after them."""
        return max(self._backend.size, self._image_id + 1)

    def is_loc(self, token_id: int) -> bool:
        return self._loc_start <= token_id < self._loc_start + NUM_LOC_TOKENS

    def is_seg(self, token_id: int) -> bool:
        return self._seg_start <= token_id < self._seg_start + NUM_SEG_TOKENS

    def loc_id(self, value: int) -> int:
        """Id of `<loc{value:04d}>`, value in 0..1023."""
        if not 0 <= value < NUM_LOC_TOKENS:
            raise ValueError(f"loc value {value} is outside 0..{NUM_LOC_TOKENS - 1}")
        return self._loc_start + value

    def seg_id(self, value: int) -> int:
        """Id of `<seg{value:03d}>`, value in 0..127."""
        if not 0 <= value < NUM_SEG_TOKENS:
            raise ValueError(f"seg value {value} is outside 0..{NUM_SEG_TOKENS - 1}")
        return self._seg_start + value

    def is_special(self, token_id: int) -> bool:
        """pad, bos, eos, unk, `<image>` and the other control pieces: what `decode` skips by default."""
        if self.is_loc(token_id) or self.is_seg(token_id):
            return False  # some tokenizer.json files mark them special; they are model output here
        return token_id == self._image_id or token_id == self._unk_id or (
            0 <= token_id < self._backend.size and self._backend.is_control(token_id))

    def id_to_piece(self, token_id: int) -> str:
        if token_id == self._image_id:
            return IMAGE_TOKEN
        if not 0 <= token_id < self._backend.size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._backend.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece, or None if the tokenizer has no such piece."""
        if piece == IMAGE_TOKEN:
            return self._image_id
        return self._backend.piece_to_id(piece)

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`. `<locNNNN>`, `<segNNN>` and special-token strings are single ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self._bos_id] if add_bos else []
        if self._special_re is None:
            ids += self._backend.encode(text)
        else:
            start = 0
            for match in self._special_re.finditer(text):
                ids += self._backend.encode(text[start:match.start()]) if match.start() > start else []
                ids.append(self._special_strings[match.group()])
                start = match.end()
            ids += self._backend.encode(text[start:]) if start < len(text) else []
        if add_eos:
            ids.append(self._eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, keep_loc_seg: bool = True) -> str:
        """Text of `ids` (a list or 1-D tensor).

        skip_special_tokens drops pad/bos/eos/unk/`<image>`/control pieces (otherwise they appear as
        "<bos>", ...); keep_loc_seg=False also drops `<locNNNN>`/`<segNNN>`. Ids past the last piece
        (the embedding's padding rows) are never text and are always dropped.
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id < 0:
                raise ValueError(f"negative token id {token_id} (labels' -100 passed to decode?)")
            plain = token_id < self._backend.size and not self.is_special(token_id)
            if plain and (keep_loc_seg or not (self.is_loc(token_id) or self.is_seg(token_id))):
                run.append(token_id)
                continue
            if run:
                parts.append(self._backend.decode(run))
                run = []
            if not plain and not skip_special_tokens and (token_id < self._backend.size or token_id == self._image_id):
                parts.append(self.id_to_piece(token_id))
        if run:
            parts.append(self._backend.decode(run))
        return "".join(parts)

    # ------------------------------------------------------------------ checks

    def _require_piece(self, piece: str) -> int:
        token_id = self._backend.piece_to_id(piece)
        if token_id is None:
            raise TokenizerError(f"{self._source} has no {piece!r} piece; a Gemma tokenizer has <pad>, <eos>, <bos>, "
                                 "<unk> at ids 0-3")
        return token_id

    def _resolve_image_id(self, image_token_index: int | None) -> int:
        own = self._backend.piece_to_id(IMAGE_TOKEN)
        if image_token_index is None:
            if own is None:
                raise TokenizerError(f"{self._source} has no {IMAGE_TOKEN} piece: pass the config's image_token_index")
            return own
        if own is not None and own != image_token_index:
            raise TokenizerError(f"config image_token_index is {image_token_index} but {self._source} maps "
                                 f"{IMAGE_TOKEN} to {own}: the tokenizer and config.json do not belong together")
        if own is None and image_token_index < self._backend.size:
            raise TokenizerError(f"config image_token_index {image_token_index} is the piece "
                                 f"{self._backend.id_to_piece(image_token_index)!r} in {self._source}, "
                                 f"not {IMAGE_TOKEN}")
        return image_token_index

    def _contiguous_block(self, pieces: list[str]) -> int:
        ids = [self._backend.piece_to_id(p) for p in pieces]
        if ids[0] is None or ids != list(range(ids[0], ids[0] + len(ids))):
            raise TokenizerError(f"{self._source} does not have {pieces[0]}..{pieces[-1]} as consecutive "
                                 "single pieces; PaliGemma tokenizers have them after the text vocabulary "
                                 "(256000.. in Gemma's)")
        return ids[0]


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{str(path)!r} is not a SentencePiece model: {err}") from err
        self.size = self._sp.get_piece_size()
        # HF registers control pieces and <unk> as special added tokens, matched in raw text.
        self.special_pieces = {self._sp.id_to_piece(i): i for i in range(self.size)
                               if self._sp.is_control(i) or self._sp.is_unknown(i)}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.piece_to_id(piece)
        return None if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id) else token_id

    def is_control(self, token_id: int) -> bool:
        return self._sp.is_control(token_id)


class _TokenizersBackend:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(f"{str(path)!r} is a tokenizer.json, which needs the optional 'tokenizers' package: "
                                 "pip install tokenizers (or provide the checkpoint's tokenizer.model)") from None
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise TokenizerError(f"{str(path)!r} is not a valid tokenizer.json: {err}") from err
        self.size = self._tok.get_vocab_size(with_added_tokens=True)
        self._control = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.special_pieces = {}  # tokenizers already matches its added tokens in raw text

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def is_control(self, token_id: int) -> bool:
        return token_id in self._control
