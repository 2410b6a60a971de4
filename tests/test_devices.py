"""The one device resolver."""

from __future__ import annotations

import pytest
import torch

from clerf.devices import resolve_device
from clerf.errors import ConfigError


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_bad_device_names_where_it_came_from():
    with pytest.raises(ConfigError, match=r"--device: 'gpu0' is not a device"):
        resolve_device("gpu0", "--device")
