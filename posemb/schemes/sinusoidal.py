"""Fixed sinusoidal absolute encoding added to the input (Vaswani et al. 2017, §3.5)."""
from __future__ import annotations

from torch import Tensor

from posemb._validation import check_even, check_float, check_tensor, check_width
from posemb.functional.sinusoidal import sinusoidal_table
from posemb.registry import register
from posemb.schemes.base import PositionalScheme
from posemb.schemes.rope import _shared_rows


@register("sinusoidal")
class Sinusoidal(PositionalScheme):
    """``x_i + scale * PE(i)`` with ``PE(pos, 2i) = sin(pos / base^(2i/d))``, ``PE(pos, 2i+1) = cos(...)``.

    No parameters and no maximum length: any position works.

    The table's entries have magnitude ~1 while token embeddings are initialised small (std 0.02
    here, as in GPT-2). Vaswani et al. multiply the token embeddings by sqrt(d_model) (§3.4) so
    that position does not drown the token; posemb keeps the token embedding untouched and scales
    the table by ``1/sqrt(dim)`` instead, the same ratio. (Measured in the study: with the bare
    table, the model learned worse than with no position at all.)

    Args:
        dim: model width (even).
        base: wavelength base (10000 in the paper).
        scale: multiplier of the table; ``None`` means ``1/sqrt(dim)``; ``1.0`` gives the bare table.
    """

    site = "input"
    family = "absolute"

    def __init__(self, dim: int, base: float = 10000.0, scale: float | None = None) -> None:
        super().__init__()
        self.dim = check_even("dim", check_width("dim", dim))
        self.base = check_float("base", base, minimum=1.0, strict_minimum=True)
        self.scale = dim ** -0.5 if scale is None else check_float("scale", scale, minimum=0.0, strict_minimum=True)

    def embed_input(self, x: Tensor, positions: Tensor) -> Tensor:
        check_tensor("positions", positions, ndim=2, integer=True)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        # Expanded rows (the model's default positions): one row of the table, broadcast over the batch.
        return x + self.scale * sinusoidal_table(_shared_rows(positions), self.dim, self.base, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scale={self.scale:.4g}"
