"""Versions written into every artefact: a leaf module (imports nothing from clerf).

``__version__`` is clerf's release; ``CONVENTIONS_VERSION`` is the version of
``docs/conventions.md`` that this code implements.
"""

__version__ = "0.1.0"

#: Version of ``docs/conventions.md`` that this code implements; written into every artefact.
CONVENTIONS_VERSION = "1"
