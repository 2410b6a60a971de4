"""``clerf pipeline``: the stages chained in one directory, skipping what is complete."""

from __future__ import annotations

import pytest

from clerf.cli import main
from clerf.config import load_config
from clerf.pipeline import run_pipeline, stage_configs

# A seconds-scale pipeline: 32 px images, a handful of steps per stage.
TINY = [
    "generator.resolution=32", "encoder.input_size=32", "triplets.count=12",
    "pipeline.test_count=6", "pipeline.val_count=4", "store.chunk_images=18",
    "pretrain.val_size=12", "pretrain.train.batch_size=6", "pretrain.train.epochs=1",
    "finetune.train.batch_size=12", "finetune.train.epochs=1",
    "evaluate.protocols=[standard,rotated,full_range]", "evaluate.rotated_angles=[90]",
    "evaluate.full_range_n=8", "evaluate.model_batch=8", "evaluate.figures=false",
]


#: the classic pipeline: both training stages read the generated training store
STORES = ["pipeline.stages=[generate,pretrain,finetune,evaluate]", "finetune.stream.enabled=false"]
#: the quickstart as shipped streams its fine-tune data; tiny epochs
STREAM = ["finetune.stream.epoch_size=24", "pretrain.stream.epoch_size=12",
          "pretrain.stream.poses=uniform"]  # fmt: skip


def _cfg(*extra: str):
    return load_config("configs/quickstart.yaml", [*TINY, *STORES, *extra])


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path):
    out = tmp_path / "run"
    logs: list[str] = []
    result = run_pipeline(_cfg(), out, progress=False, log=logs.append)
    for path in ("config.yaml", "data/train.h5", "data/val.h5", "data/test.h5", "pretrain/encoder",
                 "pretrain/summary.json", "finetune/model", "finetune/config.yaml",
                 "evaluate/report.json", "evaluate/report.md", "results.md", "timings.json"):
        assert (out / path).exists(), path
    report = result["report"]
    assert [m["name"] for m in report["models"]] == ["quickstart"]
    assert set(report["models"][0]["results"]) == {"standard", "rotated", "full_range"}
    # the held-out store is another seed: the evaluation never sees training identities
    assert report["data"]["path"].endswith("test.h5")
    table = (out / "results.md").read_text()
    assert "| quickstart | standard | 18 |" in table and "full_range" in table
    # the fine-tune stage started from the pretrained encoder
    ft_cfg = (out / "finetune" / "config.yaml").read_text()
    assert str(out / "pretrain") in ft_cfg

    logs.clear()
    run_pipeline(_cfg(), out, progress=False, log=logs.append)
    skipped = [line for line in logs if "skipped" in line]
    assert len(skipped) == 6, logs  # three stores, pretrain, finetune, evaluate

    # a changed fine-tune setting: generate and pretrain are still valid, finetune is not
    with pytest.raises(Exception, match=r"finetune was made from another config \(finetune"):
        run_pipeline(_cfg("finetune.train.lr=0.123"), out, progress=False, log=logs.append)
    # a changed generator invalidates the stores, with the key named
    with pytest.raises(Exception, match=r"generated from another config \(.*resolution"):
        run_pipeline(_cfg("generator.resolution=40"), out, progress=False, log=logs.append)


