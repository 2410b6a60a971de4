"""Representation probes (``clerf.evaluation.probe``): kNN pose retrieval and a linear probe."""

from __future__ import annotations

import pytest
import torch

from clerf.evaluation.probe import (
    gallery_probe,
    knn_pose_error,
    linear_probe_error,
    probe_features,
)
from clerf.geometry import geodesic_distance, random_rotation


def _R(n: int, seed: int = 0) -> torch.Tensor:
    return random_rotation(n, torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_features_that_are_the_rotation_probe_perfectly_and_noise_probes_at_chance():
    R = _R(400)
    g = torch.Generator().manual_seed(1)
    good = torch.cat([R.reshape(400, 9), 0.01 * torch.randn(400, 16, generator=g)], 1)
    noise = torch.randn(400, 25, generator=g)
    assert linear_probe_error(good, R) < 1.0
    assert 110.0 < linear_probe_error(noise, R) < 140.0  # chance: 126.5
    assert knn_pose_error(good, R, 1) < knn_pose_error(noise, R, 1) - 60.0


def test_knn_matches_a_brute_force_loop():
    R = _R(30, 2)
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(3))
    z = torch.nn.functional.normalize(f.double(), dim=-1)
    errs = []
    for i in range(30):
        sims = [(float(z[i] @ z[j]), j) for j in range(30) if j != i]
        j = max(sims)[1]
        errs.append(float(geodesic_distance(R[j], R[i])))
    assert knn_pose_error(f, R, 1) == pytest.approx(sum(errs) / 30, abs=1e-9)


def test_probe_does_not_depend_on_feature_scale_and_reports_all_figures():
    R = _R(64, 4)
    extra = torch.randn(64, 3, generator=torch.Generator().manual_seed(5))
    f = torch.cat([R.reshape(64, 9), extra], 1)
    a, b = probe_features(f, R), probe_features(f * 1000.0, R)
    assert set(a) == {"knn1_deg", "knn5_deg", "linear_probe_deg"}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-6)


def test_bad_sizes_are_errors():
    R = _R(3)
    with pytest.raises(ValueError, match="k"):
        knn_pose_error(torch.randn(3, 4), R, 3)
    with pytest.raises(ValueError, match="at least 4"):
        linear_probe_error(torch.randn(3, 4), R)


def test_cli_probes_encoders_on_a_store(tmp_path, capsys):
    from clerf.cli import main
    from clerf.config import load_config
    from triplets.generate import run_generate

    cfg = load_config(None, ["generator.resolution=32", "triplets.count=8",
                             "store.chunk_images=12", "triplets.poses=uniform"])  # fmt: skip
    store = run_generate(cfg, tmp_path / "s.h5", progress=False)
    assert main(["probe", "random:resnet18@32", "--data", str(store)]) == 0
    out = capsys.readouterr().out
    assert "24 images of" in out and "| random:resnet18@32 |" in out
    row = next(x for x in out.splitlines() if x.startswith("| random:"))
    values = [float(v) for v in row.strip("|").split("|")[1:]]
    assert len(values) == 3 and all(0.0 <= v <= 180.0 for v in values)
    assert main(["probe", "random:nonet@32", "--data", str(store)]) == 2
    err = capsys.readouterr().err
    assert "random:ARCH@SIZE" in err and len(err.strip().splitlines()) == 1


def test_across_groups_ignores_near_duplicates_of_one_person():
    """Pointing'04-like: each person has two near-identical images per pose (two series).
    Within persons kNN finds the twin (error ~0) whatever the features say about pose; across
    persons only pose-bearing features help."""
    g = torch.Generator().manual_seed(0)
    poses = random_rotation(20, g)
    persons = 3
    R = poses.repeat(persons * 2, 1, 1)  # person-major, two series each
    groups = torch.arange(persons).repeat_interleave(40)
    # features: a per-(person, pose) code (identity-and-pose noise), no pose structure
    code = torch.randn(persons, 20, 32, generator=g)
    feats = torch.cat([torch.cat([code[p], code[p]]) for p in range(persons)])
    feats = feats + 1e-3 * torch.randn(feats.shape, generator=g)
    assert knn_pose_error(feats, R, 1) < 1.0  # the twin of the other series
    assert knn_pose_error(feats, R, 1, groups) > 60.0  # across persons: nothing to find
    pose_feats = R.reshape(-1, 9) + 0.01 * torch.randn(R.shape[0], 9, generator=g)
    assert knn_pose_error(pose_feats, R, 1, groups) < 5.0
    assert linear_probe_error(pose_feats, R, groups=groups) < 5.0
    with pytest.raises(ValueError, match="at least 2 groups"):
        linear_probe_error(pose_feats, R, groups=torch.zeros(len(R), dtype=torch.long))


def test_gallery_probe_finds_the_pose_across_domains_and_only_there():
    """Queries and gallery at the same poses in two 'domains' (a per-domain offset added to
    features that carry the rotation): pose-bearing features retrieve the gallery's pose,
    features that carry only the domain do not. Oracle: the retrieved rotation is the query's
    own when the gallery holds it."""
    g = torch.Generator().manual_seed(1)
    R = random_rotation(60, g)
    photo = R.reshape(-1, 9) + 0.01 * torch.randn(60, 9, generator=g)
    render = R.reshape(-1, 9) + 0.01 * torch.randn(60, 9, generator=g)
    others = random_rotation(120, g)  # distractors at other poses
    gallery = torch.cat([render, others.reshape(-1, 9)])
    G_R = torch.cat([R, others])
    r = gallery_probe(photo, R, gallery, G_R)
    assert set(r) == {"knn1_deg", "knn5_deg", "linear_probe_deg"}
    assert r["knn1_deg"] < 2.0 and r["linear_probe_deg"] < 2.0
    noise = torch.randn(60, 9, generator=g)
    bad = gallery_probe(noise, R, torch.randn(180, 9, generator=g), G_R)
    assert bad["knn1_deg"] > 90.0 and bad["linear_probe_deg"] > 90.0  # chance: 126.5
    with pytest.raises(ValueError, match="at least 6"):
        gallery_probe(photo, R, gallery[:5], G_R[:5])
    with pytest.raises(ValueError, match=r"\(N, F\) and \(M, F\)"):
        gallery_probe(photo, R, gallery[:, :4], G_R)


def test_cli_probes_against_a_gallery_store_and_the_embedding(tmp_path, capsys):
    from clerf.cli import main
    from clerf.config import load_config
    from triplets.generate import run_generate

    def store(name: str, seed: int):
        cfg = load_config(None, ["generator.resolution=32", "triplets.count=4", f"seed={seed}",
                                 "store.chunk_images=12", "triplets.poses=uniform"])
        return run_generate(cfg, tmp_path / name, progress=False)

    q, gal = store("q.h5", 0), store("g.h5", 1)
    assert main(["probe", "random:resnet18@32", "--data", str(q), "--gallery", str(gal),
                 "--embedding"]) == 0
    out = capsys.readouterr().out
    assert "12 images of" in out and "against 12 gallery images" in out and "(embedding)" in out
    row = next(x for x in out.splitlines() if x.startswith("| random:"))
    assert all(0.0 <= float(v) <= 180.0 for v in row.strip("|").split("|")[1:])
    assert main(["probe", "random:resnet18@32", "--data", str(q), "--gallery", str(gal),
                 "--across-identities"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["probe", "random:resnet18@32", "--data", str(q), "--gallery",
                 str(tmp_path / "missing.h5")]) != 0
    assert "missing.h5" in capsys.readouterr().err
