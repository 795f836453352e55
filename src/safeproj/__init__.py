"""safeproj: weight-space safety subspaces inside ordinary Lightning training."""

__version__ = "0.1.0"
