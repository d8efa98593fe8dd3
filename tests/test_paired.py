"""Paired comparisons (layercut.paired): identical models tie exactly, a clear difference does not, and the
bootstrap agrees with independent computations (exact McNemar by hand, the normal approximation)."""

import math

import numpy as np
import pytest

from layercut import paired
from layercut.errors import LayercutError
from layercut.record import PerplexityRecord, RunRecord, TaskScore, ZeroShot


def correctness(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p


def test_pack_and_unpack_round_trip():
    values = [True, False, False, True, True]
    assert paired.pack(values) == "10011" and paired.pack([1.0, 0.0]) == "10"
    assert paired.unpack("10011").tolist() == values
    with pytest.raises(LayercutError, match="0 and 1"):
        paired.unpack("10a")


def test_identical_models_give_exactly_zero_and_a_tie():
    a = correctness(500, 0.6, 0)
    found = paired.accuracy_difference([(a, a.copy()), (a[:100], a[:100])])
    assert (found.estimate, found.low, found.high) == (0.0, 0.0, 0.0)
    assert found.tie and found.verdict() == "tie" and found.items == 600
    assert paired.mcnemar(a, a) == 1.0
    nll = np.random.default_rng(1).random(64) + 2.0
    same = paired.log_perplexity_difference(nll, nll.copy())
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0) and same.tie
    assert paired.ratio(same) == (1.0, 1.0, 1.0)


def test_a_clear_difference_is_not_a_tie():
    b = correctness(1000, 0.5, 0)
    a = b.copy()
    a[np.flatnonzero(~b)[:100]] = True  # A gets 100 more items right, and none fewer
    found = paired.accuracy_difference([(a, b)])
    assert found.estimate == pytest.approx(0.1)
    assert not found.tie and 0 < found.low < 0.1 < found.high and found.verdict() == "better"
    assert paired.accuracy_difference([(b, a)]).verdict() == "worse"
    nll_b = np.random.default_rng(2).random(128) + 3.0
    worse = paired.log_perplexity_difference(nll_b + 0.05, nll_b)
    assert worse.estimate == pytest.approx(0.05) and not worse.tie
    assert worse.verdict(higher_is_better=False) == "worse"
    assert paired.ratio(worse)[0] == pytest.approx(math.exp(0.05))


def test_mcnemar_equals_the_exact_binomial_computed_by_hand():
    a, b = correctness(300, 0.6, 3), correctness(300, 0.55, 4)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n, k = only_a + only_b, min(only_a, only_b)
    by_hand = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    assert paired.mcnemar(a, b) == pytest.approx(by_hand, rel=1e-9)


def test_bootstrap_interval_agrees_with_the_normal_approximation_and_with_mcnemar():
    b = correctness(4000, 0.55, 5)
    a = b.copy()
    flip = np.random.default_rng(6).random(4000) < 0.2  # 20 % of the items change, evenly both ways ...
    a[flip] = ~a[flip]
    a[np.flatnonzero(~a)[:80]] = True  # ... plus 80 items only A gets right: +0.02
    found = paired.accuracy_difference([(a, b)], resamples=4000, seed=7)
    d = a.astype(float) - b.astype(float)
    half = 1.959964 * d.std(ddof=0) / math.sqrt(d.size)
    assert found.estimate == pytest.approx(d.mean())
    assert found.low == pytest.approx(d.mean() - half, abs=0.003)
    assert found.high == pytest.approx(d.mean() + half, abs=0.003)
    assert found.tie == (paired.mcnemar(a, b) > 0.05)


def test_strata_are_averaged_with_equal_weight():
    a1, b1 = np.ones(10, bool), np.zeros(10, bool)  # +1 on a task of 10 items
    a2 = b2 = np.ones(1000, bool)  # 0 on a task of 1000 items
    found = paired.accuracy_difference([(a1, b1), (a2, b2)])
    assert found.estimate == pytest.approx(0.5) and found.low == found.high == pytest.approx(0.5)


