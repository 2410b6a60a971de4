"""Pose-conditioned face generators: the built-in procedural head, EG3D and PanoHead adapters."""

from generators.base import (
    PoseGenerator,
    Rendered,
    available_generators,
    build_generator,
    generator_class,
    identity_seed,
    register_generator,
)

__all__ = [
    "PoseGenerator",
    "Rendered",
    "available_generators",
    "build_generator",
    "generator_class",
    "identity_seed",
    "register_generator",
]
