"""Subspace math on bare tensors: weight deltas, spectra, bases, projections, overlaps, energy (no Lightning)."""

from safeproj.core.basis import Basis, BasisEntry, Factor, build_basis
from safeproj.core.deltas import (
    DEFAULT_INCLUDE,
    CheckpointDelta,
    DeltaSource,
    LoraDelta,
    RunDelta,
    TensorDelta,
    delta_from_spec,
    select_names,
)
from safeproj.core.energy import SubspaceGrid, Variant, energy_retained, pool
from safeproj.core.overlap import aggregate, mso, mso_table, mso_tables, principal_angles, random_baseline
from safeproj.core.projector import energy_share, project, project_left, project_right, random_share
from safeproj.core.spectra import SpectrumCache
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
    "RunDelta",
    "SpectrumCache",
    "SubspaceGrid",
    "TensorDelta",
    "Variant",
    "aggregate",
    "build_basis",
    "delta_from_spec",
    "energy_retained",
    "energy_share",
    "energy_spectrum",
    "k_for_energy",
    "k_for_frac",
    "mso",
    "mso_table",
    "mso_tables",
    "orthogonal_complement",
    "pool",
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
