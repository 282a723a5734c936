"""The search for a failing input: Hypothesis draws input recipes, the engine evaluates them.

First the deterministic special patterns (``inputs.special_examples``: NaN, +Inf, -Inf, zeros,
range extremes, large and subnormal values on each input, when asked for), then Hypothesis
explores and shrinks a failure (bounded), then one plain uniform example over each whole input
domain, the input most conversion bugs show on. Only the search lives here; the engine judges
each example and the verdict is built from what the search kept.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from pytest_tf2cntk.convert.domains import InputDomain
from pytest_tf2cntk.parity.inputs import InputRecipe, inputs_strategy, materialize, special_examples
from pytest_tf2cntk.parity.options import ParityOptions
from pytest_tf2cntk.parity.result import Evaluation, OutputCheck
from pytest_tf2cntk.parity.truth import RunTruth

MAX_SHRINK_EVALS = 40  # real evaluations spent on shrinking a failure, then it is minimal enough
Recipes = dict[str, InputRecipe]


@dataclass
class SearchOutcome:
    evaluations: int = 0
    failure: tuple[Recipes, Evaluation] | None = None  # the smallest failing example found
    # per output: the worst example seen, by error / allowed (a failing one always wins)
    worst: dict[str, tuple[float, Recipes, OutputCheck]] = field(default_factory=dict)
    examples: list[Recipes] = field(default_factory=list)  # every example evaluated, in order
    run: dict[str, RunTruth] = field(default_factory=dict)  # per output, over those examples


class Evaluator(Protocol):
    """What the search needs of the engine: the inputs' domains and one example's verdict."""

    conversion: Any
    device: str
    domains: dict[str, InputDomain]
    timings: dict[str, float]

    def evaluate(self, feeds: dict[str, np.ndarray], with_ort: bool = False) -> Evaluation: ...


class _ExampleFailed(Exception):
    def __init__(self, key: tuple) -> None:
        super().__init__("parity example failed")
        self.key = key


def add_to_run(run: dict[str, RunTruth], ev: Evaluation, config: Any) -> None:
    """Count one example into the run-level measured verdict of each output (``RunTruth``)."""
    for name, c in ev.checks.items():
        if c.truth is not None:
            run.setdefault(name, RunTruth(config.run_factor)).add(c.truth)


def _key(recipes: Recipes) -> tuple:
    return tuple(sorted((k, tuple(v.__dict__.values())) for k, v in recipes.items()))


class Search:
    def __init__(self, engine: Evaluator, options: ParityOptions,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.engine = engine
        self.options = options
        self.progress = progress
        self.outcome = SearchOutcome()
        self.failures: dict[tuple, tuple[Recipes, Evaluation]] = {}
        self.shrink_evals = 0
        self.stopped: Exception | None = None  # what stopped the search (raised as itself at the end)

    def evaluate(self, key: tuple, recipes: Recipes) -> None:
        if self.failures and self.shrink_evals >= MAX_SHRINK_EVALS:
            return  # shrinking budget spent: the smallest failure so far is the answer
        engine, out = self.engine, self.outcome
        t0 = time.perf_counter()
        feeds = materialize(recipes, engine.domains)
        engine.timings["inputs"] += time.perf_counter() - t0
        ev = engine.evaluate(feeds, with_ort=out.evaluations == 0)
        out.evaluations += 1
        out.examples.append(recipes)
        add_to_run(out.run, ev, self.options.budgets)
        if self.failures:
            self.shrink_evals += 1
        elif self.progress:
            self.progress(out.evaluations, self.options.max_examples)
        for name, c in ev.checks.items():
            held = out.worst.get(name)
            if held is None or (held[2].passed and (not c.passed or c.severity > held[0])):
                out.worst[name] = (c.severity, recipes, c)
        if not ev.passed:
            self.failures[key] = (recipes, ev)

    def prop(self, recipes: Recipes) -> None:
        if self.stopped is not None:
            return  # the check cannot go on: let Hypothesis run out cheaply, then raise it
        key = _key(recipes)
        if key not in self.failures:
            try:
                self.evaluate(key, recipes)
            except Exception as exc:  # a crashed or hung worker is no counterexample to shrink
                self.stopped = exc
                return
        if key in self.failures:  # one raise site: Hypothesis tells failures apart by origin
            raise _ExampleFailed(key)

    def run(self) -> SearchOutcome:
        failed_key = self._hypothesis()
        if self.stopped is not None:  # one clear error (WorkerCrashed, ...), not Hypothesis' group of them
            raise self.stopped
        if failed_key is None:
            full_range = {name: InputRecipe("uniform", 0, 0.0, 1.0, "none", 0.0) for name in self.engine.domains}
            key = _key(full_range)
            if key not in self.failures:
                self.evaluate(key, full_range)
            failed_key = key if key in self.failures else None
        if failed_key is not None:
            self.outcome.failure = self.failures[failed_key]
        return self.outcome

    def _hypothesis(self) -> tuple | None:
        from hypothesis import HealthCheck, Phase, example, given, settings
        from hypothesis import seed as hyp_seed
        from hypothesis.reporting import with_reporter

        o, engine = self.options, self.engine
        phases = [Phase.explicit, Phase.generate, Phase.shrink]
        if o.database is not None:
            phases.insert(1, Phase.reuse)
        def prop(recipes: Recipes) -> None:
            self.prop(recipes)

        test = given(inputs_strategy(engine.domains, o.edge_values, o.allow_nonfinite))(prop)
        for recipes in reversed(special_examples(engine.domains, o.edge_values, o.allow_nonfinite)):
            test = example(recipes)(test)  # explicit examples run first, in this order
        test = settings(max_examples=o.max_examples, deadline=None, derandomize=o.derandomize,
                        database=o.database, phases=phases, suppress_health_check=list(HealthCheck),
                        report_multiple_bugs=False, print_blob=False)(test)
        # separate example databases per model and device
        test.hypothesis.inner_test._hypothesis_internal_add_digest = (  # type: ignore[attr-defined]
            f"{engine.conversion.key}:{engine.device}".encode())
        if o.seed is not None and not o.derandomize:
            test = hyp_seed(o.seed)(test)
        with with_reporter(lambda _msg: None):  # our own report replaces Hypothesis' printout
            try:
                test()
            except _ExampleFailed as exc:
                return exc.key
        return None
