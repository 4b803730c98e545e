"""maskmix platform layer: config, artifact contracts, storage, tracking, cluster, CLI."""

__version__ = "0.1.0"
