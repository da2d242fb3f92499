"""Positional schemes, one file each; every module here is imported by the registry on first use."""
from posemb.schemes.base import FAMILIES, SITES, PositionalScheme, relative_distance

__all__ = ["PositionalScheme", "relative_distance", "SITES", "FAMILIES"]
