"""spp-curate: build, curate and publish semantic positive pair datasets."""

__version__ = "0.1.0"
