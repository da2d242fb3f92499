"""Fixed sinusoidal absolute encoding added to the input (Vaswani et al. 2017, §3.5)."""
from __future__ import annotations

from torch import Tensor

from posemb._validation import check_even, check_float, check_tensor
from posemb.functional.sinusoidal import sinusoidal_table
from posemb.registry import register
from posemb.schemes.base import PositionalScheme


@register("sinusoidal")
class Sinusoidal(PositionalScheme):
    """``x_i + PE(i)`` with ``PE(pos, 2i) = sin(pos / base^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``.

    No parameters and no maximum length: any position works.

    Args:
        dim: model width (even).
        base: wavelength base (10000 in the paper).
    """

    site = "input"
    family = "absolute"

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = check_even("dim", dim)
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)

    def embed_input(self, x: Tensor, positions: Tensor) -> Tensor:
        check_tensor("positions", positions, ndim=2, integer=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        return x + sinusoidal_table(positions, self.dim, self.base, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
