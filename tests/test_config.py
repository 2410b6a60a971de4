"""The typed experiment schema: YAML loading, validation errors, dotted overrides, provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from clerf import CONVENTIONS_VERSION, __version__
from clerf.config import StreamConfig, load_config, provenance, save_resolved, to_dict
from clerf.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_and_file_and_overrides(tmp_path):
    p = _write(tmp_path, "name: demo\nseed: 3\ngenerator:\n  resolution: 32\n")
    cfg = load_config(p, ["generator.resolution=48", "seed=7"])
    assert cfg.name == "demo" and cfg.seed == 7 and cfg.generator.resolution == 48
    assert cfg.generator.name == "procedural"  # default kept
    # read-only: stages cannot mutate the resolved config
    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 1


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "generator:\n  resolutoin: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert str(p) in str(err.value) and "generator.resolutoin" in str(err.value)


def test_wrong_type_names_key_file_and_expected_type(tmp_path):
    p = _write(tmp_path, "generator:\n  resolution: big\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and "generator.resolution" in msg and "int" in msg.lower()


@pytest.mark.parametrize(
    "override, needle",
    [("generator.resolution=abc", "generator.resolution"), ("nokey=1", "nokey"),
     ("seed", "key=value")],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_config_file_is_an_error_naming_it(tmp_path, text, capsys):
    from clerf.cli import main

    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}: the config file is empty"):
        load_config(path)
    assert main(["generate", str(path), "--out", str(tmp_path / "t.h5"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is empty" in err and not (tmp_path / "t.h5").exists()


def test_resolved_config_round_trips_and_provenance(tmp_path):
    cfg = load_config(None, ["seed=11", "generator.params.symmetric=true"])
    out = save_resolved(cfg, tmp_path / "run")
    again = load_config(out)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    info = provenance(cfg, stage="test")
    assert info["clerf_version"] == __version__
    assert info["conventions_version"] == CONVENTIONS_VERSION
    assert info["seed"] == 11 and info["stage"] == "test"
    assert json.loads(info["config_json"])["seed"] == 11


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    load_config(path)


def test_base_files_are_merged_under_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nseed: 1\ngenerator:\n  resolution: 32\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.yaml"
    child.write_text("base: ../base.yaml\nname: child\n")
    cfg = load_config(child, ["seed=5"])
    assert (cfg.name, cfg.seed, cfg.generator.resolution) == ("child", 5, 32)
    (sub / "bad.yaml").write_text("base: ../nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(sub / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "typo.yaml").write_text("base: base.yaml\ngenerator:\n  resolutoin: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: key 'generator.resolutoin'"):
        load_config(tmp_path / "typo.yaml")


def test_empty_store_overrides_mean_none():
    cfg = load_config(None, ["pretrain.val_store=", "finetune.encoder="])
    assert cfg.pretrain.val_store is None and cfg.finetune.encoder is None


def test_first_difference_names_the_key_and_ignores_display_keys():
    from clerf.config import DISPLAY_KEYS, config_differences, first_difference

    a = {"x": {"lr": 1.0, "progress": True}, "seed": 0}
    assert first_difference(a, {"x": {"lr": 1.0, "progress": False}, "seed": 0},
                            DISPLAY_KEYS) is None
    assert config_differences(a, {"x": {"lr": 1.0, "progress": False}, "seed": 0}) == \
        [("x.progress", True, False)]  # only ignored when asked
    assert first_difference(a, {"x": {"lr": 2.0, "progress": True}, "seed": 0}, DISPLAY_KEYS) == \
        "x.lr: 1.0 then, 2.0 now"


@pytest.mark.parametrize("override, message", [
    ("finetune.train.lr=0", "finetune.train.lr: expected a positive number"),
    ("pretrain.train.schedule=step",
     r"key 'pretrain.train.schedule': Invalid value 'step', expected one of \['cosine'"),
    ("pretrain.augment.p_hflip=2", "pretrain.augment.p_hflip: expected a probability"),
    ("finetune.augment.padding=wrap",
     r"key 'finetune.augment.padding': Invalid value 'wrap', expected one of \['zeros'"),
    ("evaluate.protocols=[fly]",
     r"key 'evaluate.protocols\[0\]': Invalid value 'fly', expected one of \['standard'"),
    ("evaluate.model_batch=0", "evaluate.model_batch: expected an integer > 0"),
])  # fmt: skip
def test_every_section_is_checked_once_when_loaded_naming_its_path(override, message):
    from clerf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", [override])


def test_flags_are_thin_aliases_of_dotted_keys(tmp_path):
    from omegaconf import OmegaConf

    from clerf.commands.evaluate import split_overrides

    as_string = load_config(None, ["evaluate.batch_size=7",
                                   "evaluate.protocols=[standard,flipped]"])
    as_values = load_config(None, values={"evaluate.batch_size": 7,
                                          "evaluate.protocols": ["standard", "flipped"]})
    assert OmegaConf.to_container(as_string) == OmegaConf.to_container(as_values)
    # values are merged as values: a path may hold any character, '=' and ',' included
    odd = str(tmp_path / "a=b,c")
    assert load_config(None, values={"prepare.root": odd}).prepare.root == odd
    # flags are checked like the rest, naming the key
    from clerf.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluate.batch_size"):
        load_config(None, values={"evaluate.batch_size": 0})
    (tmp_path / "m=1").mkdir()  # an existing model folder is a model, whatever its name
    assert split_overrides(["runs/a", "evaluate.full_range_n=8", str(tmp_path / "m=1")]) == \
        (["runs/a", str(tmp_path / "m=1")], ["evaluate.full_range_n=8"])


@pytest.mark.parametrize("override, message", [
    ("head.type=cube", "head.type: expected one of binned"),
    ("head.bins.width=0", "head.bins: BinSpec needs width > 0"),
    ("head.loss=l1", r"key 'head.loss'.*the 'binned' head's keys: type, bins, alpha, decode"),
    ("head.decode=median", r"key 'head.decode': Invalid value 'median', expected one of"),
    ("finetune.out_of_range=ignore",
     r"key 'finetune.out_of_range': Invalid value 'ignore', expected one of \['drop'"),
    ("finetune.val_fraction=1.5", "finetune.val_fraction: expected a number in"),
    ("prepare.resize=squash",
     r"key 'prepare.resize': Invalid value 'squash', expected one of \['center'"),
    ("prepare.workers=-1", "prepare.workers: expected an integer >= 0"),
])  # fmt: skip
def test_head_finetune_and_prepare_sections_are_checked_when_loaded(override, message):
    from clerf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    if override == "head.loss=l1":  # the 6D head has a loss, and checks it
        with pytest.raises(ConfigError, match=r"key 'head.loss': Invalid value 'l1'"):
            load_config(None, ["head.type=rotation6d", override])


def test_sections_built_in_python_are_checked_by_their_own_dataclass(tmp_path):
    from clerf.config import AugmentConfig, EvaluateConfig, TrainConfig, section_config

    with pytest.raises(ConfigError, match=r"finetune.train.schedule: expected one of cosine, "
                                          r"linear, constant, got 'step'"):  # fmt: skip
        TrainConfig(schedule="step").validate("finetune.train")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"evaluate.protocols: expected one of standard.*'fly'"):
        EvaluateConfig(protocols=["standard", "fly"]).validate()  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"pretrain.augment.nonsense: unknown key"):
        section_config(AugmentConfig, {"nonsense": 1}, "pretrain.augment")
    aug = section_config(AugmentConfig, {"p_hflip": 1.0}, "augment")
    assert isinstance(aug, AugmentConfig) and aug.p_hflip == 1.0 and aug.padding == "zeros"
    # YAML reads a bare `no` as false: the mixed_precision accelerate spells `no` is meant
    cfg = load_config(_write(tmp_path, "finetune:\n  train:\n    mixed_precision: no\n"))
    assert cfg.finetune.train.mixed_precision == "no"
    from clerf.config import to_yaml

    assert "mixed_precision: 'no'" in to_yaml(cfg)  # saved quoted: reloads as the string


def test_to_dict_gives_the_same_plain_dict_from_every_form_of_a_section():
    plain = to_dict(StreamConfig())  # a config dataclass
    assert plain["epoch_size"] == StreamConfig().epoch_size
    # the same section as a DictConfig, with an interpolation resolved, and as a plain mapping
    cfg = OmegaConf.create({"s": plain, "n": 7, "t": {"epoch_size": "${n}"}})
    assert to_dict(cfg.s) == plain
    assert to_dict(cfg.t) == {"epoch_size": 7}
    assert to_dict(dict(plain)) == plain
    assert to_dict(None) == {} and to_dict(OmegaConf.create({})) == {}
