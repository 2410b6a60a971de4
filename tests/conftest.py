"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# Torch's first calls can exceed hypothesis' default 200 ms deadline on a loaded 2-core machine;
# CI runs derandomized so a red build is reproducible.
settings.register_profile(
    "clerf", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "ci", parent=settings.get_profile("clerf"), derandomize=True, max_examples=50
)
settings.load_profile("ci" if os.environ.get("CI") else "clerf")

torch.set_num_threads(min(2, torch.get_num_threads()))
