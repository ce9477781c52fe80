"""spp-curate: build, curate and publish semantic positive pair datasets."""

__version__ = "0.1.0"

__all__ = ["load_pairs", "stream_pairs"]


def __getattr__(name: str):
    """``spp_curate.load_pairs`` and ``spp_curate.stream_pairs`` (imported on first use: ``datasets`` is heavy)."""
    if name in __all__:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'spp_curate' has no attribute {name!r}")
