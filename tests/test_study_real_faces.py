"""The real-faces study's chain at toy scale, through the CLI with the study's own configs.

Pointing'04 files in their exact format -> a label budget -> CLERF's real-anchor triplets
(anchor_repeats) -> contrastive pretraining on them -> fine-tune from that encoder -> evaluate.
Measures nothing: it checks that every command of docs/real_faces.md's (f) row runs end to end
and that what each step hands on is what the next one reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures_data import make_pointing04

from clerf.cli import main

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "real"
TINY = ["encoder.input_size=32", "encoder.embedding_dim=16", "encoder.projection_hidden=32",
        "head.hidden=16", "head.sphere_points=64"]


def _ok(argv: list[str], capsys) -> str:
    code = main(argv)
    cap = capsys.readouterr()
    assert code == 0, cap.err
    return cap.out


@pytest.mark.slow
def test_real_anchor_chain_of_the_study(tmp_path, capsys):
    root = tmp_path / "Prima"
    make_pointing04(root, people=(1, 2, 11, 13),
                    poses=((0, 0), (60, 90), (-90, 0), (15, -45), (-30, 30), (0, -90)))
    train, val = tmp_path / "train.h5", tmp_path / "val.h5"
    _ok(["prepare", "pointing04", str(root), "--out", str(train), "--split", "train",
         "--resolution", "32", "prepare.subsets=[train]", "prepare.max_images=8",
         "--no-progress"], capsys)
    _ok(["prepare", "pointing04", str(root), "--out", str(val), "--resolution", "32",
         "prepare.subsets=[val]", "--no-progress"], capsys)
    with h5py.File(train) as f:
        assert len(f["images"]) == 8 and sorted(set(f["identities"][:])) == [1, 2]
        assert int(f.attrs["budget_max_images"]) == 8

    ra = tmp_path / "ra.h5"
    out = _ok(["real-anchor", str(train), "--out", str(ra), "--config",
               str(CFG / "f_real_anchor.yaml"), "triplets.anchor_repeats=3",
               "store.chunk_images=8", "--no-progress"], capsys)
    assert "wrote 24 real-anchor triplets" in out
    with h5py.File(ra) as f:
        table = f["triplets"][:]
    np.testing.assert_array_equal(table[:, 0], np.tile(np.arange(8), 3))

    pre = tmp_path / "pretrain"
    _ok(["pretrain", str(CFG / "f_real_anchor.yaml"), "--out", str(pre),
         f"pretrain.train_store={ra}", f"pretrain.val_store={val}", "pretrain.val_size=8",
         "pretrain.train.max_steps=2", "pretrain.train.batch_size=4",
         "pretrain.train.progress=false", "pretrain.train.checkpoint_every=0", *TINY], capsys)
    assert (pre / "summary.json").exists()

    ft = tmp_path / "finetune"
    _ok(["finetune", str(CFG / "f_real_anchor.yaml"), "--out", str(ft),
         f"finetune.encoder={pre}", f"finetune.train_store={train}",
         f"finetune.val_store={val}", "finetune.train.max_steps=2",
         "finetune.train.batch_size=4", "finetune.train.progress=false",
         "finetune.train.checkpoint_every=0", *TINY[3:]], capsys)
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["images_seen"] == 8
    assert "val/geodesic_deg" in summary["evaluation"]  # the validation people, at the end
    from omegaconf import OmegaConf

    used = OmegaConf.load(ft / "config.yaml")  # the resolved config of the run
    assert Path(used.finetune.encoder) == pre and used.head.type == "sphere"

    ev = tmp_path / "eval"
    _ok(["evaluate", str(ft / "model"), "--data", str(val), "--protocol",
         "standard,rotated,flipped", "--out", str(ev), "--no-figures"], capsys)
    rep = json.loads((ev / "report.json").read_text())
    std = rep["models"][0]["results"]["standard"]["pooled"]
    assert std["n"] == 6 and 0.0 <= std["geodesic"]["mean"] <= 180.0


def test_why_f_plan_changes_one_thing_per_experiment(tmp_path):
    """studies/real_anchor_why.py --dry-run: every experiment pretrains from the 100-label
    real anchors with its one change, is probed on the validation people (across people and
    against the rendered gallery, features and embedding), fine-tuned like (f)/100 and
    evaluated on AFLW2000; nothing runs."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(REPO / "studies" / "real_anchor_why.py"),
                        "--dry-run", "--out", str(tmp_path / "real")],
                       capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert p.returncode == 0, p.stderr
    cmds = [x[2:] for x in p.stdout.splitlines() if x.startswith("+ ")]
    assert cmds[0].startswith("clerf real-anchor") and "p04_val_64.h5" in cmds[0]
    assert sum("--gallery" in c and "--embedding" in c for c in cmds) == 7  # random + 6
    pre = [c for c in cmds if c.startswith("clerf pretrain")]
    assert len(pre) == 5  # base reuses the study's f_n100
    assert any("pretrain.train.max_steps=1200" in c for c in pre)
    assert any("pretrain.loss.gamma=256.0" in c for c in pre)
    assert any("pretrain.loss.batch_pairs=false" in c for c in pre)
    studio = [c for c in cmds if c.startswith("clerf real-anchor") and "style=studio" in c]
    assert len(studio) == 1 and "p04_train_n100_64.h5" in studio[0]
    fts = [c for c in cmds if c.startswith("clerf finetune")]
    assert len(fts) == 6 and all("p04_train_n100_64.h5" in c and "seed=0" in c for c in fts)
    assert all("--protocol standard" in c for c in cmds if c.startswith("clerf evaluate"))


