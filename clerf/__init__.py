"""clerf: a head pose estimation research toolkit.

Importing ``clerf`` stays light: it must not import torchvision models, accelerate or h5py.
``clerf.load_encoder`` is resolved lazily on first use.
"""

from clerf.versions import CONVENTIONS_VERSION, __version__

__all__ = ["__version__", "CONVENTIONS_VERSION", "load_encoder"]


def __getattr__(name: str):
    # Lazy: the encoder needs torchvision, which `import clerf` must not import.
    if name == "load_encoder":
        from clerf.models.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'clerf' has no attribute {name!r}")
