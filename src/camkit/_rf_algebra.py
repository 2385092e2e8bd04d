"""Exact index arithmetic for receptive fields along one spatial axis.

A cell ``i`` of a feature map sees the input rows ``[start(i), end(i)]``.
For plain convolutions both bounds are affine in ``i`` (``S*i - P`` and
``S*i - P + r - 1``). Resizes, adaptive pooling and transposed convolutions
bring floors into the index maps, so bounds are stored as *quasi-affine*
functions ``f(i) = step * (i // period) + offsets[i % period]``: a staircase
that repeats every ``period`` cells and climbs ``step`` pixels per repeat.
That family is closed under composition and under the pointwise min / max of
two members with the same slope, which is all the graph walk needs. Every
map used here is non-decreasing, so the first and last cell of a range give
its extreme pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from math import gcd


def _lcm(a: int, b: int) -> int:
    return a * b // gcd(a, b)


@dataclass(frozen=True)
class QuasiAffine:
    """``f(i) = step * (i // period) + offsets[i % period]`` for every integer ``i``."""

    period: int
    step: int
    offsets: tuple[int, ...]

    def __call__(self, i: int) -> int:
        q, r = divmod(i, self.period)
        return self.step * q + self.offsets[r]

    @property
    def slope(self) -> Fraction:
        """Input pixels gained per output cell (the effective stride)."""
        return Fraction(self.step, self.period)

    @staticmethod
    def affine(a: int, b: int) -> QuasiAffine:
        """``i -> a*i + b`` (``a >= 0``)."""
        return QuasiAffine(1, a, (b,))

    @staticmethod
    def floordiv(a: int, b: int, c: int) -> QuasiAffine:
        """``i -> floor((a*i + b) / c)`` (``a >= 0``, ``c > 0``)."""
        g = gcd(a, c) or c
        period = c // g
        return QuasiAffine(period, a // g, tuple((a * r + b) // c for r in range(period)))

    def then(self, outer: QuasiAffine) -> QuasiAffine:
        """The composition ``i -> outer(self(i))``."""
        # Advancing i by `period * m` advances self(i) by `step * m`; choose m so
        # that this is a whole number of outer periods.
        m = outer.period // gcd(self.step, outer.period)
        period = self.period * m
        values = [outer(self(r)) for r in range(period + 1)]
        return QuasiAffine(period, values[-1] - values[0], tuple(values[:-1]))._reduced()

    def _with_period(self, period: int) -> QuasiAffine:
        # Same function, written with a period that is a multiple of ours.
        reps = period // self.period
        return QuasiAffine(period, self.step * reps, tuple(self(r) for r in range(period)))

    def combine(self, other: QuasiAffine, pick) -> QuasiAffine:
        """Pointwise ``pick(self(i), other(i))`` for ``pick`` in (min, max).

        Both functions must have the same slope; otherwise the result is not
        quasi-affine and ``ValueError`` is raised.
        """
        if self == other:
            return self
        if self.period == other.period == 1 and self.step == other.step:
            return QuasiAffine(1, self.step, (pick(self.offsets[0], other.offsets[0]),))
        if self.slope != other.slope:
            raise ValueError(f"slopes differ: {self.slope} and {other.slope}")
        period = _lcm(self.period, other.period)
        a, b = self._with_period(period), other._with_period(period)
        offsets = tuple(pick(x, y) for x, y in zip(a.offsets, b.offsets, strict=True))
        return QuasiAffine(period, a.step, offsets)._reduced()

    def _reduced(self) -> QuasiAffine:
        # Smallest period that describes the same function.
        n = len(self.offsets)
        for d in range(1, n):
            if n % d or self.step % (n // d):
                continue
            step = self.step // (n // d)
            if all(
                self.offsets[r] == self.offsets[r % d] + (r // d) * step for r in range(n)
            ):
                return QuasiAffine(d, step, self.offsets[:d])
        return self


IDENTITY = QuasiAffine.affine(1, 0)


@dataclass(frozen=True)
class AxisField:
    """What the cells of one tensor see along one input axis.

    ``start``/``end`` give the first and last input pixel of cell ``i``
    (inclusive, unclipped) along the local path; both are ``None`` once the
    axis has been mixed into every cell (global pooling, flattening). ``shared``
    is an inclusive pixel span that every cell sees in addition (a global
    branch merged in, such as a squeeze-and-excitation gate), or ``None``.
    """

    start: QuasiAffine | None
    end: QuasiAffine | None
    shared: tuple[int, int] | None = None

    @property
    def local(self) -> bool:
        return self.start is not None

    def mapped(self, lo: QuasiAffine, hi: QuasiAffine) -> AxisField:
        """The field after an op whose cell ``i`` reads input cells ``lo(i)..hi(i)``."""
        if self.start is None or self.end is None:
            return self
        return AxisField(lo.then(self.start), hi.then(self.end), self.shared)

    def collapsed(self, first: int, last: int) -> AxisField:
        """Every output cell sees all cells ``first..last`` of this axis."""
        if self.start is None or self.end is None:
            return self
        span = (self.start(first), self.end(last))
        return AxisField(None, None, _hull(self.shared, span))

    def span(self, i: int) -> tuple[int, int]:
        """Inclusive pixel span of cell ``i``, shared part included."""
        if self.start is None or self.end is None:
            if self.shared is None:  # pragma: no cover - every field sees something
                raise ValueError("empty field")
            return self.shared
        return _hull(self.shared, (self.start(i), self.end(i)))


def _hull(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]))


def merge_axes(fields: list[AxisField]) -> AxisField:
    """Union of several fields over the same cells (an add, a concat).

    Raises ``ValueError`` when two local paths advance at different strides.
    """
    start = end = None
    shared = None
    for f in dict.fromkeys(fields):
        shared = _hull(shared, f.shared)
        if f.start is None or f.end is None:
            continue
        start = f.start if start is None else start.combine(f.start, min)
        end = f.end if end is None else end.combine(f.end, max)
    return AxisField(start, end, shared)


def hull(a: tuple[int, int] | None, b: tuple[int, int] | None) -> tuple[int, int] | None:
    """Smallest inclusive span holding both spans (``None`` is empty)."""
    return _hull(a, b)
