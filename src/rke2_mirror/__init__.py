"""rke2-mirror: prepare offline registries for RKE2."""

__version__ = "0.1.0"
