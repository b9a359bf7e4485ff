"""The same checks on every device this machine has: the CPU always, CUDA when `torch.cuda.is_available()`.

Parity with transformers, greedy generation, and one fine-tuning step (full, LoRA, and QLoRA: our
int8/int4 kernels on the CPU, bitsandbytes nf4 on CUDA when installed). Plus the device-independent
pieces: `--device auto`, autocast by device type, bf16 autocast computing in float32 on a CPU
without native bf16. Run it alone on a GPU machine: `python -m pytest tests/test_device.py -q`.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import torch
from PIL import Image
from tiny_models import random_batch, tiny_config, write_complete_checkpoint, write_hf_checkpoint

import paligemma
from paligemma.attention_mask import prefix_lm_mask
from paligemma.cli import main
from paligemma.cli_common import load, parse_device
from paligemma.finetune import step as step_module
from paligemma.finetune.distributed import process_device
from paligemma.finetune.lora import apply_lora, quantize_base
from paligemma.finetune.step import autocast_context, train_step
from paligemma.kernels import native_bf16, use_level

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """(config, transformers' model on the CPU, its checkpoint folder): hidden 64 so int4 groups divide it."""
    config = tiny_config("gemma", hidden=64, kv_heads=2)
    directory = tmp_path_factory.mktemp("device-ref")
    reference = write_hf_checkpoint(config, directory)
    return config, reference, directory


@pytest.mark.parametrize("device", DEVICES)
def test_logits_match_transformers_on_the_device(device, reference_dir):
    config, reference, directory = reference_dir
    ours = paligemma.load_model(directory, device=device)
    assert ours.device.type == device
    batch = random_batch(config)
    with torch.no_grad():
        expected = reference(**batch).logits
        got = ours(**{k: v.to(device) for k, v in batch.items()}).logits
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, atol=2e-4 if device == "cpu" else 2e-3, rtol=0)


@pytest.fixture(scope="module")
def complete_dir(tmp_path_factory, spm_model_path, spm_layout):
    directory = tmp_path_factory.mktemp("device-complete")
    write_complete_checkpoint(directory, "gemma", spm_model_path, spm_layout, kv_heads=1, hidden=64)
    return directory


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_on_the_device_equals_the_plain_cpu_models(device, complete_dir):
    """As `paligemma generate --device` loads it (optimized for inference), against the model as trained."""
    images = [Image.new("RGB", (28, 28), (230, 20, 20)), Image.new("RGB", (28, 28), (20, 40, 220))]
    answers = []
    for where, optimize in (("cpu", False), (device, True)):
        model, processor, _ = load(complete_dir, "float32", where, optimize=optimize)
        assert model.device.type == where
        answers.append(paligemma.generate(model, processor, images, ["caption en"] * 2, max_new_tokens=6))
    assert answers[1] == answers[0] and all(answers[0])


def _finetune_model(directory, device: str, how: str):
    model = paligemma.load_model(directory, dtype=torch.float32, device=device)
    if how in ("int8", "int4"):
        if device == "cuda" and (how == "int8" or importlib.util.find_spec("bitsandbytes") is None):
            pytest.skip("QLoRA on CUDA is bitsandbytes' nf4 (int4), which is not installed here")
        quantize_base(model, how)
    if how != "full":
        apply_lora(model, rank=4)
    model.train()
    return model


@pytest.mark.parametrize("how", ["full", "lora", "int8", "int4"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_finetuning_step_on_the_device(device, how, reference_dir):
    pytest.importorskip("peft")
    config, _, directory = reference_dir
    batch = random_batch(config, seed=3)  # CPU tensors, as the collator builds them: train_step moves them
    model = _finetune_model(directory, device, how)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, grad_norm = train_step(model, [batch], params)
    assert all(p.grad is not None and p.grad.device.type == device for p in params)
    assert torch.isfinite(torch.tensor(loss)) and grad_norm > 0
    if device != "cpu" and how in ("full", "lora"):  # the same arithmetic on the CPU: the same loss
        cpu_model = _finetune_model(directory, "cpu", how)
        cpu_loss, _ = train_step(cpu_model, [batch], [p for p in cpu_model.parameters() if p.requires_grad])
        assert loss == pytest.approx(cpu_loss, rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_steps_on_a_padded_batch_stay_finite(device, reference_dir):
    """Padding queries are fully masked rows. Their mask must stay finite when bf16 autocast casts it: float32's
    minimum rounds to -inf in bf16, and CUDA's attention then returns NaN rows whose gradients turned every
    weight into NaN after one step (the demo's first GPU run)."""
    config, _, directory = reference_dir
    batch = random_batch(config, seed=4)
    batch["attention_mask"][1, -3:] = 0  # row 1 ends in 3 padding tokens
    batch["labels"][1, -3:] = -100
    model = _finetune_model(directory, device, "full")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for _ in range(2):
        loss, grad_norm = train_step(model, [batch], params, bf16=True)
        assert all(torch.isfinite(p.grad).all() for p in params) and torch.isfinite(torch.tensor(grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(torch.tensor(loss))


def test_the_attention_mask_stays_finite_in_every_compute_dtype():
    valid = torch.tensor([[True, True, False]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        mask = prefix_lm_mask(torch.arange(3), valid, valid, valid, None, dtype)
        for compute in (torch.bfloat16, torch.float16 if dtype == torch.float16 else torch.bfloat16):
            assert torch.isfinite(mask.to(compute)).all(), (dtype, compute)
        assert mask.min() < -1e4  # still a mask


@pytest.mark.parametrize("device", DEVICES)
def test_demo_eval_on_the_device_scores_as_on_the_cpu(device, capsys):
    """`paligemma demo-eval --device`: the bundled model's answers, hence its scores, are the CPU's."""
    arguments = ["demo-eval", "--scenes", "3", "--batch-size", "8", "--json"]
    scores = []
    for where in ("cpu", device):
        assert main(arguments + ["--device", where]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[1] == scores[0] and scores[0]["detection_recall"] > 0


def test_auto_is_cuda_when_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_device("auto").type == expected
    assert process_device("auto").type == expected
    assert process_device("cpu") == torch.device("cpu")
    with pytest.raises(paligemma.errors.UsageError, match="not a torch device"):
        parse_device("gpu0")


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_follows_the_device_type(device):
    with autocast_context(False, device):
        assert not torch.is_autocast_enabled(device)
    if device == "cpu" and not native_bf16():
        pytest.skip("this CPU computes --bf16 in float32 (next test)")
    with autocast_context(True, device):
        assert torch.is_autocast_enabled(device)
        assert torch.get_autocast_dtype(device) == torch.bfloat16


def test_bf16_on_a_cpu_without_native_bf16_computes_in_float32_and_says_so_once(caplog):
    step_module._say_float32_once.cache_clear()
    with use_level("avx2"), caplog.at_level(logging.WARNING):
        for _ in range(3):
            with autocast_context(True, "cpu"):
                assert not torch.is_autocast_enabled("cpu")
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert sum("computes in float32" in record.getMessage() for record in caplog.records) == 1
