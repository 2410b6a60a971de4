"""clerf: a head pose estimation research toolkit.

Importing ``clerf`` stays light: it must not import torchvision models, accelerate or h5py.
"""

__version__ = "0.1.0"

#: Version of ``shared/CONVENTIONS.md`` that this code implements; written into every artefact.
CONVENTIONS_VERSION = "1"

__all__ = ["__version__", "CONVENTIONS_VERSION"]
