"""Triplet rules: which identity and rotation the anchor, positive and negative get.

The rule (CLERF's generator triplet, the one only a 3D generator can give):

* **anchor**: rotation ``R_a`` from the pose sampler, identity ``i_a`` uniform in
  ``[0, num_identities)``;
* **positive**: the anchor's rotation ``R_a``, another identity ``i_p != i_a``: the pair differs in
  everything except pose;
* **negative**: a rotation ``R_n`` with ``geodesic_distance(R_a, R_n) >= delta`` degrees, and the
  anchor's identity (``hard_negatives=True``: pose is the only thing that separates the pair) or
  another identity ``i_n != i_a``.

Negative rotations come from

* ``negatives="poses"``: the anchor's pose sampler, redrawn until at least ``delta`` away
  (rejection; the negatives then follow the anchors' pose distribution); or
* ``negatives="uniform"``: the Haar measure restricted to ``{R : d(R_a, R) >= delta}``, sampled
  constructively as ``R_a @ U @ Rz(theta) @ U.T`` with ``U`` uniform and ``theta`` in
  ``[delta, 180]`` with the Haar angle density ``(1 - cos theta) / pi`` (exact, never rejects).

Determinism: triplets are sampled in blocks of ``block_size``; block ``b`` uses a generator seeded
by ``(seed, b)`` only, so triplet ``t`` depends only on ``(seed, t, block_size)`` and any range of
triplets can be regenerated alone (resume, shards).

Designed for the real-anchor mode (issue 5): :meth:`TripletRule.complete` takes given anchor
rotations (e.g. the labels of real photographs) and draws the rest; positives are then rendered at
the anchor's rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import torch
from torch import Tensor

from clerf.config import NegativeSampling
from clerf.geometry import geodesic_distance, random_rotation_at_least
from triplets.poses import PoseSampler, seeded_generator

__all__ = [
    "TripletPlan",
    "TripletRule",
    "TripletSampler",
]

#: stream id mixed into the block seeds (other streams may be added without changing this one)
_STREAM_TRIPLETS = 1
#: rejection rounds before giving up with a clear error
_MAX_ROUNDS = 200

Accept = Callable[[Tensor], Tensor]


@dataclass
class TripletPlan:
    """What to render for triplets ``[start, start + T)``.

    Attributes:
        start: index of the first triplet.
        anchor_rotations, negative_rotations: ``(T, 3, 3)`` float64 (the positive uses the
            anchor's rotation).
        anchor_ids, positive_ids, negative_ids: ``(T,)`` int64.
    """

    start: int
    anchor_rotations: Tensor
    negative_rotations: Tensor
    anchor_ids: Tensor
    positive_ids: Tensor
    negative_ids: Tensor

    def __len__(self) -> int:
        return len(self.anchor_ids)

    def interleaved(self) -> tuple[Tensor, Tensor]:
        """``(identities (3T,), rotations (3T, 3, 3))`` in store order a0, p0, n0, a1, ..."""
        ids = torch.stack([self.anchor_ids, self.positive_ids, self.negative_ids], 1).reshape(-1)
        rots = torch.stack(
            [self.anchor_rotations, self.anchor_rotations, self.negative_rotations], 1
        ).reshape(-1, 3, 3)
        return ids, rots

    def slice(self, a: int, b: int) -> TripletPlan:
        """Triplets ``[a, b)`` of this plan (indices relative to ``start``)."""
        return TripletPlan(
            self.start + a, self.anchor_rotations[a:b], self.negative_rotations[a:b],
            self.anchor_ids[a:b], self.positive_ids[a:b], self.negative_ids[a:b],
        )

    @staticmethod
    def cat(plans: list[TripletPlan]) -> TripletPlan:
        return TripletPlan(
            plans[0].start,
            *(torch.cat([getattr(p, k) for p in plans]) for k in (
                "anchor_rotations", "negative_rotations", "anchor_ids", "positive_ids",
                "negative_ids")),
        )


@dataclass(frozen=True)
class TripletRule:
    """Identity and negative-rotation rules (see the module docstring).

    Args:
        delta: minimum anchor-negative geodesic distance, degrees in [0, 180].
        negatives: ``"poses"`` (rejection from the pose sampler) or ``"uniform"`` (constructive).
        hard_negatives: negative has the anchor's identity.
        num_identities: identities are drawn from ``[0, num_identities)``, at least 2.
    """

    delta: float = 30.0
    negatives: str = "poses"
    hard_negatives: bool = True
    num_identities: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.delta) <= 180.0:
            raise ValueError(
                f"triplets.delta = {self.delta} deg is impossible: two rotations are at most "
                "180 deg apart (choose 0 <= delta <= 180)"
            )
        if self.negatives not in get_args(NegativeSampling):
            raise ValueError(
                f"triplets.negatives must be 'poses' or 'uniform', got '{self.negatives}'"
            )
        if self.num_identities < 2:
            raise ValueError(
                f"triplets.num_identities must be at least 2 (the positive shows another "
                f"identity), got {self.num_identities}"
            )

    def params(self) -> dict[str, Any]:
        return {"delta": float(self.delta), "negatives": self.negatives,
                "hard_negatives": bool(self.hard_negatives),
                "num_identities": int(self.num_identities)}

    def _other_identity(self, ids: Tensor, generator: torch.Generator) -> Tensor:
        # uniform over the other num_identities - 1 identities
        k = self.num_identities
        shift = torch.randint(1, k, ids.shape, generator=generator, dtype=torch.int64)
        return (ids + shift) % k

    def complete(
        self,
        anchor_rotations: Tensor,
        poses: PoseSampler,
        generator: torch.Generator,
        start: int = 0,
        accept: Accept | None = None,
        anchor_ids: Tensor | None = None,
    ) -> TripletPlan:
        """Draw identities and negatives for given anchor rotations ``(T, 3, 3)``.

        ``accept`` (e.g. a generator's ``reachable``) filters negative candidates; the real-anchor
        mode passes the photographs' rotations (and ``anchor_ids``) here.
        """
        R = anchor_rotations.to(torch.float64)
        t = R.shape[0]
        if anchor_ids is None:
            anchor_ids = torch.randint(
                0, self.num_identities, (t,), generator=generator, dtype=torch.int64
            )
        positive_ids = self._other_identity(anchor_ids, generator)
        negative_ids = (anchor_ids.clone() if self.hard_negatives
                        else self._other_identity(anchor_ids, generator))
        delta = float(self.delta)

        def draw(m: int, rows: Tensor) -> Tensor:
            if self.negatives == "uniform":
                return random_rotation_at_least(R[rows], delta, generator)
            return poses.sample(m, generator)

        def ok(cand: Tensor, rows: Tensor) -> Tensor:
            good = geodesic_distance(R[rows], cand) >= delta
            if accept is not None:
                good &= accept(cand.to(torch.float32)).to(torch.bool).cpu()
            return good

        negatives = _rejection(t, draw, ok, what=(
            f"a negative at least {delta:g} deg from its anchor "
            f"(negatives='{self.negatives}', poses='{poses.name}')"))
        return TripletPlan(start, R, negatives, anchor_ids, positive_ids, negative_ids)


def _rejection(
    n: int, draw: Callable[[int, Tensor], Tensor], ok: Callable[[Tensor, Tensor], Tensor],
    what: str,
) -> Tensor:
    """Fill ``n`` rows with the first accepted candidate of each row, round after round."""
    out = torch.empty(n, 3, 3, dtype=torch.float64)
    todo = torch.arange(n)
    for _ in range(_MAX_ROUNDS):
        if len(todo) == 0:
            return out
        cand = draw(len(todo), todo)
        good = ok(cand, todo)
        out[todo[good]] = cand[good]
        todo = todo[~good]
    if len(todo) == 0:
        return out
    raise ValueError(
        f"could not draw {what} for {len(todo)} of {n} triplets in {_MAX_ROUNDS} tries; "
        "lower triplets.delta, widen the pose ranges or use triplets.negatives=uniform"
    )


class TripletSampler:
    """Deterministic triplet plans: ``plan(start, stop)`` depends only on the seed and indices.

    Args:
        seed: non-negative experiment seed.
        poses: anchor pose sampler.
        rule: identity and negative rules.
        block_size: triplets per seeded block (part of what defines the data; stored in attrs).
        accept: optional ``(n, 3, 3) -> (n,) bool`` of renderable rotations (a generator's
            ``reachable``); anchors and negatives are redrawn until accepted.
        anchors: given anchor rotations ``(T, 3, 3)`` (CLERF's real anchors: the photographs'
            labels) instead of drawn ones; triplet ``i`` has anchor ``anchors[i]``.
        stream: seed stream of the blocks (generated triplets and real anchors use different
            streams, so their draws are independent).
    """

    def __init__(
        self,
        seed: int,
        poses: PoseSampler,
        rule: TripletRule,
        block_size: int = 256,
        accept: Accept | None = None,
        anchors: Tensor | None = None,
        stream: int = _STREAM_TRIPLETS,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"triplets.sampling_block must be positive, got {block_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed, self.poses, self.rule = int(seed), poses, rule
        self.block_size, self.accept = int(block_size), accept
        self.anchors = None if anchors is None else anchors.to(torch.float64)
        self.stream = int(stream)
        self._cache: tuple[int, TripletPlan] | None = None

    def params(self) -> dict[str, Any]:
        return {"pose_sampler": self.poses.describe(), "triplet_rule": self.rule.params(),
                "sampling_block": self.block_size}

    def block(self, b: int) -> TripletPlan:
        """The full plan of block ``b`` (triplets ``[b * block_size, (b + 1) * block_size)``)."""
        if self._cache is not None and self._cache[0] == b:
            return self._cache[1]
        g = seeded_generator(self.seed, self.stream, b)
        n = self.block_size
        accept = self.accept
        if self.anchors is not None:
            plan = self.rule.complete(self.anchors[b * n:(b + 1) * n], self.poses, g,
                                      start=b * n, accept=accept)  # fmt: skip
            self._cache = (b, plan)
            return plan

        def draw(m: int, rows: Tensor) -> Tensor:
            return self.poses.sample(m, g)

        def ok(cand: Tensor, rows: Tensor) -> Tensor:
            if accept is None:
                return torch.ones(len(cand), dtype=torch.bool)
            return accept(cand.to(torch.float32)).to(torch.bool).cpu()

        anchors = _rejection(n, draw, ok, what=f"an anchor pose the generator can render "
                                                f"(poses='{self.poses.name}')")
        plan = self.rule.complete(anchors, self.poses, g, start=b * n, accept=accept)
        self._cache = (b, plan)
        return plan

    def plan(self, start: int, stop: int) -> TripletPlan:
        """Triplets ``[start, stop)``."""
        if not 0 <= start < stop:
            raise ValueError(f"bad triplet range [{start}, {stop})")
        n = self.block_size
        parts = []
        for b in range(start // n, -(-stop // n)):
            a = max(start, b * n) - b * n
            z = min(stop, (b + 1) * n) - b * n
            parts.append(self.block(b).slice(a, z))
        out = TripletPlan.cat(parts)
        out.start = start
        return out
