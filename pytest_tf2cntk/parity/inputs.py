"""Hypothesis strategies for model inputs.

Hypothesis draws a handful of parameters per input (distribution, sub-range, seed, special-value
pattern) and numpy fills the tensor, so a tensor of a million elements costs milliseconds and
shrinking still moves towards simple inputs: a constant tensor before a uniform one, the full
range before a narrow one, no special values before some, seed 0 before others.

Special values: with ``edge_values`` (zeros, range extremes, large and subnormal values) and
``allow_nonfinite`` (NaN, +Inf, -Inf) the first examples are deterministic: each pattern on each
float input in turn (``special_examples``), then Hypothesis mixes them in. NaN policy: NaN/Inf
are generated only when asked; an output then passes only if CNTK produces NaN/Inf in exactly
the same elements as TensorFlow (same sign for Inf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pytest_tf2cntk.codec import Jsonable
from pytest_tf2cntk.convert.domains import InputDomain

DISTRIBUTIONS = ("constant", "uniform", "normal", "ramp")  # shrink order: simplest first
EDGE_PATTERNS = ("zeros", "extremes", "large", "subnormal")
NONFINITE_PATTERNS = ("nan", "+inf", "-inf")
SPECIALS = ("none",) + EDGE_PATTERNS + NONFINITE_PATTERNS
SPECIAL_FRACTION = 0.1  # of the elements, in the deterministic first examples (zeros: all of them)


@dataclass(frozen=True)
class InputRecipe(Jsonable):
    """The drawn parameters of one input tensor; ``fill`` turns them into the tensor."""

    distribution: str
    seed: int
    lo_frac: float  # sub-range [lo, hi] of the domain, as fractions of its width
    hi_frac: float
    special: str
    special_frac: float

    def fill(self, dom: InputDomain) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        width = dom.high - dom.low
        lo = dom.low + self.lo_frac * width
        hi = dom.low + self.hi_frac * width
        n = int(np.prod(dom.shape)) if dom.shape else 1
        if dom.kind in ("index", "int", "bool"):
            ilo, ihi = int(np.floor(lo)), max(int(np.ceil(hi)), int(np.floor(lo)) + 1)
            ihi = min(ihi, int(dom.high))
            ilo = min(ilo, ihi - 1)
            if self.distribution == "constant":
                flat = np.full(n, ilo)
            elif self.distribution == "ramp":
                flat = ilo + np.arange(n) % (ihi - ilo)
            else:
                flat = rng.integers(ilo, ihi, n)
            return flat.reshape(dom.shape).astype(dom.dtype)
        if self.distribution == "constant":
            flat = np.full(n, lo, np.float64)
        elif self.distribution == "uniform":
            flat = rng.uniform(lo, hi, n)
        elif self.distribution == "normal":
            flat = np.clip(rng.normal((lo + hi) / 2, (hi - lo) / 4 or 1e-12, n), lo, hi)
        else:
            flat = np.linspace(lo, hi, n)
        flat = self._specials(flat, dom, rng)
        return flat.reshape(dom.shape).astype(dom.dtype)

    def _specials(self, flat: np.ndarray, dom: InputDomain, rng: np.random.Generator) -> np.ndarray:
        if self.special == "none" or self.special_frac <= 0 or not flat.size:
            return flat
        mask = rng.random(flat.size) < self.special_frac
        if not mask.any():
            mask[rng.integers(flat.size)] = True
        info = np.finfo(np.dtype(dom.dtype))
        if self.special == "zeros":
            values: Any = 0.0
        elif self.special == "extremes":
            values = rng.choice([dom.low, dom.high], mask.sum())
        elif self.special == "large":
            values = rng.choice([-1.0, 1.0], mask.sum()) * float(info.max) ** 0.25
        elif self.special == "subnormal":
            values = rng.choice([-1.0, 1.0], mask.sum()) * float(info.tiny) / 4
        else:
            values = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[self.special]
        flat = flat.copy()
        flat[mask] = values
        return flat

    def describe(self, dom: InputDomain | None = None) -> str:
        """E.g. 'uniform in [-0.5, 1] seed=3 + 2% zeros' (values, when the domain is known)."""
        if dom is not None:
            width = dom.high - dom.low
            lo, hi = dom.low + self.lo_frac * width, dom.low + self.hi_frac * width
            if dom.kind != "float":
                lo, hi = int(np.floor(lo)), max(int(np.ceil(hi)), int(np.floor(lo)) + 1)
        else:
            lo, hi = self.lo_frac, self.hi_frac
        if self.distribution == "constant":
            text = f"constant {lo:.6g}"
        else:
            text = f"{self.distribution} in [{lo:.6g}, {hi:.6g}] seed={self.seed}"
        if self.special != "none":
            text += f" + {self.special_frac:.0%} {self.special}"
        return text


def recipe_strategy(edge_values: bool = False, allow_nonfinite: bool = False) -> Any:
    from hypothesis import strategies as st

    specials = ["none"]
    if edge_values:
        specials += list(EDGE_PATTERNS)
    if allow_nonfinite:
        specials += list(NONFINITE_PATTERNS)

    @st.composite
    def recipe(draw: Any) -> InputRecipe:
        dist = draw(st.sampled_from(DISTRIBUTIONS))
        # both shrink towards the full range [0, 1] of the domain
        lo = draw(st.floats(0.0, 0.9, allow_nan=False))
        hi = min(1.0, lo + 1.0 - draw(st.floats(0.0, 0.95, allow_nan=False)))
        seed = draw(st.integers(0, 2 ** 32 - 1))
        special = draw(st.sampled_from(specials))
        frac = draw(st.floats(0.001, 0.5)) if special != "none" else 0.0
        return InputRecipe(dist, seed, lo, hi, special, frac)

    return recipe()


def inputs_strategy(domains: dict[str, InputDomain], edge_values: bool = False,
                    allow_nonfinite: bool = False) -> Any:
    """Strategy of ``dict[name, InputRecipe]``; ``materialize`` makes the arrays."""
    from hypothesis import strategies as st

    floats = any(d.kind == "float" for d in domains.values())
    return st.fixed_dictionaries({
        name: recipe_strategy(edge_values and d.kind == "float", allow_nonfinite and floats and d.kind == "float")
        for name, d in domains.items()})


def materialize(recipes: dict[str, InputRecipe], domains: dict[str, InputDomain]) -> dict[str, np.ndarray]:
    return {name: recipes[name].fill(domains[name]) for name in domains}


def special_examples(domains: dict[str, InputDomain], edge_values: bool = False,
                     allow_nonfinite: bool = False) -> list[dict[str, InputRecipe]]:
    """The deterministic first examples: each asked-for pattern on each float input in turn
    (uniform over the whole domain otherwise), so every pattern is checked on every input
    whatever Hypothesis goes on to draw."""
    patterns = (EDGE_PATTERNS if edge_values else ()) + (NONFINITE_PATTERNS if allow_nonfinite else ())
    plain = {name: InputRecipe("uniform", 0, 0.0, 1.0, "none", 0.0) for name in domains}
    out = []
    for name, dom in domains.items():
        if dom.kind != "float":
            continue
        for pattern in patterns:
            frac = 1.0 if pattern == "zeros" else SPECIAL_FRACTION
            out.append({**plain, name: InputRecipe("uniform", 0, 0.0, 1.0, pattern, frac)})
    return out
