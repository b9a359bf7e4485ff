"""Fine-tuning: data rows, the training loop's exactness (accumulation, processes, resume), LoRA, files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from PIL import Image

import paligemma
from paligemma.finetune import (
    Collator,
    DataError,
    FinetuneDataset,
    TrainConfig,
    evaluate,
    load_adapter,
    merge_lora,
    save_adapter,
    set_trainable,
    train,
)
from paligemma.finetune.schedule import lr_at
from paligemma.finetune.step import count_targets, train_step
from paligemma.process_group import leave_process_group

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30),
          "purple": (140, 30, 160), "orange": (250, 140, 20), "black": (5, 5, 5), "white": (250, 250, 250)}
SHAPES = ["circle", "square", "triangle", "star"]


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


def test_train_step_gradient_is_that_of_the_token_weighted_mean(base_dir, processor):
    """Two micro-batches with different numbers of target tokens accumulate the gradient of the mean
    over the union of their tokens (one batch holding all three examples), not a mean of their means."""
    examples = [FinetuneDataset(rows(3))[i] for i in range(3)]
    collate = Collator(processor)
    micro = [collate(examples[:2]), collate(examples[2:])]
    counts = [count_targets(b["labels"]) for b in micro]
    assert counts[0] != 2 * counts[1]  # so a mean of the two means weighs the tokens differently
    model = fresh_model(base_dir)
    params = [p for p in model.parameters() if p.requires_grad]

    loss, grad_norm = train_step(model, micro, params)
    accumulated = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    union = model(**collate(examples)).loss
    union.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    assert loss == pytest.approx(union.item(), rel=1e-6)
    with torch.no_grad():
        mean_of_means = sum(model(**b).loss.item() for b in micro) / 2
    assert abs(mean_of_means - union.item()) > 1e-3
    # float32 sums in another order: equal to ~1e-5 of each tensor's largest entry (SigLIP's key
    # biases, zero in exact arithmetic, are pure rounding noise: hence the absolute 1e-8).
    for (name, _), got, want in zip(model.named_parameters(), accumulated, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item() + 1e-8, msg=name)
    assert grad_norm == pytest.approx(torch.linalg.vector_norm(torch.stack([g.norm() for g in expected])).item(),
                                      rel=1e-5)

    # Clipping scales the gradients to max_grad_norm; the norm returned is the one before clipping.
    clipped_loss, clipped_norm = train_step(model, micro, params, max_grad_norm=grad_norm / 2)
    assert (clipped_loss, clipped_norm) == pytest.approx((loss, grad_norm), rel=1e-6)
    for p, want in zip(params, expected):
        torch.testing.assert_close(p.grad, want / 2, rtol=0, atol=1e-4 * want.abs().max().item() + 1e-8)


def test_loss_only_forward_equals_the_full_logits_loss_and_gradients(base_dir, processor):
    """forward(loss_only=True), as train_step calls it, runs the LM head on the answer positions only:
    the same loss and gradients as the full (B, T, V) logits, and logits (N, V) for the N targets."""
    batch = Collator(processor)([FinetuneDataset(rows(3))[i] for i in range(3)])
    model = fresh_model(base_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch)
    full.loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    short = model(**batch, loss_only=True)
    short.loss.backward()
    n = count_targets(batch["labels"])
    assert short.logits.shape == (n, full.logits.shape[-1])
    torch.testing.assert_close(short.logits, full.logits[:, :-1][batch["labels"][:, 1:] != -100])
    torch.testing.assert_close(short.loss, full.loss, rtol=1e-6, atol=0)
    for (name, p), want in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-5 * want.abs().max().item() + 1e-8, msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        model(batch["input_ids"], loss_only=True)

    # A micro-batch without any target still gives every trainable parameter a (zero) gradient.
    model.zero_grad(set_to_none=True)
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    train_step(model, [empty, batch], params)
    assert all(p.grad is not None for p in params)


def test_evaluate_on_a_scene_dataset_reads_and_preprocesses_each_example_once(base_dir, processor, monkeypatch):
    from paligemma.demo.train import SceneDataset

    reads = []

    class CountingScenes(SceneDataset):
        def __getitem__(self, index):
            reads.append(index)
            return super().__getitem__(index)

    dataset = CountingScenes(5, seed0=321)
    images_preprocessed = []
    image_processor = processor.image_processor
    monkeypatch.setattr(processor, "image_processor",
                        lambda images, **kw: images_preprocessed.extend(images) or image_processor(images, **kw))
    model = fresh_model(base_dir)
    result = evaluate(model, processor, dataset, batch_size=2, max_new_tokens=6)
    assert sorted(reads) == list(range(5)) and len(images_preprocessed) == 5
    monkeypatch.undo()

    # The same figures as a plain forward over the whole set and `generate` (its own preprocessing).
    examples = [dataset[i] for i in range(5)]
    with torch.no_grad():
        loss = model(**Collator(processor)(examples)).loss.item()
    answers = paligemma.generate(model, processor, [e.image for e in examples], [e.prefix for e in examples],
                                 max_new_tokens=6)
    assert result["num_examples"] == 5 and result["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert [shown["answer"] for shown in result["examples"]] == answers[:3]
    assert result["exact_match"] == sum(a.strip() == e.suffix.strip() for a, e in zip(answers, examples)) / 5


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
    for fragment in ("does not exist", "not a readable image", "missing field(s) ['suffix']",
                     "'prefix' must be a string",
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


# ---------------------------------------------------------------------- resume

class _Crash(Exception):
    pass


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, base_dir, processor, lora_rank):
    # 8 rows, micro-batch 2, accumulation 2: steps 4-6 cross an epoch boundary after the resume.
    # LoRA dropout makes the run depend on the torch RNG, so its restoration is checked too.
    settings = dict(steps=6, batch_size=2, grad_accum=2, save_every=3, lr=3e-3, lora_rank=lora_rank,
                    lora_dropout=0.2 if lora_rank else 0.0, model_dir=str(base_dir))
    whole_model = fresh_model(base_dir)
    whole = train(whole_model, processor, rows(8), config(tmp_path / "whole", **settings))

    def crash_after_step_4(record):
        if record.get("step") == 4:
            raise _Crash

    with pytest.raises(_Crash):
        train(fresh_model(base_dir), processor, rows(8), config(tmp_path / "cut", **settings),
              on_log=crash_after_step_4)
    assert {p.name for p in (tmp_path / "cut" / "out").glob("checkpoint-*")} == {"checkpoint-3"}
    resumed_model = fresh_model(base_dir)
    resumed = train(resumed_model, processor, rows(8), config(tmp_path / "cut", resume=True, **settings))
    assert resumed.losses == whole.losses[3:]
    for (name, a), (_, b) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    metrics = [json.loads(line) for line in (tmp_path / "cut" / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 7))  # the interrupted run's step 4 was replaced
    state = json.loads((tmp_path / "cut" / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["micro_batches"] == 6 and state["epoch"] == 1.5


# ---------------------------------------------------------------------- LoRA

def test_lora_trains_adapters_only_and_merges_to_the_same_logits(tmp_path, base_dir, processor):
    model = fresh_model(base_dir)
    base_state = {name: t.clone() for name, t in model.state_dict().items()}
    summary = train(model, processor, rows(4), config(tmp_path, steps=20, lr=3e-2, lora_rank=4,
                                                       model_dir=str(base_dir)))
    assert summary.final_loss < summary.losses[0] - 1.5  # learning (adapters start at B = 0: slowly)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n and n.startswith("language_model.layers.") for n in trained)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trained} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, tensor in model.state_dict().items():  # base weights untouched
        if ".lora_" not in name:
            assert torch.equal(tensor, base_state[name.replace(".base_layer.", ".")]), name

    batch = Collator(processor)(FinetuneDataset(rows(4)).examples)
    model.eval()
    merged = merge_lora(model).eval()
    assert type(merged) is paligemma.PaliGemma and not any(".lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-5)

    # Adapters alone, in peft's layout, re-applied to a fresh base: same logits.
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    restored = load_adapter(fresh_model(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).logits, expected, rtol=0, atol=0)

    # final/ holds the merged model (loadable by us and transformers) and the adapter files.
    final = tmp_path / "out" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(paligemma.load_model(final)(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        from transformers import PaliGemmaForConditionalGeneration
        hf = PaliGemmaForConditionalGeneration.from_pretrained(final, attn_implementation="eager").eval()
        real = batch["attention_mask"].bool()  # padded positions' logits are arbitrary in both
        torch.testing.assert_close(hf(**batch).logits[real], expected[real], rtol=1e-4, atol=1e-4)
        # peft itself applies the saved adapter to transformers' base model: the files are interchangeable.
        from peft import PeftModel
        base = PaliGemmaForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager")
        with_adapter = PeftModel.from_pretrained(base, final / "adapter").eval()
        torch.testing.assert_close(with_adapter(**batch).logits[real], expected[real], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- several processes, the CLI

def _cli_args(base_dir, jsonl_dir, out, *extra):
    return ["--model", str(base_dir), "--data", str(jsonl_dir / "train.jsonl"), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup-steps", "1", "--weight-decay", "0.1",
            "--freeze", "vision", "--no-progress", *extra]  # vision frozen: see test_accumulation_equals_one_big_batch


def _torchrun(root, args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "paligemma.finetune.cli", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_ddp_and_fsdp_match_one_process(tmp_path, base_dir, jsonl_dir):
    from pathlib import Path

    from paligemma.finetune.cli import main

    root = Path(__file__).resolve().parents[1]
    assert main(_cli_args(base_dir, jsonl_dir, tmp_path / "one")) == 0
    _torchrun(root, _cli_args(base_dir, jsonl_dir, tmp_path / "ddp"))
    _torchrun(root, _cli_args(base_dir, jsonl_dir, tmp_path / "fsdp", "--fsdp", "--save-every", "2"))
    one = _losses(tmp_path / "one")
    assert len(one) == 3
    assert _losses(tmp_path / "ddp") == pytest.approx(one, rel=1e-6)
    assert _losses(tmp_path / "fsdp") == pytest.approx(one, rel=1e-6)
    # Gradients are summed in another order across processes; Adam turns the rounding of near-zero
    # entries into differences well below 1% of one update (lr 3e-3).
    reference = paligemma.load_model(tmp_path / "one" / "final").state_dict()
    for run in ("ddp", "fsdp"):
        weights = paligemma.load_model(tmp_path / run / "final").state_dict()
        for name, tensor in reference.items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=3e-5, msg=f"{run}: {name}")

    # FSDP's checkpoint is unsharded and keyed by name: one process resumes from it.
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", tmp_path / "from-fsdp" / "checkpoint-2")
    assert main(_cli_args(base_dir, jsonl_dir, tmp_path / "from-fsdp", "--resume")) == 0
    assert _losses(tmp_path / "from-fsdp")[-1] == pytest.approx(one[-1], rel=1e-6)


def test_cli_reports_bad_data_and_unsupported_options(tmp_path, base_dir, capsys):
    from paligemma.finetune.cli import main

    (tmp_path / "bad.jsonl").write_text('{"image": "nope.png", "prefix": "p", "suffix": "s"}\n')
    code = main(["--model", str(base_dir), "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o"),
                 "--strict", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl:1: image" in err  # a user error (docs/cli.md): one line, no traceback
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def test_limit_heap_growth_sets_glibc_mmap_threshold_once():
    import platform

    from paligemma.finetune.step import limit_heap_growth

    assert limit_heap_growth() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert limit_heap_growth.cache_info().currsize == 1  # once per process; train_step calls it every step


def test_leave_process_group_leaves_the_group_and_is_a_no_op_without_one():
    """`paligemma finetune` leaves its process group before exiting (a gloo group left to the interpreter's
    exit made a finished rank abort now and then); without a group it does nothing."""
    leave_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
