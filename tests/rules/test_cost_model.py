"""The cost model that picks the direct or ghost norm per layer (dpfast/rules/_norms.py)."""
import pytest
import torch

from dpfast.rules._norms import direct_cost, ghost_cost, kernel_cost, prefer_ghost

# U-Net levels of the ddpm model as (T positions incl. K, d = Cin*kh*kw, p = Cout)
TOP_3x3 = (1024, 128 * 9, 128)       # 32x32 conv: direct
LOW_3x3 = (16, 256 * 9, 256)         # 4x4 conv: ghost (16 positions vs 2304x256 weights)
LOW_3x3_K32 = (16 * 32, 256 * 9, 256)  # the same with multiplicity 32: direct again
ATTN_16 = (256, 256, 256)            # qkv projection at 16x16: direct


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_u_net_levels(dtype):
    assert not prefer_ghost(*TOP_3x3, kernel_dtype=dtype)
    assert prefer_ghost(*LOW_3x3, kernel_dtype=dtype)
    assert not prefer_ghost(*LOW_3x3_K32, kernel_dtype=dtype)
    assert not prefer_ghost(*ATTN_16, kernel_dtype=dtype)


@pytest.mark.parametrize("T,d,p", [TOP_3x3, LOW_3x3, LOW_3x3_K32, ATTN_16, (7, 3, 5), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_cost_is_at_least_the_useful_flops(T, d, p, dtype):
    # padding to tiles and memory traffic only ever add to the work the math needs
    assert kernel_cost("direct", T, d, p, dtype) >= 2.0 * T * d * p
    assert kernel_cost("ghost", T, d, p, dtype) >= T * T * (d + p)  # upper triangle of the Grams
    assert direct_cost(T, d, p) > 0 and ghost_cost(T, d, p) > 0


def test_tiles_make_tiny_layers_cost_a_whole_tile():
    # a 3-channel layer fills 3/32 of a tile in each dimension: it costs (at least) a whole tile
    assert kernel_cost("direct", 1024, 3, 3, torch.float32) >= 2.0 * 1024 * 32 * 32
    assert kernel_cost("ghost", 16, 3, 3, torch.bfloat16) >= 2.0 * 32 * 32 * (32 + 32)


def test_thin_layers_are_memory_bound():
    # d = p = 8 over 4096 positions: the direct kernel's time is reading A and G once (bf16 bytes
    # x the tensor-core machine balance), not its padded FLOPs
    assert kernel_cost("direct", 4096, 8, 8, torch.bfloat16) == 4096 * 16 * 2 * 200.0
    assert not prefer_ghost(16, 8, 8, kernel_dtype=torch.bfloat16)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown norm method 'fast'"):
        kernel_cost("fast", 4, 4, 4, torch.float32)
