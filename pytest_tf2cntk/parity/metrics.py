"""Error metrics between a reference tensor and a candidate (pure numpy, no pytest).

Every metric says where it was worst (the flat element index, shown as a multi-index), so a
failure can point at the element. Relative error uses a floor so tiny reference values do not
turn rounding noise into huge ratios: rel = |a - b| / max(|ref|, floor), floor defaulting to
1e-3 x the reference's RMS magnitude (and never below the dtype's smallest normal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pytest_tf2cntk.codec import Jsonable

REL_FLOOR_FRACTION = 1e-3
UNIT_ROUNDOFF = {np.dtype(np.float16): 2.0 ** -11, np.dtype(np.float32): 2.0 ** -24,
                 np.dtype(np.float64): 2.0 ** -53}  # half an ulp of 1, relative


@dataclass
class Metrics(Jsonable):
    """How far ``got`` is from ``ref`` for one output on one input."""

    shape_ok: bool
    dtype_ok: bool
    max_abs: float
    max_abs_at: tuple[int, ...]
    max_rel: float
    max_rel_at: tuple[int, ...]
    rel_floor: float
    max_ulp: float
    mean_abs: float
    ref_scale: float  # RMS of the reference: puts absolute errors in proportion
    cosine: float
    nan_mismatch: int  # elements NaN/Inf in one but not the other
    top1_agreement: float | None  # class-score outputs only (rank >= 2, last axis > 1)
    size: int
    frac_over: float = 0.0  # fraction of elements over the budget (filled in by the verdict)

    @property
    def scaled_error(self) -> float:
        """max|err| / rms(ref): the quantity budgets bound (see budgets.py); inf if shapes differ."""
        return ratio_to_scale(self.max_abs, self.ref_scale) if self.shape_ok else float("inf")


def nonfinite_mismatch(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Elements where NaN/Inf do not agree: finite in one only, or different non-finite values
    (+inf vs -inf, inf vs nan). Same-shape arrays."""
    fr, fg = np.isfinite(r), np.isfinite(g)
    with np.errstate(invalid="ignore"):
        same = (r == g) | (np.isnan(r) & np.isnan(g))
    return (fr != fg) | (~fr & ~fg & ~same)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Units in the last place between float arrays of the same dtype (float16/32/64)."""
    dtype = a.dtype
    if dtype not in (np.float16, np.float32, np.float64):
        return np.abs(a.astype(np.float64) - b.astype(np.float64))
    int_t = {2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    ai = np.ascontiguousarray(a).view(int_t).astype(np.int64)
    bi = np.ascontiguousarray(b.astype(dtype)).view(int_t).astype(np.int64)
    # map the sign-magnitude float bit patterns onto a monotonic integer line
    sign = np.int64(1) << (8 * dtype.itemsize - 1)
    ai = np.where(ai < 0, -(ai & (sign - 1)), ai)
    bi = np.where(bi < 0, -(bi & (sign - 1)), bi)
    return np.abs(ai - bi).astype(np.float64)


def compare(ref: np.ndarray, got: np.ndarray) -> Metrics:
    ref = np.asarray(ref)
    got = np.asarray(got)
    shape_ok = ref.shape == got.shape
    dtype_ok = ref.dtype == got.dtype
    if not shape_ok or ref.size == 0:
        inf = float("inf") if not shape_ok else 0.0
        return Metrics(shape_ok, dtype_ok, inf, (), inf, (), 0.0, inf, inf, 0.0,
                       1.0 if shape_ok else 0.0, 0, None, int(ref.size))
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    finite_r, finite_g = np.isfinite(r), np.isfinite(g)
    both = finite_r & finite_g
    nan_mismatch = int(np.count_nonzero(nonfinite_mismatch(r, g)))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both, np.abs(r - g), 0.0)
    ref_scale = float(np.sqrt(np.mean(np.square(np.where(finite_r, r, 0.0)))))
    tiny = float(np.finfo(ref.dtype).tiny) if np.issubdtype(ref.dtype, np.floating) else 1.0
    floor = max(REL_FLOOR_FRACTION * ref_scale, tiny)
    rel = diff / np.maximum(np.abs(np.where(finite_r, r, 0.0)), floor)
    i_abs = int(np.argmax(diff))
    i_rel = int(np.argmax(rel))
    if np.issubdtype(ref.dtype, np.floating) and dtype_ok:
        ulp = ulp_distance(np.where(both, ref, 0).astype(ref.dtype), np.where(both, got, 0).astype(ref.dtype))
        max_ulp = float(ulp.max())
    else:
        max_ulp = float(diff.max())
    rv, gv = np.where(both, r, 0.0).ravel(), np.where(both, g, 0.0).ravel()
    denom = float(np.linalg.norm(rv) * np.linalg.norm(gv))
    cosine = float(np.dot(rv, gv) / denom) if denom > 0 else (1.0 if not rv.any() and not gv.any() else 0.0)
    top1 = None
    if ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
        top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(g, axis=-1)))
    return Metrics(True, dtype_ok, float(diff.flat[i_abs]), tuple(int(i) for i in np.unravel_index(i_abs, ref.shape)),
                   float(rel.flat[i_rel]), tuple(int(i) for i in np.unravel_index(i_rel, ref.shape)),
                   floor, max_ulp, float(diff.mean()), ref_scale, cosine, nan_mismatch, top1,
                   int(ref.size))


def fraction_over(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> float:
    """Fraction of elements with |got - ref| > atol + rtol * |ref| (numpy's rule)."""
    r = np.asarray(ref, np.float64)
    g = np.asarray(got, np.float64)
    if r.shape != g.shape or r.size == 0:
        return 1.0 if r.shape != g.shape else 0.0
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(g - r) <= atol + rtol * np.abs(r))
    bad &= ~((np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g)))
    return float(np.count_nonzero(bad) / r.size)


def ratio_to_scale(max_abs: float, scale: float) -> float:
    """max_abs / scale, with 0/0 = 0 and x/0 = inf."""
    if scale > 0:
        return max_abs / scale
    return 0.0 if max_abs == 0 else float("inf")


def scaled_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``compare(ref, got).scaled_error`` with the same NaN/Inf rule (non-finite values must agree
    exactly, else inf), without the other metrics (ulps, cosine, relative error), which cost 10x
    more on large tensors; layerwise localization computes it for every node. Tested equal."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    r = ref.astype(np.float64, copy=False)
    g = got.astype(np.float64, copy=False)
    fr, fg = np.isfinite(r), np.isfinite(g)
    if fr.all() and fg.all():
        return ratio_to_scale(float(np.max(np.abs(r - g))), math.sqrt(float(np.mean(np.square(r)))))
    if nonfinite_mismatch(r, g).any():
        return float("inf")
    both = fr & fg
    max_abs = float(np.max(np.abs(r[both] - g[both]))) if both.any() else 0.0
    return ratio_to_scale(max_abs, math.sqrt(float(np.mean(np.square(np.where(fr, r, 0.0))))))