def test_a_kept_probe_table_is_not_replaced_by_fewer_encoders(tmp_path, capsys):
    """A fresh machine with no pretrained encoders (e.g. --variants a,b,e) keeps the probe table
    of a run that had them; a table of fewer encoders than now available is measured again."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("real_study", REPO / "studies" / "real_study.py")
    rs = importlib.util.module_from_spec(spec)
    sys.modules["real_study"] = rs  # its dataclasses look their module up
    spec.loader.exec_module(rs)
    results = tmp_path / "results"
    (results / "probes").mkdir(parents=True)
    for data, flags in rs.PROBE_DATA.items():
        header = " ".join(["random:resnet18@64", "runs/real/pretrain/c", *flags])
        (results / "probes" / f"{data}.txt").write_text(f"# {header}\n| kept |\n")
    ctx = rs.Ctx(tmp_path / "out", tmp_path / "stores", "clerf", True, False, results)
    rs.probe(ctx)
    assert "clerf probe" not in capsys.readouterr().out
    for data in rs.PROBE_DATA:
        assert (results / "probes" / f"{data}.txt").read_text().endswith("| kept |\n")
    (results / "probes" / "aflw2000.txt").write_text("# other-encoder\n| kept |\n")
    rs.probe(ctx)
    assert capsys.readouterr().out.count("clerf probe") == 1


def test_lowres_figure_reads_a_lowres_report(tmp_path):
    """studies/lowres_figure.py: factors in order, the comparable Euler MAE and the missed share
    per view, and a PNG written."""
    import importlib.util
    import subprocess
    import sys

    views = {f"down{f}": {"euler_comparable": {"mean": 7.0 + f}, **(
        {"missed": {"share": 0.01 * f}} if f > 1 else {})} for f in (6, 1, 2)}
    params = {f"down{f}": {"factor": f} for f in (6, 1, 2)}
    rep = {"models": [{"name": "m", "results": {"lowres": {"views": views,
                                                           "view_params": params}}}]}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(rep))
    spec = importlib.util.spec_from_file_location("lowres_figure",
                                                  REPO / "studies" / "lowres_figure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.series(rep) == [("m", [1, 2, 6], [8.0, 9.0, 13.0], [0.0, 0.02, 0.06])]
    out = tmp_path / "fig.png"
    p = subprocess.run([sys.executable, str(REPO / "studies" / "lowres_figure.py"), str(path),
                        "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
