"""The one device resolver."""

from __future__ import annotations

import pytest
import torch

from clerf.devices import resolve_device
from clerf.errors import ConfigError


def test_auto_is_this_process_cuda_device_when_available_else_cpu(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto") == torch.device("cuda", 0)
    # under a launcher every rank gets its own GPU, never GPU 0 for all
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("LOCAL_RANK", "5")  # more processes than GPUs: shared round-robin
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_bad_device_names_where_it_came_from():
    with pytest.raises(ConfigError, match=r"--device: 'gpu0' is not a device"):
        resolve_device("gpu0", "--device")


def test_main_process_is_known_from_the_launcher_environment(monkeypatch):
    from clerf.devices import is_main_process, local_rank

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert is_main_process() and local_rank() == 0
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # first process of the second machine
    assert not is_main_process() and local_rank() == 0


def test_gan_rng_forks_only_the_render_device(monkeypatch):
    from generators.gan import _forked_devices

    assert _forked_devices("cpu") == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert _forked_devices("cuda:3") == [3]