@pytest.mark.slow
def test_streaming_pipeline_writes_only_the_held_out_store(tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/quickstart.yaml", [
        *TINY, *STREAM, "pipeline.stages=[generate,pretrain,finetune,evaluate]",
        "pretrain.stream.enabled=true"])  # fmt: skip
    logs: list[str] = []
    result = run_pipeline(cfg, out, progress=False, log=logs.append)
    assert not (out / "data" / "train.h5").exists()  # every training stage streams
    assert not (out / "data" / "val.h5").exists()  # and renders its own held-out images
    assert (out / "data" / "test.h5").exists()
    import json

    for stage, n in (("pretrain", 12 // 6 * 6 * 3), ("finetune", 24)):
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["images_seen"] == n, (stage, summary["images_seen"])
    meta = json.loads((out / "finetune" / "model" / "config.json").read_text())
    assert meta["training"]["train_data"]["source"] == "stream"
    assert set(result["report"]["models"][0]["results"]) == {"standard", "rotated", "full_range"}
    # a changed stream setting invalidates the stage that streams, with the key named
    with pytest.raises(Exception, match=r"finetune was made from another config \(finetune"):
        changed = load_config("configs/quickstart.yaml", [
            *TINY, *STREAM, "pipeline.stages=[generate,pretrain,finetune,evaluate]",
            "pretrain.stream.enabled=true", "finetune.stream.poses=euler_box"])  # fmt: skip
        run_pipeline(changed, out, progress=False, log=logs.append)


def test_stage_configs_connect_the_paths(tmp_path):
    sc = stage_configs(_cfg(), tmp_path)
    assert sc["pretrain"].pretrain.train_store == str(tmp_path / "data" / "train.h5")
    # training stages validate on their own store, never on the test set the figures come from
    val = str(tmp_path / "data" / "val.h5")
    assert sc["finetune"].finetune.val_store == val and sc["pretrain"].pretrain.val_store == val
    seeds = {sc[k].seed for k in ("generate_train", "generate_val", "generate_test")}
    assert seeds == {0, 2000, 1000} and sc["generate_val"].triplets.count == 4
    streamed = stage_configs(_cfg("finetune.stream.enabled=true"), tmp_path)
    assert streamed["finetune"].finetune.val_store == ""  # renders stream.val_size images
    with pytest.raises(Exception, match="pipeline.val_seed_offset"):
        stage_configs(_cfg("pipeline.val_seed_offset=1000"), tmp_path)
    assert sc["finetune"].finetune.encoder == str(tmp_path / "pretrain")
    assert sc["generate_test"].seed == 1000 and sc["generate_test"].triplets.count == 6
    no_pre = stage_configs(_cfg("pipeline.stages=[generate,finetune,evaluate]"), tmp_path)
    assert no_pre["finetune"].finetune.encoder is None  # a fresh encoder
    shared = stage_configs(_cfg(f"pipeline.data_dir={tmp_path / 'shared'}"), tmp_path)
    assert shared["train_store"] == tmp_path / "shared" / "train.h5"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["pipeline", "configs/quickstart.yaml", "--out", str(tmp_path / "o"),
                 "pipeline.stages=[generate,fly]"]) == 2
    err = capsys.readouterr().err
    assert "key 'pipeline.stages[1]': Invalid value 'fly', expected one of ['generate'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    assert main(["pipeline", "configs/quickstart.yaml", "--out", str(tmp_path / "file")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["pipeline", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_evaluate_without_a_model_is_a_clear_error(tmp_path, capsys):
    code = main(["pipeline", "configs/quickstart.yaml", "--out", str(tmp_path / "o"),
                 "pipeline.stages=[evaluate]", *TINY])
    assert code == 1
    assert "no model at" in capsys.readouterr().err


def test_only_the_main_process_writes_the_pipeline_files(tmp_path, monkeypatch):
    """Under several processes every rank runs the (distributed) stages; config.yaml,
    results.md and timings.json come from the main process alone."""
    cfg = _cfg("pipeline.stages=[generate]")
    monkeypatch.setenv("RANK", "1")
    logs: list[str] = []
    out = tmp_path / "run"
    # the stage itself is stubbed: only the pipeline's own files and messages are checked
    monkeypatch.setattr("triplets.generate.run_generate", lambda *a, **k: None)
    run_pipeline(cfg, out, progress=False, log=logs.append)
    assert not (out / "config.yaml").exists() and not (out / "timings.json").exists()
    assert logs == []
    monkeypatch.setenv("RANK", "0")
    run_pipeline(cfg, out, progress=False, log=logs.append)
    assert (out / "config.yaml").exists() and (out / "timings.json").exists() and logs
