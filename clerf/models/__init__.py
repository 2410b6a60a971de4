"""Models: the pose encoder (backbone + projection), pose heads, ``HeadPoseModel``, save/load.

Submodules are imported on use (``from clerf.models.encoder import Encoder``) so that importing
this package does not pull in torchvision.
"""
