"""How tests compare floats.

Two model instances with bit-identical weights may still differ in the last bits of their outputs: memory layout
and the machine's kernels (AVX2 vs AVX-512, oneDNN paths) change the order of floating-point sums. Outputs of two
instances are compared with a tolerance; bitwise equality is kept for tokens and for one instance run twice.
"""

from __future__ import annotations

import torch

# fp32 outputs of two instances of the same weights (issue 11: 5e-6 seen on an AMD EPYC, AVX-512).
ACROSS_INSTANCES_ATOL = 1e-5
ACROSS_INSTANCES_RTOL = 1e-5


def assert_close_across_instances(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 outputs of two model instances agree within 1e-5 (absolute) + 1e-5 (relative)."""
    torch.testing.assert_close(actual, expected, atol=ACROSS_INSTANCES_ATOL, rtol=ACROSS_INSTANCES_RTOL)
