"""SiLU(gate) * up against martlet.layers.activation.silu_and_mul."""

import pytest
import torch
from kernel_helpers import DEVICE, assert_close, dtypes

from martlet.kernels.activation import silu_and_mul
from martlet.layers.activation import silu_and_mul as silu_and_mul_reference


@pytest.mark.parametrize("dtype", dtypes())
@pytest.mark.parametrize("shape", [(5, 160), (3, 3000), pytest.param((300, 2 * 14336), marks=pytest.mark.gpu)])
def test_silu_and_mul(shape, dtype):
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(dtype).to(DEVICE)
    out = torch.full((shape[0], shape[1] // 2), float("nan"), dtype=dtype, device=DEVICE)
    silu_and_mul(x, out=out)
    assert_close(out, silu_and_mul_reference(x.float()), dtype)
