"""Bases and sides: how a gradient is projected into a low-rank space and back."""

from .bases import dct_matrix, derive_seed, random_orthonormal, rsvd_basis, svd_basis
from .projectors import PROJECTORS, Layout, Projector, get_projector
from .rotate import change_of_basis, rotate_first, rotate_second
from .sides import PROJ_TYPES, low_rank_shape, project_down, project_up, resolve_side

__all__ = [
    "PROJECTORS",
    "PROJ_TYPES",
    "Layout",
    "Projector",
    "change_of_basis",
    "dct_matrix",
    "derive_seed",
    "get_projector",
    "low_rank_shape",
    "project_down",
    "project_up",
    "random_orthonormal",
    "resolve_side",
    "rotate_first",
    "rotate_second",
    "rsvd_basis",
    "svd_basis",
]
