"""Tokenizer and SentencePiece builder: Gemma's layout, loc/seg tokens, ids identical to transformers."""

from __future__ import annotations

import random
import sys
import time

import pytest
import sentencepiece as spm
import torch

from paligemma.spm_builder import LOC_TOKENS, SEG_TOKENS, build_paligemma_spm
from paligemma.tokenizer import Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tokenizer(spm_model_path, spm_layout) -> Tokenizer:
    return Tokenizer.from_file(spm_model_path, image_token_index=spm_layout.image_id)


def tricky_texts(corpus: list[str], count: int = 400, seed: int = 0) -> list[str]:
    """Corpus lines, and random mixes of words, whitespace, unicode, special and loc/seg strings."""
    parts = ["a", " red", " circle", "detect", " ", "  ", "\n", "\n\n", "\t", ";", " ; ", "?", "0", "12", "345", "é",
             "ü", "😀", "中文", "<", ">", "<loc", "<loc0042>", "<loc1023>", "<seg000>", "<seg127>", "<loc12345>",
             "<seg128>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<image>", "caption en", "What", "xyz", "▁"]
    rng = random.Random(seed)
    return corpus + ["", " ", "\n"] + ["".join(rng.choice(parts) for _ in range(rng.randint(1, 12)))
                                      for _ in range(count)]


# ---------------------------------------------------------------------- builder

def test_builder_layout(spm_model_path, spm_layout):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model_path))
    assert [sp.id_to_piece(i) for i in range(6)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n"]
    assert sp.id_to_piece(6) == "<0x00>" and sp.id_to_piece(261) == "<0xFF>"  # byte fallback, as Gemma
    assert spm_layout.loc_start > 262 and sp.id_to_piece(spm_layout.loc_start - 1) not in LOC_TOKENS
    assert [sp.piece_to_id(p) for p in LOC_TOKENS] == list(range(spm_layout.loc_start, spm_layout.loc_start + 1024))
    assert [sp.piece_to_id(p) for p in SEG_TOKENS] == list(range(spm_layout.seg_start, spm_layout.seg_start + 128))
    assert spm_layout.seg_start == spm_layout.loc_start + 1024
    assert spm_layout.image_id == spm_layout.seg_start + 128 == spm_layout.vocab_size - 1 == sp.piece_to_id("<image>")
    assert all(sp.is_control(i) for i in (0, 1, 2, 4)) and sp.is_unknown(3)
    assert sp.encode("a\nb") == [sp.piece_to_id("a"), 5, sp.piece_to_id("b")]


def test_builder_is_fast_deterministic_and_optional_image(tmp_path, spm_corpus_lines, spm_model_path):
    start = time.perf_counter()
    layout = build_paligemma_spm(spm_corpus_lines, tmp_path / "a.model", vocab_size=512)
    assert time.perf_counter() - start < 5
    assert (tmp_path / "a.model").read_bytes() == spm_model_path.read_bytes()
    no_image = build_paligemma_spm(spm_corpus_lines, tmp_path / "b.model", vocab_size=512, image_token=False)
    assert no_image.image_id is None and no_image.vocab_size == layout.vocab_size - 1


def test_builder_rejects_empty_corpus_and_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        build_paligemma_spm(["", "  "], tmp_path / "x.model")
    with pytest.raises(ValueError, match="too small"):
        build_paligemma_spm(["a b c"], tmp_path / "x.model", vocab_size=100)


# ---------------------------------------------------------------------- ids

def test_special_ids(tokenizer, spm_layout):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.image_id == spm_layout.image_id
    assert tokenizer.vocab_size == spm_layout.vocab_size
    assert tokenizer.id_to_piece(tokenizer.image_id) == "<image>"
    assert tokenizer.piece_to_id("<loc0005>") == spm_layout.loc_start + 5
    assert tokenizer.piece_to_id("no such piece") is None


def test_loc_and_seg_tokens_are_single_ids(tokenizer, spm_layout):
    ids = tokenizer.encode("<loc0000><loc0512><loc1023><seg000><seg127> circle")
    assert ids[:5] == [spm_layout.loc_start, spm_layout.loc_start + 512, spm_layout.loc_start + 1023,
                       spm_layout.seg_start, spm_layout.seg_start + 127]
    assert [tokenizer.is_loc(i) for i in ids[:5]] == [True, True, True, False, False]
    assert [tokenizer.is_seg(i) for i in ids[:5]] == [False, False, False, True, True]
    assert tokenizer.loc_id(512) == ids[1] and tokenizer.seg_id(127) == ids[4]
    assert tokenizer.id_to_piece(ids[2]) == "<loc1023>"
    assert tokenizer.decode(ids) == "<loc0000><loc0512><loc1023><seg000><seg127> circle"
    assert tokenizer.decode(ids, keep_loc_seg=False) == " circle"
    with pytest.raises(ValueError, match="outside 0..1023"):
        tokenizer.loc_id(1024)
    with pytest.raises(ValueError, match="outside 0..127"):
        tokenizer.seg_id(-1)


def test_encode_flags_and_special_strings(tokenizer):
    body = tokenizer.encode("detect circle")
    assert tokenizer.encode("detect circle", add_bos=True, add_eos=True) == [2] + body + [1]
    # Like transformers, special-token strings in the text are their ids.
    assert tokenizer.encode("x<eos>y<bos><image>") == (tokenizer.encode("x") + [1] + tokenizer.encode("y")
                                                         + [2, tokenizer.image_id])
    with pytest.raises(TypeError):
        tokenizer.encode(["not", "a", "str"])


def test_decode_options(tokenizer):
    ids = [tokenizer.image_id] * 3 + tokenizer.encode("caption en\n", add_bos=True) + [0, 3] + \
        tokenizer.encode("<loc0001> star") + [1]
    assert tokenizer.decode(ids) == "caption en\n<loc0001> star"
    assert tokenizer.decode(ids, keep_loc_seg=False) == "caption en\n star"
    assert tokenizer.decode(ids, skip_special_tokens=False) == \
        "<image><image><image><bos>caption en\n<pad><unk><loc0001> star<eos>"
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids)
    assert tokenizer.decode(ids + [tokenizer.vocab_size + 5]) == tokenizer.decode(ids)  # embedding padding rows
    with pytest.raises(ValueError, match="-100"):
        tokenizer.decode([5, -100])


