"""Subspace math on bare tensors: weight deltas, spectra, bases, projections, overlaps (torch only)."""

from safeproj.core.basis import Basis, BasisEntry, Factor, build_basis
from safeproj.core.deltas import (
    DEFAULT_INCLUDE,
    CheckpointDelta,
    DeltaSource,
    LoraDelta,
    TensorDelta,
    delta_from_spec,
    select_names,
)
from safeproj.core.overlap import mso, principal_angles, random_baseline
from safeproj.core.projector import energy_share, project, project_left, project_right, random_share
from safeproj.core.spectrum import (
    energy_spectrum,
    k_for_energy,
    k_for_frac,
    orthogonal_complement,
    select_vectors,
    side_spectrum,
)

__all__ = [
    "DEFAULT_INCLUDE",
    "Basis",
    "BasisEntry",
    "CheckpointDelta",
    "DeltaSource",
    "Factor",
    "LoraDelta",
    "TensorDelta",
    "build_basis",
    "delta_from_spec",
    "energy_share",
    "energy_spectrum",
    "k_for_energy",
    "k_for_frac",
    "mso",
    "orthogonal_complement",
    "principal_angles",
    "project",
    "project_left",
    "project_right",
    "random_baseline",
    "random_share",
    "select_names",
    "select_vectors",
    "side_spectrum",
]
