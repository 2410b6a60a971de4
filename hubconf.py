"""torch.hub entry points of clerf.

    import torch
    enc = torch.hub.load("path/to/clerf", "encoder", source="local", pretrained="runs/pre")
    enc = torch.hub.load("path/to/clerf", "encoder", source="local", arch="resnet50")  # random

``pretrained`` is a directory written by ``Encoder.save_pretrained`` or a ``clerf pretrain``
output directory; it is loaded strictly (a mismatch is an error listing the keys).
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
