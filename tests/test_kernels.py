"""The C++ kernels at every ISA level this machine runs, against torch arithmetic on random inputs.

Each kernel level (avx512bf16, avx2) the CPU supports is tested here, so an AVX-512 machine tests
the AVX2 build as well; `PALIGEMMA_ISA` and `kernels.use_level` cap the level, never raise it.
"""

import pytest
import torch
import torch.nn.functional as F

from paligemma import kernels
from paligemma.quantize import _int8_block, pack_int4, quantize_int4, quantize_weights, unpack_int4

KERNEL_LEVELS = [level for level in kernels.supported_levels() if level != "none"]


@pytest.fixture(params=KERNEL_LEVELS or [pytest.param("none", marks=pytest.mark.skip("no kernel level here"))])
def ops(request):
    with kernels.use_level(request.param):
        module = kernels.ops()
    if module is None:
        pytest.skip(f"the {request.param} kernels could not be built here (no compiler?)")
    assert module.isa() == request.param
    return module


# (rows, N, K): 1 to 8 input rows; K odd, not a multiple of the vector width, short and long; N not a
# multiple of the 48-row parallel block.
GEMV_SHAPES = [(1, 37, 64), (2, 130, 2100), (2, 17, 31), (1, 60, 5000), (3, 300, 100), (8, 1000, 2048),
               (5, 64, 32), (2, 50, 4160), (4, 7, 33), (6, 97, 1), (7, 49, 515), (1, 3, 16384)]


@pytest.mark.parametrize("rows, n, k", GEMV_SHAPES)
def test_bf16_gemv_equals_float_accumulation(ops, rows, n, k):
    g = torch.Generator().manual_seed(rows * k)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    exact = F.linear(x.float(), w.float())
    # float32 accumulation in another order: at most one bf16 rounding step apart.
    torch.testing.assert_close(ops.gemv_bf16(x, w).float(), exact, atol=1e-3, rtol=2 ** -8)
    strided = torch.randn(rows, 2 * k, generator=g).bfloat16()[:, ::2]  # taken as is: copied inside
    torch.testing.assert_close(ops.gemv_bf16(strided, w), ops.gemv_bf16(strided.contiguous(), w), atol=0, rtol=0)


def test_gemv_rejects_what_it_cannot_take(ops):
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="M must be 1..8"):
        ops.gemv_bf16(torch.zeros(9, 64, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match=r"x: \(M, K\) bf16"):
        ops.gemv_bf16(torch.zeros(1, 64), w)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.gemv_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), w[:, ::2])


def _int8_reference(q, scales):
    """The float32 weight an int8 layer stands for: q * its group's scale."""
    return q.float() * scales.repeat_interleave(q.shape[1] // scales.shape[1], dim=1)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n, k, group", [(37, 64, 32), (130, 512, 256), (24, 480, 96), (9, 2304, 128),
                                         (49, 160, 32)])
