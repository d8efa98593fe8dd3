"""Paired comparisons: two models scored on the same items (zero-shot questions, perplexity windows) compared item
by item, with a 95 % paired-bootstrap interval for the difference; a difference whose interval holds 0 is a tie.

The math is in pure functions of arrays; :func:`compare_records` applies it to two run records that kept their
per-item results (``TaskScore.correct``, ``PerplexityRecord.window_nll_after``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layercut.errors import LayercutError
from layercut.record import Agreement, Paired, RunRecord, ZeroShot

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Difference:
    """``estimate`` = A − B with its paired-bootstrap interval [``low``, ``high``] at ``level``, over ``items``
    paired items. ``tie``: the interval holds 0."""

    estimate: float
    low: float
    high: float
    items: int
    level: float = LEVEL

    @property
    def tie(self) -> bool:
        return self.low <= 0.0 <= self.high

    def stored(self, reference: str) -> Paired:
        """This difference as a record part, against ``reference``."""
        return Paired(reference=reference, estimate=self.estimate, low=self.low, high=self.high, items=self.items,
                      level=self.level, tie=self.tie)

    def verdict(self, higher_is_better: bool = True) -> str:
        """"tie", "better" or "worse": A against B."""
        if self.tie:
            return "tie"
        return "better" if (self.estimate > 0) == higher_is_better else "worse"


def pack(correct: Sequence) -> str:
    """Per-item correctness (bools or 0/1 numbers) as a string of ``0`` and ``1``, one character per item."""
    return "".join("1" if value else "0" for value in correct)


def unpack(bits: str) -> np.ndarray:
    """The boolean array ``[n]`` of a :func:`pack` string."""
    if set(bits) - {"0", "1"}:
        raise LayercutError("per-item correctness must be a string of 0 and 1; the record is damaged: measure again")
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def _check_paired(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise LayercutError(f"a paired comparison needs the same {what} on both sides: {a.shape} against {b.shape}; "
                            "measure both models with the same tasks, --limit and windows")


def _interval(statistics: np.ndarray, estimate: float, items: int, level: float) -> Difference:
    low, high = np.quantile(statistics, [(1 - level) / 2, (1 + level) / 2])
    return Difference(estimate=float(estimate), low=float(low), high=float(high), items=items, level=level)


def accuracy_difference(strata: Sequence[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0,
                        level: float = LEVEL) -> Difference:
    """Difference of mean accuracy, A − B, averaged over strata (tasks; seeds × tasks), each a pair of boolean
    arrays ``[n_s]`` of per-item correctness on the same items.

    Paired bootstrap, stratified: each resample draws every stratum's items with replacement; a paired item adds
    +1 (only A right), −1 (only B right) or 0, so drawing n_s items is a multinomial draw of those three counts,
    which is what this does (``numpy.random.Generator`` seeded with ``seed``). Percentile interval.
    """
    if not strata:
        raise LayercutError("a paired comparison needs at least one task scored on both sides")
    generator = np.random.default_rng(seed)
    estimate, statistics, items = 0.0, np.zeros(resamples), 0
    for a, b in strata:
        a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
        _check_paired(a, b, "items")
        n = a.size
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
        counts = generator.multinomial(n, [only_a / n, only_b / n, (n - only_a - only_b) / n], size=resamples)
        statistics += (counts[:, 0] - counts[:, 1]) / n
        estimate += (only_a - only_b) / n
        items += n
    return _interval(statistics / len(strata), estimate / len(strata), items, level)


def mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Exact (binomial) McNemar two-sided p-value of per-item correctness ``a``, ``b`` ``[n]`` on the same items:
    under "A and B are equally accurate" the items only one of them gets right split 1:1. 1.0 when none differ."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    _check_paired(a, b, "items")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def mean_difference(a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0,
                    level: float = LEVEL, what: str = "items") -> Difference:
    """Mean of A − mean of B over the same items (``[N]`` values each, item i of A paired with item i of B), with
    its paired-bootstrap interval: resampling the items."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    _check_paired(a, b, what)
    differences = a - b
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, differences.size, size=(resamples, differences.size))
    return _interval(differences[draws].mean(axis=1), differences.mean(), differences.size, level)


def log_perplexity_difference(nll_a: np.ndarray, nll_b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                              level: float = LEVEL) -> Difference:
    """log perplexity of A − log perplexity of B from the mean next-token NLL per window, ``[N]`` each, on the same
    windows of equal length (so the perplexity is exp of the mean over windows). Paired bootstrap over windows;
    ``exp`` of the estimate and its bounds is the ratio of perplexities A / B and its interval."""
    return mean_difference(nll_a, nll_b, resamples, seed, level, "windows")


def agreement_items(agreement: Agreement) -> dict[str, tuple[float, list[float] | None, tuple, bool]]:
    """Each agreement measure by name: (its value, its per-item values or None, what the items must match between
    two models to be paired, whether higher is better). Per text the mean KL and top-1 agreement, per test window;
    in generation the matching prefix, per prompt."""
    found = {}
    for text, measured in agreement.texts.items():
        shape = ("windows", measured.windows, measured.seq_len)
        found[f"KL to dense ({text})"] = (measured.kl, measured.window_kl, shape, False)
        found[f"top-1 agreement with dense ({text})"] = (measured.top1, measured.window_top1, shape, True)
    generation = agreement.generation
    if generation is not None:
        shape = ("prompts", generation.prompts, generation.prompt_tokens, generation.new_tokens)
        found["generation: matching prefix"] = (generation.mean_prefix, generation.prefix, shape, True)
    return found


