"""torch.hub entry points of clerf.

    import torch
    enc = torch.hub.load("path/to/clerf", "encoder", source="local", pretrained="runs/pre")
    enc = torch.hub.load("path/to/clerf", "encoder", source="local", arch="resnet50")  # random
    model = torch.hub.load("path/to/clerf", "head_pose_model", source="local",
                           pretrained="runs/quickstart/finetune")
    pred = model.predict(crops)  # .rotations (B, 3, 3), .euler (degrees)

``pretrained`` is a directory written by ``save_pretrained`` or a ``clerf pretrain`` (encoder)
or ``clerf finetune`` (head pose model) output directory; it is loaded strictly (a mismatch is
an error listing the keys).
"""

dependencies = ["torch", "torchvision", "safetensors"]


def encoder(pretrained: str | None = None, **spec):
    """The clerf pose encoder: a pretrained one (strict load) or a fresh one from ``spec``.

    Args:
        pretrained: path of a saved encoder (or a pretrain output directory); None = new.
        **spec: for a new encoder: ``arch``, ``embedding_dim``, ``projection_hidden``,
            ``input_size``, ``mean``, ``std``, and ``weights`` (a torchvision weight name).
    """
    from clerf.models.encoder import Encoder, EncoderSpec

    if pretrained is not None:
        if spec:
            raise ValueError(f"encoder: give pretrained= or a spec, not both ({sorted(spec)})")
        return Encoder.from_pretrained(pretrained)
    weights = spec.pop("weights", None)
    return Encoder(EncoderSpec(**spec), weights=weights)


def head_pose_model(pretrained: str, map_location: str = "cpu"):
    """A fine-tuned clerf head pose model (encoder + pose head), loaded strictly.

    Args:
        pretrained: a ``clerf finetune`` output directory or a directory written by
            ``HeadPoseModel.save_pretrained``. There is no random variant: an untrained pose
            model predicts nothing useful, so build one in code if that is what you want.
        map_location: the device its weights are loaded onto.
    """
    from clerf.models.pose_model import HeadPoseModel

    return HeadPoseModel.from_pretrained(pretrained, map_location=map_location)
