"""QLoRA: LoRA adapters over our frozen int8/int4 `QuantizedLinear` layers (finetune.lora.quantize_base).

The quantized layer's backward (grad_x = grad_y @ dequantized W, a block at a time) is checked against
autograd through the same weights in float, at every ISA level this machine runs; the adapters'
gradients against those of the same LoRA on the dequantized float model; training end to end, the
merge into a float checkpoint, and `paligemma finetune --quantize` then `paligemma generate`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from tiny_models import random_batch, tiny_config, write_complete_checkpoint

import paligemma
from paligemma.cli import main as cli_main
from paligemma.finetune import TrainConfig, train
from paligemma.finetune.data import Collator, FinetuneDataset
from paligemma.finetune.lora import apply_lora, merge_lora, quantize_base
from paligemma.kernels import supported_levels, use_level
from paligemma.model import PaliGemma
from paligemma.quantize import QuantizedLinear

pytest.importorskip("peft")
LEVELS = supported_levels()
# bf16 tolerance: the quantized layers multiply bf16 activations (kernels) or in bf16 (native-bf16 CPUs).
BF16_RTOL = 2e-2


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 300])  # the kernels' GEMV (<= 8 rows) and the blocks path
def test_quantized_layer_backward_is_grad_y_times_the_dequantized_weight(level, mode, rows):
    torch.manual_seed(0)
    weight = torch.randn(200, 256)  # 200 rows: int4 pads to 256, the padding must not leak into grad_x
    with use_level(level):
        layer = QuantizedLinear(weight, mode)
    dense = layer.dequantize()
    assert relative_error(dense, weight) < (0.01 if mode == "int8" else 0.15)  # it is W, quantized
    x = torch.randn(rows, 256, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    assert relative_error(y.detach(), x.detach() @ dense.T) < BF16_RTOL
    assert relative_error(x.grad, grad_y @ dense) < BF16_RTOL
    assert not list(layer.parameters())  # nothing of the layer's trains


def _tiny_model(seed: int = 0) -> PaliGemma:
    torch.manual_seed(seed)
    return PaliGemma(tiny_config("gemma", hidden=64, kv_heads=2)).float()  # widths multiples of 32


def _lora_pair(mode: str, level: str, checkpointing: bool):
    """(QLoRA model, the same LoRA on a float model whose projections are the dequantized weights)."""
    base = _tiny_model()
    quantized = copy.deepcopy(base)
    with use_level(level):
        quantize_base(quantized, mode)
    reference = copy.deepcopy(base)
    for layer_q, layer_f in zip(quantized.language_model.layers, reference.language_model.layers):
        for part in ("self_attn", "mlp"):
            for name, module in getattr(layer_q, part).named_children():
                if isinstance(module, QuantizedLinear):
                    getattr(getattr(layer_f, part), name).weight.data = module.dequantize()
    for model in (quantized, reference):
        torch.manual_seed(1)
        apply_lora(model, rank=4, alpha=8.0)
        with torch.no_grad():  # B starts at zero, which would leave A without gradient
            for name, param in model.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        model.language_model.gradient_checkpointing = checkpointing
        model.train()
    return quantized, reference


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_gradients_equal_those_on_the_dequantized_float_model(mode, level):
    quantized, reference = _lora_pair(mode, level, checkpointing=level == LEVELS[-1])
    batch = random_batch(quantized.config, batch=2)
    grads = []
    for model in (quantized, reference):
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 3  # A and B, 7 projections, 3 layers
    assert not any(p.requires_grad for n, p in quantized.named_parameters() if ".lora_" not in n)
    for name in grads[1]:
        assert grads[0][name] is not None and relative_error(grads[0][name], grads[1][name]) < BF16_RTOL, name


def test_gradient_checkpointing_gives_the_same_gradients():
    runs = []
    for checkpointing in (False, True):
        quantized, _ = _lora_pair("int4", LEVELS[0], checkpointing)
        quantized(**random_batch(quantized.config, batch=2)).loss.backward()
        runs.append({n: p.grad for n, p in quantized.named_parameters() if p.requires_grad})
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- training and merging

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 30)}
ANSWERS = {"red": "a star", "green": "a circle", "blue": "a square", "yellow": "a triangle"}  # a new mapping


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, spm_model_path, spm_layout):
    directory = tmp_path_factory.mktemp("qlora-base")
    write_complete_checkpoint(directory, "gemma", spm_model_path, spm_layout, kv_heads=1, hidden=64)
    return directory


def _rows() -> list[dict]:
    """The answer depends on the image alone: the prompt is the same for every row."""
    return [{"image": Image.new("RGB", (28, 28), rgb), "prefix": "caption en", "suffix": ANSWERS[color]}
            for color, rgb in COLORS.items()]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_learns_an_image_dependent_answer_and_merges_to_a_float_checkpoint(tmp_path, base_dir, mode):
    processor = paligemma.load_processor(base_dir)
    model = paligemma.load_model(base_dir, dtype=torch.float32)
    data = _rows()
    before = paligemma.generate(model, processor, [r["image"] for r in data], [r["prefix"] for r in data],
                                max_new_tokens=4)
    assert before != [r["suffix"] for r in data]
    config = TrainConfig(out_dir=str(tmp_path / "out"), steps=40, lr=2e-2, batch_size=4, lora_rank=8, seed=0,
                         quantize=mode, gradient_checkpointing=True, progress=False, model_dir=str(base_dir))
    summary = train(model, processor, data, config, eval_data=data)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 7 * 3
    assert summary.evals[-1]["exact_match"] == 1.0, (summary.losses[::5], summary.evals[-1]["examples"])

    # final/: a float checkpoint holding dequantize(Q) + B A alpha/r; its logits are the QLoRA model's.
    final = tmp_path / "out" / "final"
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged = paligemma.load_model(final, dtype=torch.float32).eval()
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    batch = Collator(processor)(FinetuneDataset(data).examples)
    with torch.no_grad():
        qlora_logits = model.eval()(**batch).logits
        merge_error = relative_error(merged(**batch).logits, qlora_logits)
        assert merge_error < BF16_RTOL, merge_error
        torch.testing.assert_close(merge_lora(model)(**batch).logits, merged(**batch).logits)
    answers = paligemma.generate(merged, processor, [r["image"] for r in data], [r["prefix"] for r in data],
                                 max_new_tokens=4)
    assert answers == [r["suffix"] for r in data]


def test_quantize_needs_lora():
    with pytest.raises(ValueError, match="needs LoRA"):
        TrainConfig(quantize="int4")


def test_cli_finetune_quantize_int4_then_generate_on_the_merged_demo_model(tmp_path, capsys):
    image = tmp_path / "red.png"
    Image.new("RGB", (112, 112), (230, 20, 20)).save(image)
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"image": str(image), "prefix": "caption en", "suffix": "a red square"}) + "\n")
    demo = paligemma.cli_common.DEMO_MODEL_DIR
    code = cli_main(["finetune", "--model", str(demo), "--data", str(tmp_path / "train.jsonl"), "--out",
                     str(tmp_path / "run"), "--quantize", "int4", "--lora-rank", "8", "--steps", "2",
                     "--batch-size", "1", "--gradient-checkpointing", "--no-progress", "--device", "cpu"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and report["trainable_parameters"] > 0
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text()).get("quantization") is None  # a float checkpoint
    code = cli_main(["generate", "--model", str(final), "--image", str(image), "--prompt", "caption en",
                     "--max-new-tokens", "5", "--device", "auto"])
    out = capsys.readouterr().out
    assert code == 0 and out.strip()


# ---------------------------------------------------------------------- bf16 weights without native bf16

class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the dtypes of every matrix product's operands, forward and backward."""

    PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_attention_math", "linear", "matmul"}

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            self.seen |= {(func.overloadpacket.__name__, a.dtype) for a in args if isinstance(a, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_bf16_weights_on_a_cpu_without_native_bf16_train_in_float32(tmp_path, base_dir, quantize):
    """Every product of a step, forward and backward, is float32; the step equals the float32 model's whose
    weights are the same bf16 values; training, evaluation (generation) and merging work."""
    from paligemma.finetune.widening import needs_widening

    processor = paligemma.load_processor(base_dir)
    data = _rows()
    batch = Collator(processor)(FinetuneDataset(data).examples)
    with use_level("avx2"):
        models = {}
        for dtype in (torch.bfloat16, torch.float32):
            model = paligemma.load_model(base_dir, dtype=torch.bfloat16).to(dtype)
            config = TrainConfig(out_dir=str(tmp_path / str(dtype)), steps=1, lr=0.0, batch_size=4, lora_rank=4,
                                 quantize=quantize, progress=False, model_dir=str(base_dir))
            assert needs_widening(model) == (dtype == torch.bfloat16)
            train(model, processor, data, config, eval_data=data)  # lr 0: the adapters stay as initialised
            models[dtype] = model
        adapters = {n: p for n, p in models[torch.float32].named_parameters() if ".lora_" in n}
        with torch.no_grad():  # peft initialised the bf16 model's adapters in bf16: give both the same
            for name, param in adapters.items():
                if ".lora_B." in name:  # B = 0 would leave A without gradient
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
            for name, param in models[torch.bfloat16].named_parameters():
                if ".lora_" in name:
                    assert param.dtype == torch.float32
                    param.copy_(adapters[name])
        grads = {}
        for dtype, model in models.items():
            torch.manual_seed(0)
            with _MatmulDtypes() as products:
                model.train()(**batch).loss.backward()
            grads[dtype] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            assert {d for _, d in products.seen} == {torch.float32}, products.seen
    for name, grad in grads[torch.float32].items():
        torch.testing.assert_close(grads[torch.bfloat16][name], grad, rtol=1e-4, atol=1e-6)
    merged = paligemma.load_model(tmp_path / str(torch.bfloat16) / "final")
    assert merged.dtype == torch.bfloat16 and {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_two_processes_match_one_with_a_quantized_base(tmp_path, base_dir):
    """torchrun (gloo, DDP) over a QLoRA model: the same losses as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "images").mkdir()
    lines = []
    for i, row in enumerate(_rows()):
        row["image"].save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prefix": row["prefix"], "suffix": row["suffix"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")

    def args(out):
        return ["--model", str(base_dir), "--data", str(tmp_path / "train.jsonl"), "--out", str(out), "--steps", "3",
                "--batch-size", "4", "--lr", "1e-2", "--quantize", "int4", "--lora-rank", "4", "--no-progress"]

    assert cli_main(["finetune", *args(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "paligemma.finetune.cli", *args(tmp_path / "two")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(tmp_path / "one")) == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_int4_quantization_runs_on_one_thread_and_leaves_the_thread_count_as_it_was():
    """quantize_int4 works on one thread (its many small ops stall on busy machines otherwise) and gives
    the bytes of the whole matrix quantized at once, on any number of threads."""
    from paligemma.quantize import _int4_block, pack_int4, quantize_int4

    weight = torch.randn(640, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        packed, scales_zeros = quantize_int4(weight, 64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    expected = _int4_block(weight.float(), 64, pack_int4)
    assert torch.equal(packed, expected[0]) and torch.equal(scales_zeros, expected[1])
