"""How tests compare floats, and the statistics behind learning-test bars.

Two model instances with bit-identical weights may still differ in the last bits of their outputs: memory layout
and the machine's kernels (AVX2 vs AVX-512, oneDNN paths) change the order of floating-point sums. Outputs of two
instances are compared with a tolerance; bitwise equality is kept for tokens and for one instance run twice.
"""

from __future__ import annotations

import math

import torch

# fp32 outputs of two instances of the same weights (issue 11: 5e-6 seen on an AMD EPYC, AVX-512).
ACROSS_INSTANCES_ATOL = 1e-5
ACROSS_INSTANCES_RTOL = 1e-5


def assert_close_across_instances(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 outputs of two model instances agree within 1e-5 (absolute) + 1e-5 (relative)."""
    torch.testing.assert_close(actual, expected, atol=ACROSS_INSTANCES_ATOL, rtol=ACROSS_INSTANCES_RTOL)


def combined_standard_error(p1: float, n1: int, p2: float, n2: int) -> float:
    """Standard error of ``p1 - p2`` for two independent proportions measured on ``n1`` and ``n2`` questions."""
    return math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