def test_the_seed_fixes_the_interval():
    a, b = correctness(200, 0.6, 8), correctness(200, 0.5, 9)
    first, again = paired.accuracy_difference([(a, b)], seed=3), paired.accuracy_difference([(a, b)], seed=3)
    assert first == again


def test_unpaired_inputs_are_refused():
    with pytest.raises(LayercutError, match="same items"):
        paired.accuracy_difference([(np.ones(3, bool), np.ones(4, bool))])
    with pytest.raises(LayercutError, match="same windows"):
        paired.log_perplexity_difference(np.ones(3), np.ones(2))
    with pytest.raises(LayercutError, match="at least one task"):
        paired.accuracy_difference([])


def record(nll: list[float] | None, bits: dict[str, str | None], source: str = "m") -> RunRecord:
    tasks = {task: TaskScore(acc=(value or "0").count("1") / max(len(value or "0"), 1), items=len(value or ""),
                             correct=value) for task, value in bits.items()}
    zero_shot = ZeroShot(tasks=tasks, average={"acc": 0.5, "acc_norm": 0.5}, average_tasks=list(tasks),
                         lm_eval_version="test", metric="acc")
    ppl = PerplexityRecord(before=10.0, after=math.exp(float(np.mean(nll))) if nll else 12.0, after_cut=20.0,
                           text="wiki", windows=len(nll or []) or 4, seq_len=8, window_nll_after=nll)
    return RunRecord.model_validate({"source": source, "metrics": {
        "perplexity": ppl.model_dump(), "zero_shot": {"before": zero_shot.model_dump(), "after": zero_shot.model_dump(),
                                                      "retention": {"metric": "acc", "tasks": {}, "average": {
                                                          "pruned": 0.5, "dense": 0.5, "chance": 0.5,
                                                          "retention": 1.0, "retention_above_chance": None}}}}})


def test_records_are_compared_item_by_item_and_unpaired_ones_say_so():
    a = record([2.0, 2.5, 3.0, 2.2], {"piqa": "1111100000", "boolq": "1010"})
    b = record([2.1, 2.6, 3.1, 2.3], {"piqa": "0000000000", "boolq": "1010"})
    rows = {row.measure: row for row in paired.compare_records(a, b)}
    ppl = rows["log perplexity (wiki)"]
    assert ppl.difference.estimate == pytest.approx(-0.1) and ppl.difference.verdict(False) == "better"
    assert rows["piqa acc"].difference.estimate == pytest.approx(0.5)
    assert rows["boolq acc"].difference.tie
    assert rows["commonsense average acc (2 tasks)"].difference.estimate == pytest.approx(0.25)
    old = record(None, {"piqa": None, "boolq": None})
    rows = {row.measure: row for row in paired.compare_records(a, old)}
    assert all(row.difference is None and row.reason.startswith("unpaired") for row in rows.values())
    other = {row.measure: row for row in paired.compare_records(a, record([2.0] * 4, {}, source="other"))}
    assert other["log perplexity (wiki)"].reason == "unpaired: other model or windows"


def test_the_paired_table_shows_intervals_verdicts_and_unpaired_reasons():
    from layercut.report import paired_table

    a = record([2.0, 2.5, 3.0, 2.2], {"piqa": "1111100000", "boolq": "1010"})
    b = record([2.1, 2.6, 3.1, 2.3], {"piqa": "0000000000", "boolq": None})
    table = paired_table("A", "B", paired.compare_records(a, b))
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert lines["log perplexity (wiki)"].endswith("| better |") and "perplexity ratio 0.905" in table
    assert "+0.500 [" in lines["piqa acc"] and lines["piqa acc"].endswith("| better |")
    assert "unpaired: no per-item results on both sides" in lines["boolq acc"]


