"""The built-in, weight-free 3D head generator (registered as ``procedural``).

A head is a union of about two dozen ellipsoids (skull, face, chin, cheeks, nose, eyes, brows,
lips, ears, neck, shoulders, hair cap, long hair, bun, beard, glasses) rendered by **analytic
ray-quadric intersection** with a perspective camera, per-pixel depth selection, Lambert + ambient
+ Blinn-Phong shading with normals from the quadric gradient, and transparent tinted lenses.

Why this technique: for a pinhole camera the ray through pixel ``(u, v)`` has a direction linear in
``(u, v)``, so for each (image, ellipsoid) the discriminant of the ray-ellipsoid equation is a
quadratic polynomial in ``(u, v)`` and the linear coefficient is affine in ``(u, v)``. Those
coefficients are computed once per (image, primitive) in float64; per pixel and primitive only a
handful of separable float32 operations remain (about 10), which is 10-100x cheaper than sphere
tracing or Gaussian splatting on a CPU.

Geometry (``docs/conventions.md`` section 2): head coordinates are x = head right (image right on
a frontal face), y = up, z = nose. A head point ``p`` is at ``R.T @ p + c`` in camera coordinates
(x = image right, y = image up, z = toward the viewer), with ``c = (tx, ty, -d)``: the camera sits
at distance ``d`` on the camera direction ``R @ e_z``, looking at the head centre (shifted by the
optional translation ``tx, ty``). Pixel ``(row, col)`` of an ``H x W`` image has normalised
coordinates ``u = (col + 0.5) / W * 2 - 1`` (right) and ``v = (row + 0.5) / H * 2 - 1`` (down); its
ray direction is ``(u tan(fov/2), -v tan(fov/2), -1)``.

Identity ``i`` of a generator with seed ``s`` (face shape, colours, hair, accessories, lighting,
background, camera distance, field of view, translation, occluder) is drawn from a
``torch.Generator`` seeded by a fixed 64-bit integer hash of ``(s, i)``, so it depends on nothing
else; rendering is a pure function of (seed, identity, rotation, resolution, parameters).

The package: :mod:`~generators.procedural.parts` (parts, materials, palettes),
:mod:`~generators.procedural.identity` (identity sampling -> scene parameters),
:mod:`~generators.procedural.quadrics` (the ray-quadric core),
:mod:`~generators.procedural.shading` (shading, lenses, background, occluders) and
:mod:`~generators.procedural.head` (:class:`ProceduralHead`, registered on import).
"""

from generators.procedural.head import ProceduralHead, RenderMaps
from generators.procedural.parts import LENS_ID_OFFSET, PARTS, STYLES

__all__ = ["ProceduralHead", "RenderMaps", "PARTS", "LENS_ID_OFFSET", "STYLES"]