def test_int8_kernels_compute_what_the_layout_means(ops, rows, n, k, group):
    torch.manual_seed(rows)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, k // group) * 0.01
    weight = _int8_reference(q, scales)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    ops.dequantize_int8(q, scales, out)
    assert torch.equal(out, weight.bfloat16())  # bf16(q * scale), round to nearest even
    out32 = torch.empty(n, k)
    ops.dequantize_int8(q, scales, out32)
    assert torch.equal(out32, weight)  # q * scale is exact... as a float32 product, rounded once
    x = torch.randn(rows, k).bfloat16()
    exact = x.float() @ weight.t()  # the products are exact in float32; only the summation order differs
    torch.testing.assert_close(ops.gemv_int8(x, q, scales).float(), exact, atol=1e-3, rtol=2 ** -8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k, group", [(200, 256, 64), (33, 96, 32), (5, 512, 256)])
def test_int8_quantizing_kernel_matches_the_torch_arithmetic(ops, dtype, n, k, group):
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(n)) * 0.02).to(dtype)
    weight[n // 2, :group] = 0  # an all-zero group takes the 1e-8 floor scale
    weight[0, 0] = 0.5  # a large value: q = 127 exactly; others round half to even
    q, scales = torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // group)
    ops.quantize_int8(weight, q, scales)
    expected_q, expected_scales = _int8_block(weight.float().clone(), group)
    assert torch.equal(q, expected_q) and torch.equal(scales, expected_scales)


def _int4_reference(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 (N, K) weight that quantize_int4's output stands for: (q - 8) * scale + zero."""
    packed, scales_zeros = quantize_int4(weight, group)
    q = unpack_int4(packed).float()
    scale, zero = (scales_zeros[..., i].float().t().repeat_interleave(group, dim=1) for i in (0, 1))
    return (q - 8) * scale + zero


@pytest.mark.parametrize("rows, columns", [(64, 64), (128, 3072), (320, 96)])
def test_int4_packing_layout(rows, columns):
    q = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # torch's AVX-512 packer writes the same bytes
        assert torch.equal(pack_int4(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


@pytest.mark.parametrize("rows, columns, group, first_row", [(128, 256, 64, 64), (192, 512, 32, 0),
                                                             (64, 128, 128, 0), (256, 96, 32, 128)])
def test_int4_dequantizer_gives_the_layouts_weights(ops, rows, columns, group, first_row):
    weight = torch.randn(rows, columns, generator=torch.Generator().manual_seed(rows)) * 0.02
    packed, scales_zeros = quantize_int4(weight, group)
    expected = _int4_reference(weight, group)[first_row:].t()  # (K, rows - first_row)
    out = torch.empty(columns, rows - first_row)
    ops.dequantize_int4(packed, scales_zeros, first_row, out)
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=1e-6)  # one fused multiply-add vs two roundings
    out16 = torch.empty(columns, rows - first_row, dtype=torch.bfloat16)
    ops.dequantize_int4(packed, scales_zeros, first_row, out16)
    assert torch.equal(out16, out.bfloat16())
    with pytest.raises(RuntimeError, match="blocks of 64"):
        ops.dequantize_int4(packed, scales_zeros, 32, torch.empty(columns, 32, dtype=torch.bfloat16))


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="torch packs int4 in another layout without AVX-512")
def test_int4_dequantizer_gives_the_weights_torchs_kernel_multiplies(ops):
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, scales_zeros = quantize_int4(weight, 64)
    seen = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(256, dtype=torch.bfloat16), packed, 64,
                                                      scales_zeros)  # (K, N): column n is weight row n
    out = torch.empty(256, 128, dtype=torch.bfloat16)
    ops.dequantize_int4(packed, scales_zeros, 0, out)
    assert torch.equal(out, seen)


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize("n, k, group", [(64, 64, 32), (192, 512, 64), (128, 2304, 128), (320, 96, 32)])
def test_int4_gemv_computes_what_the_layout_means(ops, rows, n, k, group):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 0.02
    packed, scales_zeros = quantize_int4(weight, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
    exact = x.float() @ _int4_reference(weight, group).t()
    got = ops.gemv_int4(x, packed, scales_zeros).float()
    # float32 sums in another order (and q * x summed before scaling): one bf16 rounding step apart.
    torch.testing.assert_close(got, exact, atol=2e-3, rtol=2 ** -7)


def test_levels_are_capped_never_raised(monkeypatch):
    assert kernels.supported_levels()[-1] == "none"
    assert kernels.level() in kernels.supported_levels()
    with kernels.use_level("none"):
        assert kernels.level() == "none" and kernels.ops() is None and not kernels.native_bf16()
        with kernels.use_level("avx512bf16"):  # a cap never raises the level
            assert kernels.level() == "none"
    monkeypatch.setenv("PALIGEMMA_ISA", "none")
    assert kernels.ops() is None
    monkeypatch.setenv("PALIGEMMA_ISA", "avx3")
    with pytest.raises(ValueError, match="PALIGEMMA_ISA must be one of avx512bf16|avx2|none"):
        kernels.level()


def test_a_failed_build_falls_to_the_next_level(monkeypatch):
    if kernels.level() != "avx512bf16":
        pytest.skip("needs an AVX512-BF16 CPU, not capped below it")
    kernels.ops()  # built (or cached) before the monkeypatch
    real_build = kernels._build

    def failing_build(name):
        return None if name == "avx512bf16" else real_build(name)
    monkeypatch.setattr(kernels, "_build", failing_build)
    assert kernels.ops().isa() == "avx2"


def test_kernels_split_work_over_threads_with_the_same_results(ops):
    """Each output row is computed by one thread, so any thread count gives identical bits (the rest of
    the suite runs at 1 thread, conftest.one_thread)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 512, generator=g).bfloat16()
    w = (torch.randn(448, 512, generator=g) * 0.02).bfloat16()
    q, scales = torch.empty(448, 512, dtype=torch.int8), torch.empty(448, 2)
    packed, scales_zeros = quantize_int4(w.float(), 64)
    results = []
    for threads in (1, 4):  # more threads than tasks per thread on a 2-core machine: uneven splits
        torch.set_num_threads(threads)
        try:
            ops.quantize_int8(w, q, scales)
            dequantized = torch.empty(448, 512)
            ops.dequantize_int8(q, scales, dequantized)
            transposed = torch.empty(512, 448)
            ops.dequantize_int4(packed, scales_zeros, 0, transposed)
            results.append([ops.gemv_bf16(x, w), q.clone(), scales.clone(), dequantized, ops.gemv_int8(x, q, scales),
                            transposed, ops.gemv_int4(x, packed, scales_zeros),
                            ops.gemv_int4(x[:1], packed, scales_zeros)])
        finally:
            torch.set_num_threads(1)
    for one, many in zip(*results):
        assert torch.equal(one, many)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantizing_a_weight_that_requires_grad_leaves_no_autograd_history(mode):
    """The blocks pass through a scratch buffer shared by later calls: a trainable weight's history must not
    stick to it (it did, and a later QLoRA backward failed with an in-place modification error)."""
    weight = torch.nn.Parameter(torch.randn(128, 64))
    quantize_weights(weight, mode, 64)
    assert kernels.scratch((128, 64), torch.float32).grad_fn is None
    assert not kernels.scratch((128, 64), torch.float32).requires_grad
