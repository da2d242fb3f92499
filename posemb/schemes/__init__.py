"""Positional schemes, one file each; every module here is imported by the registry on first use."""
from posemb.schemes.base import FAMILIES, SITES, PositionalScheme

__all__ = ["PositionalScheme", "SITES", "FAMILIES"]
