"""Fine-tuning: data rows, the training loop's exactness (accumulation, processes, resume), LoRA, files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image

import paligemma
from paligemma.finetune import (Collator, DataError, FinetuneDataset, TrainConfig, apply_lora, load_adapter,
                                merge_lora, save_adapter, set_trainable, train)
from paligemma.finetune.schedule import lr_at
from tiny_models import tiny_config, write_hf_checkpoint
from conftest import hub_preprocessor_config

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30),
          "purple": (140, 30, 160), "orange": (250, 140, 20), "black": (5, 5, 5), "white": (250, 250, 250)}
SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several busy ones on a shared machine are 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, spm_model_path, spm_layout):
    """A complete tiny checkpoint folder: weights, tokenizer.model, preprocessor_config.json (28 px, 4 image tokens)."""
    directory = tmp_path_factory.mktemp("ft-base")
    base = tiny_config("gemma", kv_heads=1, image_size=28, patch_size=14)
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, vocab_size=spm_layout.vocab_size),
                                 image_token_index=spm_layout.image_id)
    write_hf_checkpoint(config, directory, lively=True)
    shutil.copy(spm_model_path, directory / "tokenizer.model")
    (directory / "preprocessor_config.json").write_text(json.dumps(hub_preprocessor_config(28, 4)))
    return directory


@pytest.fixture(scope="module")
def processor(base_dir):
    return paligemma.load_processor(base_dir)


def fresh_model(base_dir):
    return paligemma.load_model(base_dir, dtype=torch.float32)


def rows(n: int) -> list[dict]:
    """n examples, one flat-coloured 28 px image each, captioned with its colour (and a shape)."""
    names = list(COLORS)
    out = []
    for i in range(n):
        color, shape = names[i % 8], SHAPES[i % 4]
        suffix = f"a {color} {shape}" + (f" and a {names[7 - i % 8]} {shape}" if i % 2 else "")  # ragged lengths
        out.append({"image": Image.new("RGB", (28, 28), COLORS[color]), "prefix": "caption en", "suffix": suffix})
    return out


@pytest.fixture(scope="module")
def jsonl_dir(tmp_path_factory):
    """A folder with images/*.png and train.jsonl (8 rows) referencing them by relative path."""
    directory = tmp_path_factory.mktemp("ft-data")
    (directory / "images").mkdir()
    lines = []
    for i, row in enumerate(rows(8)):
        row["image"].save(directory / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prefix": row["prefix"], "suffix": row["suffix"]}))
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(out_dir=str(tmp_path / "out"), steps=3, lr=1e-3, batch_size=4, progress=False, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


# ---------------------------------------------------------------------- training works

def test_overfits_a_small_batch_and_writes_loadable_folders(tmp_path, base_dir, processor):
    data = rows(4)
    records = []
    model = fresh_model(base_dir)
    summary = train(model, processor, data, config(tmp_path, steps=60, lr=1e-2, warmup_steps=2, save_every=60,
                                                   model_dir=str(base_dir)),
                    eval_data=data, on_log=records.append)
    assert summary.losses[0] > 5 and summary.final_loss < 0.1, summary.losses[::5]
    final_eval = summary.evals[-1]
    assert final_eval["exact_match"] == 1.0 and final_eval["eval_loss"] < 0.1

    out = tmp_path / "out"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 61))
    assert set(train_lines[0]) >= {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed"}
    assert lines[-1]["exact_match"] == 1.0 and records == lines
    assert train_lines[0]["lr"] == pytest.approx(5e-3)  # warmup: (0 + 1) / 2 of the peak

    # checkpoint-60 and final are complete folders: our loader, our processor and transformers read them.
    for folder in (out / "checkpoint-60", out / "final"):
        assert {"config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json"} <= \
            {p.name for p in folder.iterdir()}
        reloaded = paligemma.load_model(folder)
        for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(a, b), name
    answers = paligemma.generate(reloaded, paligemma.load_processor(out / "final"), [r["image"] for r in data],
                                 [r["prefix"] for r in data], max_new_tokens=10)
    assert answers == [r["suffix"] for r in data]

    from transformers import PaliGemmaForConditionalGeneration
    hf = PaliGemmaForConditionalGeneration.from_pretrained(out / "final", attn_implementation="eager").eval()
    batch = Collator(processor)([FinetuneDataset(data)[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).loss, model.eval()(**batch).loss, rtol=1e-5, atol=1e-5)


def test_collated_batch_loss_equals_transformers(base_dir, processor, jsonl_dir):
    from transformers import PaliGemmaForConditionalGeneration
    dataset = FinetuneDataset.from_jsonl(jsonl_dir / "train.jsonl")
    batch = Collator(processor)([dataset[i] for i in (0, 3, 5)])  # ragged suffixes: right padding
    assert (batch["attention_mask"] == 0).any()
    hf = PaliGemmaForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = hf(**batch).loss
        got = fresh_model(base_dir)(**batch).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_equals_one_big_batch(tmp_path, base_dir, processor):
    data = rows(8)  # suffixes of different token lengths: a mean of micro-batch means would differ
    big, accumulated = fresh_model(base_dir), fresh_model(base_dir)
    # The vision tower is frozen here: the gradient of SigLIP's key bias is zero in exact arithmetic
    # (it shifts every score of a row equally), so it is pure rounding noise that Adam's normalisation
    # blows up to lr-sized, sign-random updates in both runs.
    common = dict(steps=2, shuffle=False, freeze=("vision",))
    s1 = train(big, processor, data, config(tmp_path / "a", batch_size=4, grad_accum=1, **common))
    s2 = train(accumulated, processor, data, config(tmp_path / "b", batch_size=2, grad_accum=2, **common))
    # batch 4 x 2 steps consumes rows 0-7; micro 2 x accum 2 x 2 steps consumes the same rows per step.
    assert s1.losses == pytest.approx(s2.losses, rel=1e-6, abs=1e-7)
    for (name, a), (_, b) in zip(big.state_dict().items(), accumulated.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path, base_dir, processor):
    model = fresh_model(base_dir)
    plain = train(fresh_model(base_dir), processor, rows(4), config(tmp_path / "a", steps=2))
    summary = train(model, processor, rows(4), config(tmp_path / "b", steps=2, bf16=True,
                                                       gradient_checkpointing=True))
    assert model.language_model.gradient_checkpointing and model.dtype == torch.float32
    assert summary.losses == pytest.approx(plain.losses, rel=0.05)  # bf16 rounding, same trajectory


def test_schedule_warms_up_linearly_then_decays_as_a_cosine():
    values = [lr_at(s, 1.0, total_steps=10, warmup_steps=2) for s in range(10)]
    assert values[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a > b for a, b in zip(values[2:], values[3:]))
    assert lr_at(6, 1.0, 10, 2) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(10, 1.0, 10, 2, min_lr_ratio=0.1) == pytest.approx(0.1)


# ---------------------------------------------------------------------- freezing

@pytest.mark.parametrize("freeze, attention_only, trained", [
    (("vision",), False, {"multi_modal_projector", "language_model"}),
    (("vision", "projector"), False, {"language_model"}),
    (("decoder",), False, {"vision_tower", "multi_modal_projector", "embed_tokens"}),
    (("embeddings",), False, {"vision_tower", "multi_modal_projector", "language_model"}),
    ((), True, {"self_attn"}),
])
def test_freezing_freezes_what_it_says(tmp_path, base_dir, processor, freeze, attention_only, trained):
    model = fresh_model(base_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, processor, rows(4), config(tmp_path, steps=1, lr=1e-2, freeze=freeze,
                                            attention_only=attention_only))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name in before:
        if attention_only:
            expected = name.startswith("language_model.layers.") and ".self_attn." in name
        elif "embeddings" in freeze and "embed_tokens" in name:
            expected = False
        elif "decoder" in freeze and name.startswith("language_model.") and "embed_tokens" not in name:
            expected = False
        else:
            expected = any(name.startswith(t) or t in name for t in trained)
        assert (name in changed) == expected, name
    with pytest.raises(ValueError, match="unknown"):
        set_trainable(model, freeze=("vison",))


# ---------------------------------------------------------------------- data rows

def test_bad_rows_are_reported_with_line_numbers_and_skipped(jsonl_dir, tmp_path):
    (tmp_path / "notimage.png").write_text("not an image")
    good = json.dumps({"image": str(jsonl_dir / "images" / "0.png"), "prefix": "caption en", "suffix": "a red circle"})
    lines = [
        good,                                                                              # 1 ok
        '{"image": "missing.png", "prefix": "caption en", "suffix": "x"}',                 # 2 no such file
        '{"image": "notimage.png", "prefix": "caption en", "suffix": "x"}',                # 3 unreadable
        '{"image": "' + str(jsonl_dir / "images" / "1.png") + '", "prefix": "caption en"}',  # 4 no suffix
        '{"image": "' + str(jsonl_dir / "images" / "1.png") + '", "prefix": 3, "suffix": "x"}',  # 5 not a string
        '{"image": "x.png", "prefix": ',                                                   # 6 bad JSON
        "",                                                                                # blank: ignored
        good,                                                                              # 8 ok
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 5 bad row"):
        dataset = FinetuneDataset.from_jsonl(path)
    assert len(dataset) == 2 and dataset[1].where == f"{path}:8"
    reported = [p.split(": ", 1)[0] for p in dataset.problems]
    assert reported == [f"{path}:{n}" for n in (2, 3, 4, 5, 6)]
    for fragment in ("does not exist", "not a readable image", "missing field(s) ['suffix']", "'prefix' must be a string",
                     "not valid JSON"):
        assert any(fragment in p for p in dataset.problems), fragment
    with pytest.raises(DataError, match=f"{path}:2: image"):
        FinetuneDataset.from_jsonl(path, strict=True)


def test_dataset_from_python_rows_and_relative_paths(jsonl_dir, processor):
    dataset = FinetuneDataset.from_jsonl(jsonl_dir / "train.jsonl")
    assert len(dataset) == 8 and dataset[2].image == str(jsonl_dir / "images" / "2.png")
    from_tuples = FinetuneDataset([(r["image"], r["prefix"], r["suffix"]) for r in rows(3)])
    assert [e.suffix for e in from_tuples] == [r["suffix"] for r in rows(3)]
    with pytest.raises(DataError, match="row 1: missing field"):
        FinetuneDataset([rows(1)[0], {"image": "x"}], strict=True)
    batch = Collator(processor)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 28, 28) and (batch["labels"] != -100).any()
