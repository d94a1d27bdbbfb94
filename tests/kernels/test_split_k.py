"""The split-K matmul against torch.nn.functional.linear."""

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import DEVICE, assert_close, dtypes

from martlet.kernels.split_k import SplitKConfig, split_k_linear


def random(shape, seed, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize(
    "m, n, k, config",
    [
        (40, 64, 128, SplitKConfig(32, 32, 32, split_k=2)),  # 4 tiles x 2 slices, K a multiple of the tile
        (33, 50, 100, SplitKConfig(32, 32, 32, split_k=2)),  # ragged M, N and K: masked edges
        (20, 30, 200, SplitKConfig(32, 32, 32, split_k=4)),  # one tile, four slices
        (17, 40, 70, SplitKConfig(32, 32, 32, split_k=3)),  # 3 K tiles in 3 slices
        (9, 40, 70, SplitKConfig(16, 32, 32, split_k=4)),  # 3 K tiles in 4 slices: the last one is empty
        (50, 70, 90, SplitKConfig(32, 32, 32, split_k=1)),  # no split: no wait, no workspace
        pytest.param(256, 4096, 4096, SplitKConfig(), marks=pytest.mark.gpu),  # o_proj at 256 tokens
        pytest.param(128, 4096, 11008, SplitKConfig(split_k=4), marks=pytest.mark.gpu),  # down_proj at 128
    ],
)
def test_split_k_linear(m, n, k, config, dtype):
    x = random((m, k), m + n, dtype)
    weight = random((n, k), k, dtype) / k**0.5
    for _ in range(2):  # the counters must be back at zero for the second launch
        out = split_k_linear(x, weight, config)
        assert out.shape == (m, n) and out.dtype == dtype
        assert_close(out, F.linear(x.float(), weight.float()), dtype)


def test_split_k_linear_refuses_what_it_cannot_do():
    weight = torch.zeros(64, 32, device=DEVICE)
    with pytest.raises(ValueError, match="does not fit"):
        split_k_linear(torch.zeros(2, 31, device=DEVICE), weight, SplitKConfig(32, 32, 32))
    with pytest.raises(ValueError, match="one dtype"):
        split_k_linear(torch.zeros(2, 32, device=DEVICE, dtype=torch.float16), weight, SplitKConfig(32, 32, 32))
    assert split_k_linear(torch.zeros(0, 32, device=DEVICE), weight, SplitKConfig(32, 32, 32)).shape == (0, 64)


@pytest.mark.gpu
def test_split_k_linear_refuses_more_programs_than_sms():
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    weight = torch.zeros(32 * sms, 64, device=DEVICE)
    with pytest.raises(ValueError, match="starve"):  # sms tiles x 2 slices
        split_k_linear(torch.zeros(32, 64, device=DEVICE), weight, SplitKConfig(32, 32, 32))
