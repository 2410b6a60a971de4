"""Evaluation: protocols (standard, rotated, flipped, full range), metric aggregation, reports.

Submodules are imported lazily by their users: ``metrics`` needs only torch/numpy, ``report``
imports matplotlib inside the figure functions, ``evaluate`` imports accelerate inside the stage.
"""
