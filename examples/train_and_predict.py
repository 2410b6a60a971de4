"""CLERF's whole method through the Python API, one stage per block.

Render anchor/positive/negative triplets with the procedural head, pretrain an encoder with
Circle Loss under pose-exact geometric augmentation, fine-tune a rotation head on it, evaluate
on held-out identities, then predict the pose of the face in a real photograph.

    python examples/train_and_predict.py --out runs/example          # a few minutes on 2 CPU cores
    python examples/train_and_predict.py --out /tmp/example --toy    # seconds (the tests' scale)

At this scale the model learns little: the point is the API, not the figure (see the README for
the recipes that learn). Each call resumes or refuses like its CLI twin (``clerf generate``,
``clerf pretrain``, ``clerf finetune``, ``clerf evaluate``, ``clerf predict``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clerf.config import EvaluateConfig, load_config
from clerf.evaluation.evaluate import run_evaluate
from clerf.finetune import run_finetune
from clerf.inference.detect import build_detector
from clerf.inference.model import load_pose_model
from clerf.inference.run import run_predict
from clerf.pretrain import run_pretrain
from triplets.generate import run_generate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: seconds-scale settings: 32 px images, a handful of steps
TOY = ["generator.resolution=32", "encoder.input_size=32", "pretrain.train.epochs=1",
       "pretrain.train.batch_size=6", "pretrain.val_size=12", "finetune.train.epochs=1",
       "finetune.train.batch_size=12", "finetune.probe_epochs=0"]  # fmt: skip


def photo(out: Path, path: str | None) -> Path:
    """The photograph to predict on: ``path``, or scikit-image's bundled astronaut portrait."""
    if path:
        return Path(path)
    try:
        from skimage import data
    except ImportError as exc:
        raise SystemExit("no photo: pass --photo PATH (or pip install scikit-image)") from exc
    from PIL import Image

    target = out / "astronaut.png"
    Image.fromarray(data.astronaut()).save(target)
    return target


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--toy", action="store_true", help="seconds-scale settings")
    ap.add_argument("--photo", help="an image with a face (default: scikit-image's astronaut)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = TOY if args.toy else []
    count = 24 if args.toy else 256

    # 1. Triplets: a training store and a held-out store rendered from another seed (other
    #    identities and poses). Each is a self-describing HDF5 file.
    gen = load_config(CONFIGS / "generate_small.yaml", [*small, f"triplets.count={count}"])
    run_generate(gen, out / "train.h5", progress=False)
    held = load_config(CONFIGS / "generate_small.yaml",
                       [*small, "seed=1", f"triplets.count={count // 4}"])  # fmt: skip
    run_generate(held, out / "val.h5", progress=False)

    # 2. Contrastive pretraining: Circle Loss on the triplets under in-plane rotations and flips
    #    whose labels are composed exactly; writes a loadable encoder.
    pre = load_config(CONFIGS / "pretrain_small.yaml", [
        *small, f"pretrain.train_store={out / 'train.h5'}", f"pretrain.val_store={out / 'val.h5'}",
        "pretrain.train.progress=false"])  # fmt: skip
    run_pretrain(pre, out / "pretrain")

    # 3. Fine-tuning: the 6D rotation head (and HopeNet's binned heads) on the pretrained encoder.
    fin = load_config(CONFIGS / "finetune_small.yaml", [
        *small, f"finetune.train_store={out / 'train.h5'}", f"finetune.val_store={out / 'val.h5'}",
        f"finetune.encoder={out / 'pretrain'}", "finetune.train.progress=false"])  # fmt: skip
    summary = run_finetune(fin, out / "finetune")

    # 4. Evaluation on the held-out identities: upright, rotated and flipped protocols.
    opts = EvaluateConfig(protocols=["standard", "rotated", "flipped"], figures=False)
    report = run_evaluate([str(out / "finetune")], out / "evaluate", data=str(out / "val.h5"),
                          opts=opts)  # fmt: skip
    for name, res in report["models"][0]["results"].items():
        print(f"{name}: mean geodesic error {res['pooled']['geodesic']['mean']:.1f} deg")

    # 5. A real photograph: detect the face, cut the model's crop, predict, draw the axes.
    model = load_pose_model(out / "finetune")
    record = run_predict(model, [photo(out, args.photo)], out / "predict",
                         detector=build_detector("haar"))  # fmt: skip
    for face in record["faces"]:
        print(f"{face['file']}: face {face['face']} turned {face['angle']:.0f} deg in the photo: "
              f"yaw {face['yaw']:.1f}, pitch {face['pitch']:.1f}, roll {face['roll']:.1f} deg")
    return {"finetune": summary, "evaluate": report, "predict": record}


if __name__ == "__main__":
    main()