@pytest.mark.parametrize("text", ["a red circle and a blue square", "héllo 😀 中文\t12", "  two  spaces \n\n"])
def test_decode_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ---------------------------------------------------------------------- parity with transformers

@pytest.fixture(scope="module")
def hf_tokenizers(spm_model_path):
    transformers = pytest.importorskip("transformers")
    directory = str(spm_model_path.parent)
    return {"GemmaTokenizer": transformers.GemmaTokenizer.from_pretrained(directory),
            "AutoTokenizer": transformers.AutoTokenizer.from_pretrained(directory)}


@pytest.mark.parametrize("flavour", ["GemmaTokenizer", "AutoTokenizer"])
def test_ids_match_transformers(tokenizer, hf_tokenizers, spm_corpus_lines, flavour):
    hf = hf_tokenizers[flavour]
    # Without a tokenizer_config.json, AutoTokenizer builds a generic tokenizer with no pad token.
    assert (hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (1, 2, 3)
    for text in tricky_texts(spm_corpus_lines):
        assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)


def test_decode_matches_transformers(tokenizer, hf_tokenizers, spm_corpus_lines):
    hf = hf_tokenizers["GemmaTokenizer"]
    for text in tricky_texts(spm_corpus_lines, count=100, seed=1):
        ids = tokenizer.encode(text)
        want = text.replace("▁", " ")  # a literal "▁" is SentencePiece's space: it decodes as " "
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf.decode(ids) == want


def test_tokenizer_json_gives_the_same_ids(tokenizer, processor_checkpoint_factory, spm_corpus_lines, spm_layout):
    pytest.importorskip("tokenizers")
    directory = processor_checkpoint_factory(tokenizer_file="tokenizer.json")
    from_json = Tokenizer.from_pretrained(directory, image_token_index=spm_layout.image_id)
    assert (from_json.pad_id, from_json.eos_id, from_json.bos_id, from_json.image_id) == (0, 1, 2, spm_layout.image_id)
    for text in tricky_texts(spm_corpus_lines, count=200):
        ids = tokenizer.encode(text)
        assert from_json.encode(text) == ids, repr(text)
        assert from_json.decode(ids) == tokenizer.decode(ids)
        assert from_json.decode(ids, skip_special_tokens=False, keep_loc_seg=False) == \
            tokenizer.decode(ids, skip_special_tokens=False, keep_loc_seg=False)


# ---------------------------------------------------------------------- the <image> id and errors

def test_image_token_past_the_vocabulary(tmp_path, spm_corpus_lines):
    """Released tokenizers have no <image> piece: its id (257152) comes from config.json, after the vocabulary."""
    layout = build_paligemma_spm(spm_corpus_lines, tmp_path / "t.model", image_token=False)
    tok = Tokenizer.from_file(tmp_path / "t.model", image_token_index=layout.vocab_size)
    assert tok.image_id == layout.vocab_size and tok.vocab_size == layout.vocab_size + 1
    assert tok.encode("<image>a") == [layout.vocab_size] + tok.encode("a")
    assert tok.decode([tok.image_id, tok.encode("a")[0]], skip_special_tokens=False) == "<image>a"
    with pytest.raises(TokenizerError, match="no <image> piece"):
        Tokenizer.from_file(tmp_path / "t.model")
    with pytest.raises(TokenizerError, match=r"is the piece '<loc0000>'"):
        Tokenizer.from_file(tmp_path / "t.model", image_token_index=layout.loc_start)


def test_image_token_must_agree_with_config(spm_model_path, spm_layout):
    assert Tokenizer.from_file(spm_model_path).image_id == spm_layout.image_id
    with pytest.raises(TokenizerError, match="do not belong together"):
        Tokenizer.from_file(spm_model_path, image_token_index=spm_layout.image_id + 1)


def test_tokenizer_without_loc_tokens_is_rejected(tmp_path, spm_corpus_lines):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(spm_corpus_lines), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=100, hard_vocab_limit=False, pad_id=0, pad_piece="<pad>", eos_id=1,
                                   eos_piece="<eos>", bos_id=2, bos_piece="<bos>", unk_id=3, unk_piece="<unk>",
                                   minloglevel=2, num_threads=1)
    with pytest.raises(TokenizerError, match="<loc0000>..<loc1023>"):
        Tokenizer.from_file(tmp_path / "plain.model", image_token_index=10_000)


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="neither tokenizer.model nor tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the optional package were not installed
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