def test_compare_pairs_every_method_with_the_first():
    from layercut.compare import pair_with_first
    from layercut.record import CompareRow
    from layercut.report import compare_table

    def row(method: str, nll: list[float] | None, bits: str | None) -> CompareRow:
        zero_shot = ZeroShot(tasks={"piqa": TaskScore(acc=0.5, items=8, correct=bits)}, average={"acc": 0.5,
                             "acc_norm": 0.5}, average_tasks=["piqa"], lm_eval_version="test", metric="acc")
        return CompareRow(method=method, segments=[(1, 3)], kl=0.1, search_seconds=1.0, perplexity_cut=20.0,
                          perplexity=10.0, heal="none", trainable_parameters=0, heal_seconds=0.0,
                          zero_shot=zero_shot, window_nll=nll)

    rows = [row("clp", [2.0, 2.1, 2.2, 2.3], "11110000"), row("tail", [2.0, 2.1, 2.2, 2.3], "11110000"),
            row("angular", [2.5, 2.6, 2.7, 2.9], "00000000"), row("old", None, None)]
    pair_with_first(rows)
    assert rows[0].log_perplexity_vs is None and rows[0].accuracy_vs is None
    same = rows[1].log_perplexity_vs
    assert (same.low, same.high, same.tie, same.reference) == (0.0, 0.0, True, "clp") and rows[1].accuracy_vs.tie
    assert not rows[2].log_perplexity_vs.tie and rows[2].accuracy_vs.estimate == pytest.approx(-0.5)
    assert rows[3].log_perplexity_vs is None and rows[3].accuracy_vs is None
    from layercut.record import CompareResult, DenseRow

    table = compare_table(CompareResult(model="m", remove=2, dense=DenseRow(perplexity=5.0, layers=6,
                                        zero_shot=rows[0].zero_shot), rows=rows, recipe={}, versions={}))
    assert "| angular |" in table and "worse (+0.525" in table and "worse (-0.500" in table
    assert table.count("unpaired") == 2


def test_agreement_is_compared_window_by_window_and_prompt_by_prompt():
    from layercut.report import paired_table

    def with_agreement(kl: list[float], top1: list[float], prefix: list[int] | None, source: str = "m"):
        texts = {"wiki": {"kl": sum(kl) / len(kl), "top1": sum(top1) / len(top1), "tokens": 64, "windows": len(kl),
                          "seq_len": 16, "window_kl": kl, "window_top1": top1}}
        generation = {"prompts": 3, "prompt_tokens": 8, "new_tokens": 8, "match_tokens": 4,
                      "mean_prefix": sum(prefix) / 3 if prefix else 2.0, "share_matching": 0.0, "prefix": prefix}
        return RunRecord.model_validate({"source": source, "metrics": {"agreement": {"texts": texts,
                                                                                     "generation": generation}}})

    a = with_agreement([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.9, 0.7], [8, 6, 7])
    b = with_agreement([0.3, 0.5, 0.4, 0.6], [0.9, 0.8, 0.9, 0.7], [2, 1, 3])
    rows = {row.measure: row for row in paired.compare_records(a, b)}
    kl = rows["KL to dense (wiki)"]
    assert kl.difference.estimate == pytest.approx(-0.2) and kl.difference.verdict(False) == "better"
    assert rows["top-1 agreement with dense (wiki)"].difference.estimate == 0
    assert rows["generation: matching prefix"].difference.estimate == pytest.approx(5.0)
    assert rows["generation: matching prefix"].difference.verdict() == "better"
    table = paired_table("A", "B", list(rows.values()))
    assert "perplexity ratio" not in table  # KL is not a log perplexity
    unpaired = {row.measure: row for row in paired.compare_records(a, with_agreement([0.1] * 4, [1.0] * 4, None))}
    assert unpaired["generation: matching prefix"].difference is None
    assert unpaired["generation: matching prefix"].reason.startswith("unpaired: no per-window or per-prompt")
    other = {row.measure: row for row in paired.compare_records(a, with_agreement([0.1] * 4, [1.0] * 4, [1, 1, 1],
                                                                                  source="x"))}
    assert other["KL to dense (wiki)"].reason == "unpaired: other model"


def test_mean_difference_is_the_log_perplexity_difference_of_nll():
    a, b = [2.0, 2.5, 3.0, 2.2, 1.0], [2.1, 2.4, 3.3, 2.0, 1.5]
    assert paired.mean_difference(a, b) == paired.log_perplexity_difference(a, b)