def agreement_differences(a: Agreement, b: Agreement, seed: int = 0
                          ) -> dict[str, tuple[float, float, Difference | None, bool]]:
    """Model A's agreement with the dense model against model B's, measure by measure (:func:`agreement_items`;
    name → (A, B, paired difference A − B or None, whether higher is better)), paired over the test windows or
    prompts. None where a side kept no per-item values, or the two were measured on other windows or prompts."""
    theirs = agreement_items(b)
    found = {}
    for name, (value_a, left, shape, higher_is_better) in agreement_items(a).items():
        if name not in theirs:
            continue
        value_b, right, other_shape, _ = theirs[name]
        paired = shape == other_shape and left is not None and right is not None
        difference = mean_difference(left, right, seed=seed, what=shape[0]) if paired else None
        found[name] = (value_a, value_b, difference, higher_is_better)
    return found


def ratio(difference: Difference) -> tuple[float, float, float]:
    """A log-perplexity difference as the perplexity ratio A / B with its interval: (ratio, low, high)."""
    return math.exp(difference.estimate), math.exp(difference.low), math.exp(difference.high)


# ----------------------------------------------------------------------------------------------- records


def task_strata(a: ZeroShot, b: ZeroShot, tasks: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Per task of ``tasks``, both sides' per-item correctness (acc); None when a side lacks a task's items (a
    record written without them, or scored on other items)."""
    strata = []
    for task in tasks:
        left, right = a.tasks.get(task), b.tasks.get(task)
        if left is None or right is None or left.correct is None or right.correct is None:
            return None
        if len(left.correct) != len(right.correct):
            return None
        strata.append((unpack(left.correct), unpack(right.correct)))
    return strata


@dataclass(frozen=True)
class PairedRow:
    """One measure of record A against record B: its values on each side and the paired difference (None with
    ``reason`` when the records hold no paired data for it)."""

    measure: str
    a: float | None
    b: float | None
    difference: Difference | None
    reason: str = ""
    higher_is_better: bool = True
    log_ratio: bool = False  # a difference of logs: exp of it is a ratio (perplexity)


def against(a: ZeroShot | None, nll_a: list[float] | None, b: ZeroShot | None, nll_b: list[float] | None,
            seed: int = 0) -> tuple[Difference | None, Difference | None]:
    """A model against B measured on the same windows and items: (log-perplexity difference, difference of the
    average accuracy over A's ``average_tasks``), each None where a side kept no per-window or per-item data."""
    ppl = None
    if nll_a is not None and nll_b is not None and len(nll_a) == len(nll_b):
        ppl = log_perplexity_difference(nll_a, nll_b, seed=seed)
    strata = None
    if a is not None and b is not None:
        strata = task_strata(a, b, [task for task in (a.average_tasks or a.tasks) if task in b.tasks])
    return ppl, accuracy_difference(strata, seed=seed) if strata else None


def _zero_shot_rows(a: ZeroShot, b: ZeroShot, seed: int) -> list[PairedRow]:
    rows = []
    for task in [task for task in a.tasks if task in b.tasks]:
        strata = task_strata(a, b, [task])
        rows.append(PairedRow(f"{task} acc", a.tasks[task].acc, b.tasks[task].acc,
                              accuracy_difference(strata, seed=seed) if strata else None,
                              "" if strata else "unpaired: no per-item results on both sides"))
    averaged = [task for task in (a.average_tasks or a.tasks) if task in b.tasks]
    if averaged:
        strata = task_strata(a, b, averaged)
        rows.append(PairedRow(f"commonsense average acc ({len(averaged)} tasks)",
                              sum(a.tasks[t].acc for t in averaged) / len(averaged),
                              sum(b.tasks[t].acc for t in averaged) / len(averaged),
                              accuracy_difference(strata, seed=seed) if strata else None,
                              "" if strata else "unpaired: no per-item results on both sides"))
    return rows


def compare_records(a: RunRecord, b: RunRecord, seed: int = 0) -> list[PairedRow]:
    """The pruned model of run A against that of run B, measure by measure: held-out perplexity (paired over the
    test windows; the ratio A / B) and zero-shot accuracy per task and on the commonsense average (paired over the
    items). A measure is paired only where both records kept per-item results on the same windows or items."""
    rows = []
    ppl_a, ppl_b = a.metrics.perplexity, b.metrics.perplexity
    if ppl_a is not None and ppl_b is not None:
        same = (a.source, ppl_a.text, ppl_a.windows, ppl_a.seq_len) == (b.source, ppl_b.text, ppl_b.windows,
                                                                         ppl_b.seq_len)
        nll_a, nll_b = ppl_a.window_nll_after, ppl_b.window_nll_after
        paired = same and nll_a is not None and nll_b is not None and len(nll_a) == len(nll_b)
        reason = ("" if paired else "unpaired: " + ("other model or windows" if not same
                                                    else "no per-window results on both sides"))
        rows.append(PairedRow(f"log perplexity ({ppl_a.text or '?'})", math.log(ppl_a.after), math.log(ppl_b.after),
                              log_perplexity_difference(nll_a, nll_b, seed=seed) if paired else None, reason,
                              higher_is_better=False, log_ratio=True))
    if a.metrics.zero_shot is not None and b.metrics.zero_shot is not None:
        rows += _zero_shot_rows(a.metrics.zero_shot.after, b.metrics.zero_shot.after, seed)
    if a.metrics.agreement is not None and b.metrics.agreement is not None:
        same_model = a.source == b.source
        for name, (value_a, value_b, difference, higher_is_better) in agreement_differences(
                a.metrics.agreement, b.metrics.agreement, seed).items():
            paired = same_model and difference is not None
            reason = "" if paired else "unpaired: " + ("other model" if not same_model
                                                       else "no per-window or per-prompt results on both sides")
            rows.append(PairedRow(name, value_a, value_b, difference if paired else None, reason, higher_is_better))
    return rows
