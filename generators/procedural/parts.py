"""Parts, materials, palettes and sampling sizes of the procedural head (data only)."""

from __future__ import annotations

import torch

# --------------------------------------------------------------------------- parts and materials

#: Opaque parts, in rendering order (part id = index). ``_r`` is the side at head +x.
PARTS: tuple[str, ...] = (
    "skull", "face", "chin", "cheek_r", "cheek_l", "nose_bridge", "nose_tip", "eye_r", "eye_l",
    "brow_r", "brow_l", "lip_upper", "lip_lower", "ear_r", "ear_l", "neck", "torso",
    "glasses_bridge", "temple_r", "temple_l", "hair_cap", "hair_long", "beard", "bun",
)  # fmt: skip
PART = {name: i for i, name in enumerate(PARTS)}
#: parts whose front hit is kept only on one side of a plane in their local frame
CLIPPED = ("hair_cap", "hair_long", "beard")
CLIP_IDX = tuple(PART[n] for n in CLIPPED)
assert CLIP_IDX == tuple(range(CLIP_IDX[0], CLIP_IDX[0] + len(CLIP_IDX)))
#: transparent tinted lenses with an opaque rim, composited after the opaque parts
LENS_PARTS: tuple[str, ...] = ("lens_r", "lens_l")
LENS_ID_OFFSET = len(PARTS)  # part ids of lens rims in :class:`RenderMaps`

SKIN, EYE, HAIR, LIP, FRAME, CLOTH = range(6)
MATERIAL = torch.tensor(
    [SKIN, SKIN, SKIN, SKIN, SKIN, SKIN, SKIN, EYE, EYE, HAIR, HAIR, LIP, LIP, SKIN, SKIN, SKIN,
     CLOTH, FRAME, FRAME, FRAME, HAIR, HAIR, HAIR, HAIR]
)  # fmt: skip
# specular weight and Blinn-Phong exponent per material
SPECULAR = torch.tensor([0.06, 0.6, 0.05, 0.25, 0.5, 0.02])
SHININESS = torch.tensor([12.0, 60.0, 8.0, 30.0, 40.0, 4.0])

N_UNIFORM = 256  # uniforms drawn per identity (a prefix is used; the rest leaves room to grow)
NOISE_GRID = 8  # background noise grid is 3 x NOISE_GRID x NOISE_GRID
N_CLUTTER = 5

SKIN_RAMP = [(0.24, 0.14, 0.09), (0.45, 0.28, 0.18), (0.68, 0.47, 0.34), (0.86, 0.66, 0.54),
             (0.97, 0.82, 0.72)]  # fmt: skip
HAIR_COLOURS = [(0.05, 0.04, 0.04), (0.22, 0.13, 0.07), (0.45, 0.30, 0.16), (0.80, 0.66, 0.40),
                (0.55, 0.20, 0.08), (0.62, 0.62, 0.62), (0.92, 0.92, 0.90), (0.20, 0.25, 0.60)]
#: ``style="studio"``: another palette, lighting and background family (a second domain, e.g.
#: a stand-in for real photographs beside the default renders)
STUDIO_SKIN_RAMP = [(0.55, 0.40, 0.36), (0.72, 0.55, 0.50), (0.85, 0.70, 0.66),
                    (0.93, 0.82, 0.80)]  # fmt: skip
STUDIO_HAIR_COLOURS = [(0.10, 0.08, 0.07), (0.30, 0.22, 0.15), (0.55, 0.45, 0.32)]
STUDIO_BACKDROPS = [(0.20, 0.27, 0.38), (0.45, 0.50, 0.55), (0.62, 0.60, 0.56),
                    (0.12, 0.12, 0.14)]  # fmt: skip
STYLES = ("default", "studio")
IRIS_COLOURS = [(0.25, 0.14, 0.06), (0.10, 0.07, 0.05), (0.25, 0.42, 0.62), (0.30, 0.45, 0.25),
                (0.45, 0.47, 0.50)]  # fmt: skip

