"""The one package.module:ClassName loader, as generators and detectors use it."""

from __future__ import annotations

import pytest

from clerf.errors import ConfigError
from clerf.inference.detect import FaceDetector, build_detector
from clerf.plugins import is_class_spec, load_class
from generators.base import PoseGenerator, generator_class
from generators.procedural import ProceduralHead


def test_load_class_returns_the_subclass_and_names_the_flag_on_errors():
    assert is_class_spec("a.b:C") and not is_class_spec("haar") and not is_class_spec(":C")
    assert load_class("generators.procedural:ProceduralHead", PoseGenerator, "x") is ProceduralHead
    with pytest.raises(ConfigError, match=r"--detector 'nope\.mod:X': cannot import module"):
        load_class("nope.mod:X", FaceDetector, "--detector")
    with pytest.raises(ConfigError, match=r"'Missing' is not a .*FaceDetector subclass"):
        load_class("generators.procedural:Missing", FaceDetector, "--detector")
    with pytest.raises(ConfigError, match="is not a .*PoseGenerator subclass"):
        load_class("clerf.errors:ConfigError", PoseGenerator, "generator")


def test_generators_and_detectors_go_through_it():
    assert generator_class("generators.procedural:ProceduralHead") is ProceduralHead
    with pytest.raises(ConfigError, match="generator 'clerf.errors:ConfigError'"):
        generator_class("clerf.errors:ConfigError")
    with pytest.raises(ConfigError, match="--detector 'clerf.errors:ConfigError'"):
        build_detector("clerf.errors:ConfigError")
