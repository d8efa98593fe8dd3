"""The repair-aware selection (``--method repair``): candidates, held-out windows, and a constructed case where the
cut of lowest KL is not the one that repairs best."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import build_tiny, random_ids
from layercut import config, forward, heal, repair, selection
from layercut.cli import build_parser
from layercut.config import EXACT_CACHE_GIB, REPAIR_CANDIDATES, REPAIR_FINALISTS, HealOptions, SearchOptions
from layercut.errors import LayercutError
from layercut.gate import candidate_key, cuts, exact_scorer, neighbours, parse_key
from layercut.layers import Handle, cut
from layercut.repair import candidate_cuts, endpoint_layers, extrapolated, finalists, split_windows


def test_candidates_are_the_lowest_kl_cuts_per_number_of_segments_plus_the_tail():
    kl = {((0, 2),): 0.5, ((1, 3),): 0.1, ((2, 4),): 0.3, ((3, 5),): 0.2, ((4, 6),): 0.9,
          ((0, 1), (3, 4)): 0.05, ((1, 2), (4, 5)): 0.4, ((0, 1), (2, 3)): 0.01}
    assert candidate_cuts(kl, 6, 2, 2) == [((1, 3),), ((3, 5),), ((0, 1), (2, 3)), ((0, 1), (3, 4)), ((4, 6),)]
    assert candidate_cuts({c: v for c, v in kl.items() if len(c) == 1}, 6, 2, 5)[-1] == ((4, 6),)  # already in
    # the default: every contiguous cut, and the lowest few of several segments
    many = {**kl, **{((0, 1), (k, k + 1)): 0.5 + k for k in range(4, 6)}}
    assert candidate_cuts(many, 6, 2, None) == [((1, 3),), ((3, 5),), ((2, 4),), ((0, 2),), ((4, 6),),
                                               ((0, 1), (2, 3)), ((0, 1), (3, 4)), ((1, 2), (4, 5)),
                                               ((0, 1), (4, 5))]


def test_the_finalists_are_the_lowest_screened_candidates_of_each_number_of_segments():
    screened = {((0, 2),): 0.4, ((1, 3),): 0.1, ((2, 4),): 0.3, ((4, 6),): 0.2}
    assert finalists(screened, 2) == [((1, 3),), ((4, 6),)]
    assert finalists(screened, 9) == [((1, 3),), ((4, 6),), ((2, 4),), ((0, 2),)]
    # two-segment cuts that lead the screen do not crowd out the best contiguous ones
    several = {**screened, ((0, 1), (3, 4)): 0.01, ((1, 2), (4, 5)): 0.02, ((0, 1), (4, 5)): 0.03}
    assert finalists(several, 2) == [((0, 1), (3, 4)), ((1, 2), (4, 5)), ((1, 3),), ((4, 6),)]


def test_extrapolation_follows_the_power_law_through_two_points():
    law = lambda steps: 3.0 * steps ** -0.25
    assert extrapolated((10, law(10)), (50, law(50)), 200) == pytest.approx(law(200))
    assert extrapolated((10, 2.0), (50, 1.0), 50) == 1.0  # not beyond the second point
    assert extrapolated((10, float("inf")), (50, 1.0), 200) == 1.0
    assert extrapolated((50, 2.0), (50, 1.0), 200) == 1.0
    # the cut that falls faster between the points is ahead at the horizon, though behind at the second point
    assert extrapolated((10, 1.9), (50, 1.25), 200) < extrapolated((10, 1.6), (50, 1.22), 200)


def test_endpoint_layers_are_the_kept_neighbours_of_each_segment():
    assert endpoint_layers(((2, 4),), 6) == [1, 4]
    assert endpoint_layers(((0, 2),), 6) == [2]
    assert endpoint_layers(((1, 2), (4, 6)), 6) == [0, 2, 3]


def test_the_scoring_windows_share_no_text_with_the_repair_windows():
    windows = random_ids(batch=8, length=20, seed=1)
    windows[6] = windows[1]  # a scoring window that repeats a repair window is dropped
    train, held = split_windows(windows)
    assert torch.equal(train, windows[:4]) and held.shape[0] == 3
    assert not any(torch.equal(row, windows[1]) for row in held)
    with pytest.raises(LayercutError, match="raise --calib-windows"):
        split_windows(windows[:2])


def linearly_repairable(scale: float = 20.0):
    """A tiny Llama where the cut of lowest KL is not the one that repairs best, by construction:

    * the block [2, 4) does nothing but add ``scale`` times the MLP output m of layer 1 (its layers' output
      projections are zeroed, so they are the identity, and a hook on layer 3 adds ``scale·m``, m being layer 1's
      output in the same pass, nothing when layer 1 did not run). Cutting it loses ``scale·m``: a large KL. But a
      linear patch folded into layer 1's MLP (m → (1 + scale)·m) repairs it exactly.
    * the layers 4 and 5 write a twentieth of what they did: cutting [4, 6) costs a small KL, but what is lost is
      not a map of any one layer's MLP output, and layer 3's MLP output, where a patch would fold, is zero: no patch
      repairs it.

    The hook adds nothing when layer 3 is skipped or replayed (its ``forward`` replaced, as the search does for a
    removed layer) or deleted (a real cut), so every cut is the same model whichever way it is computed. The output
    head is scaled up so that the KLs are far above float noise."""
    model = build_tiny("llama")
    handle = Handle.of(model)
    with torch.no_grad():
        for index in (2, 3):
            handle.layers[index].self_attn.o_proj.weight.zero_()
            handle.layers[index].mlp.down_proj.weight.zero_()
        for index in (4, 5):
            handle.layers[index].self_attn.o_proj.weight.mul_(0.05)
            handle.layers[index].mlp.down_proj.weight.mul_(0.05)
        model.lm_head.weight.mul_(50)
    seen = {}

    def keep(module, args, output):
        seen["m"] = output

    def add(module, args, output):
        m = seen.pop("m", None)
        if m is None or "forward" in module.__dict__:
            return None
        return (output[0] + scale * m, *output[1:]) if isinstance(output, tuple) else output + scale * m

    model.register_forward_pre_hook(lambda module, args: seen.clear())
    handle.layers[1].mlp.register_forward_hook(keep)
    handle.layers[3].register_forward_hook(add)
    return handle


def kl_to(dense_logits: torch.Tensor, model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(windows).logits
    p = torch.log_softmax(dense_logits.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(logits.double(), -1))).sum(-1).mean())


def test_repair_picks_the_cut_that_repairs_best_where_the_lowest_kl_cut_does_not():
    handle = linearly_repairable()
    windows = random_ids(batch=16, length=16, seed=3)
    train, held = split_windows(windows)
    with torch.no_grad():
        dense = {"all": handle.model(windows).logits, "held": handle.model(held).logits}
    plain, repaired = {}, {}
    for candidate in cuts(handle.num_layers, 2, 1):  # independently: cut a copy, patch it as --heal lsq would
        pruned = copy.deepcopy(handle)
        options = HealOptions(heal="lsq")
        try:
            prepared = heal.before_cut(pruned, list(candidate), heal.HealData(train), options)
        except LayercutError:  # [0, 2) has no layer before it: it stays unpatched
            prepared = None
        removed = cut(pruned, list(candidate))
        plain[candidate] = kl_to(dense["all"], pruned.model, windows)
        if prepared is not None:
            heal.heal(pruned, removed, prepared, options)
        repaired[candidate] = kl_to(dense["held"], pruned.model, held)
    lowest_kl, best_repaired = min(plain, key=plain.get), min(repaired, key=repaired.get)
    assert lowest_kl == ((4, 6),) and best_repaired == ((2, 4),)  # the construction holds
    assert repaired[best_repaired] < 1e-6 < plain[best_repaired]
    before = {name: p.detach().clone() for name, p in handle.model.named_parameters()}
    found = selection.search(handle, windows, SearchOptions(remove=2, method="repair", segments=1,
                                                            repair_proxy="lsq", repair_candidates=5))
    assert found.segments == [(2, 4)] and found.method == "repair"
    assert len(found.trajectory) == 5 and len(found.landscape) == 5
    scored = {row["cut"]: row["repaired_kl"] for row in found.trajectory}
    assert scored["2:4"] < 1e-4 < scored["4:6"]
    assert all(torch.equal(before[name], p) for name, p in handle.model.named_parameters())  # put back
    exhaustive = selection.search(handle, windows, SearchOptions(remove=2, method="exhaustive"))
    assert exhaustive.segments == [(4, 6)]  # the lowest KL on these windows, as computed independently


def test_a_patch_proxy_that_cannot_fold_into_the_model_is_refused_before_any_scoring():
    """Gemma-3 normalises its MLP's output before the residual add: no candidate could be patched, so the selection
    would rank plain KLs under the patch's name. It stops at once, naming the proxy that works."""
    handle = Handle.of(build_tiny("gemma3"))
    windows = random_ids(batch=8, length=12, seed=2)
    options = SearchOptions(remove=2, method="repair", segments=1, repair_proxy="lsq", repair_candidates=2)
    with pytest.raises(LayercutError, match="Gemma3DecoderLayer.*use --repair-proxy endpoints, not lsq"):
        selection.search(handle, windows, options)


def test_the_short_heal_proxy_screens_every_candidate_heals_the_best_again_and_puts_the_weights_back():
    handle = Handle.of(build_tiny("llama"))
    windows = random_ids(batch=8, length=12, seed=2)
    before = {name: p.detach().clone() for name, p in handle.model.named_parameters()}
    options = SearchOptions(remove=2, method="repair", segments=1, repair_screen_steps=2, repair_steps=3,
                            repair_candidates=3, repair_finalists=2)
    found = selection.search(handle, windows, options)
    lowest = sorted(found.landscape, key=found.landscape.get)[:3]
    assert [row["cut"] for row in found.trajectory] == lowest + ["4:6"] * ("4:6" not in lowest)
    screened = sorted(found.trajectory, key=lambda row: row["screened_kl"])
    assert all(row["repaired_kl"] is not None for row in screened[:2])  # the two finalists, healed again
    assert all(row["repaired_kl"] is None for row in screened[2:])
    for row in screened[:2]:  # each finalist's KL after the 200-step heal, on the law through its two points
        assert row["extrapolated_kl"] == extrapolated((2, row["screened_kl"]), (3, row["repaired_kl"]), 200)
    best = min(screened[:2], key=lambda row: row["extrapolated_kl"])
    assert found.segments == [tuple(int(i) for i in best["cut"].split(":"))]
    assert all(torch.equal(before[name], p) for name, p in handle.model.named_parameters())
    assert not any(p.requires_grad for p in handle.model.parameters())
    # a finalist's longer heal starts again from the dense weights: its score is the one a lone 3-step heal gives
    again = repair.repaired_kls(handle, repair.repair_data(handle, windows, 4), [tuple(found.segments)], options)
    assert again[tuple(found.segments)] == pytest.approx(best["repaired_kl"], rel=1e-5)


def test_several_segments_take_their_candidates_from_the_gate_not_from_every_cut():
    handle = Handle.of(build_tiny("llama", layers=10))
    windows = random_ids(batch=8, length=12, seed=4)
    options = SearchOptions(remove=4, method="repair", segments=2, repair_steps=2, repair_candidates=2)
    gate = selection.search(handle, windows, options.replace(method="clp"), seed=0)
    found = selection.search(handle, windows, options, seed=0)
    contiguous = selection.search(handle, windows, options.replace(method="exhaustive", segments=1))
    read = {**contiguous.landscape, **gate.landscape}  # every contiguous cut and the gate's read-outs, the same KL
    assert all(found.landscape[key] == value for key, value in read.items())
    # widened by the beam: every neighbour of the two lowest two-segment cuts is scored, and nothing else is added
    two = sorted((k for k in found.landscape if len(k.split()) == 2), key=found.landscape.get)[:2]
    near = {k: {candidate_key(n) for n in neighbours(parse_key(k), handle.num_layers)} for k in found.landscape}
    assert set().union(*(near[k] for k in two)) <= set(found.landscape)
    assert set(found.landscape) - set(read) <= set().union(*(near[k] for k in found.landscape if len(k.split()) == 2))
    assert len(found.landscape) < len(cuts(handle.num_layers, 4, 2))  # not every two-segment cut
    assert any(len(key.split()) == 2 for key in found.landscape)
    per_count = {1: [], 2: []}
    for row in found.trajectory:
        per_count[len(row["cut"].split())].append(row["cut"])
    lowest = {n: sorted((k for k in found.landscape if len(k.split()) == n), key=found.landscape.get)[:2]
              for n in (1, 2)}
    assert per_count[2] == lowest[2] and per_count[1][:2] == lowest[1]


class _Counting:
    """An exact scorer that records the cuts scored on all its windows (the screen's partial passes apart)."""

    def __init__(self, scorer):
        self.scorer, self.full = scorer, []

    def __call__(self, candidates, windows=None):
        self.full.extend(candidates if windows is None else [])
        return self.scorer(candidates, windows)

    def __getattr__(self, name):
        return getattr(self.scorer, name)


def test_with_several_segments_no_cut_is_scored_twice_on_all_windows():
    """The gate's search scores every contiguous cut (its search for one segment fewer); the selection takes those
    values instead of scoring the cuts a second time, and the count of cuts scored says so."""
    handle = Handle.of(build_tiny("llama", layers=10))
    windows = random_ids(batch=8, length=12, seed=4)
    options = SearchOptions(remove=4, method="repair", segments=2, repair_candidates=2)
    scorer = _Counting(exact_scorer(handle, windows, options))
    kl, scored = repair.scored_cuts(handle, windows, 4, options, 4, 0, scorer=scorer)
    assert len(scorer.full) == len(set(scorer.full)) == len(kl) == scored
    assert set(cuts(handle.num_layers, 4, 1)) <= set(kl)


def test_a_shared_exact_scorer_gives_the_same_selection():
    """``layercut sweep`` hands the search one exact scorer for all sizes; the repair method takes it and, with
    several segments, its gate uses the same one."""
    handle = Handle.of(build_tiny("llama", layers=8))
    windows = random_ids(batch=8, length=12, seed=5)
    options = SearchOptions(remove=2, method="repair", segments=2, repair_screen_steps=1, repair_steps=2,
                            repair_candidates=1, repair_finalists=2)
    alone = selection.search(handle, windows, options, seed=0)
    shared = selection.search(handle, windows, options, seed=0, scorer=exact_scorer(handle, windows, options))
    assert shared.segments == alone.segments and shared.landscape == alone.landscape
    assert shared.trajectory == alone.trajectory


def test_the_default_is_the_repair_method_with_one_segment_and_its_defaults_follow_the_segments():
    """``layercut prune`` with no ``--method`` is the repair method with one segment, 4 candidates and a lone
    finalist; ``--segments 2`` screens every contiguous cut and the 4 best of two segments and heals 3 finalists of
    each; given values stay, and a copy with another number of segments gets that number's defaults."""
    default = SearchOptions(remove=6)
    assert (default.method, default.segments) == ("repair", 1)
    assert (default.repair_candidates, default.repair_finalists) == (REPAIR_CANDIDATES, 1)
    several = SearchOptions(remove=6, segments=2)
    assert (several.repair_candidates, several.repair_finalists) == (None, REPAIR_FINALISTS["several"])
    assert default.replace(segments=2).repair_finalists == 3 and several.replace(segments=1).repair_finalists == 1
    given = SearchOptions(remove=6, repair_candidates=2, repair_finalists=2)
    assert (given.repair_candidates, given.repair_finalists) == (2, 2)
    assert given.replace(segments=2).repair_finalists == 2
    assert SearchOptions(ratio=0.3).segments == 1 and SearchOptions(segment=("2:4",)).segments == 1


def test_the_default_search_is_lean_and_the_other_searches_are_not_unless_told():
    """The repair method with one segment checkpoints its short heals and keeps a smaller exact cache (its peak at the
    8B shape: 1.19x the weights against 1.47x); CLP's gate, the exhaustive search and the repair method with several
    segments keep their settings; a given value stays, through copies with another method too."""
    lean = (True, EXACT_CACHE_GIB["lean"])
    plain = (False, EXACT_CACHE_GIB["other"])
    settings = lambda options: (options.gate_checkpointing, options.exact_cache_gib)
    assert settings(SearchOptions(remove=6)) == lean
    assert settings(SearchOptions(remove=6, method="clp")) == plain
    assert settings(SearchOptions(remove=6, method="exhaustive")) == plain
    assert settings(SearchOptions(remove=6, segments=2)) == plain
    assert settings(SearchOptions(remove=6).replace(method="clp")) == plain
    assert settings(SearchOptions(remove=6, method="clp").replace(method="repair")) == lean
    assert settings(SearchOptions(remove=6, gate_checkpointing=None, exact_cache_gib=None)) == lean  # YAML's null
    given = SearchOptions(remove=6, gate_checkpointing=False, exact_cache_gib=8.0)
    assert settings(given) == (False, 8.0) and settings(given.replace(method="clp", segments=2)) == (False, 8.0)
    # `layercut prune ... --no-gate-checkpointing` turns the default off and keeps the rest of it
    arguments = build_parser().parse_args(["prune", "m", "--output", "o", "--remove", "6", "--no-gate-checkpointing"])
    recipe = config.recipe_from_arguments(arguments, None)
    assert settings(recipe.search) == (False, EXACT_CACHE_GIB["lean"])


def test_a_saved_recipe_reused_with_another_method_segments_or_heal_gets_their_defaults(tmp_path):
    """recipe.yaml leaves out the defaults that follow other options (naming this run's in a comment), so a
    default prune's recipe reused with ``--segments 2``, ``--method clp`` or more heal steps gets the same options
    as a fresh run with those flags; a value that was given is written and stays."""
    default = config.Recipe(search=SearchOptions(remove=6))
    text = config.dump_recipe(default)
    assert "# Defaults that follow" in text and "search.repair_finalists: 1" in text
    saved = tmp_path / "recipe.yaml"
    saved.write_text(text)
    assert config.load_recipe(saved) == default
    followed = set()
    for changes in ({"search": {"segments": 2}}, {"search": {"method": "clp"}}, {"heal": {"heal_steps": 400}}):
        fresh = config.from_dict(changes, default)
        assert config.from_dict(changes, config.load_recipe(saved)) == fresh, changes
        before, after = config.to_dict(default), config.to_dict(fresh)
        followed |= {(section, name) for section in before for name in before[section]
                     if before[section][name] != after[section][name] and name not in changes.get(section, {})}
    # the options left out are exactly those whose defaults moved with another option
    assert followed == {(section, name) for section, names in config.DEPENDENT_DEFAULTS.items() for name in names}
    given = config.Recipe(search=SearchOptions(remove=6, repair_finalists=2, gate_checkpointing=False))
    saved.write_text(config.dump_recipe(given))
    reused = config.from_dict({"search": {"segments": 2}}, config.load_recipe(saved)).search
    assert (reused.repair_finalists, reused.gate_checkpointing) == (2, False)
    assert "repair_finalists: 2" in saved.read_text().split("\nmodel:")[1]


def test_a_ratio_of_one_layer_searches_one_layer_under_the_default():
    handle = Handle.of(build_tiny("llama"))
    windows = random_ids(batch=8, length=12, seed=3)
    options = SearchOptions(ratio=0.17, repair_screen_steps=1, repair_steps=2)
    found = selection.search(handle, windows, options)
    assert found.method == "repair" and len(found.segments) == 1
    assert found.segments[0][1] - found.segments[0][0] == 1
    with pytest.raises(LayercutError, match="cannot split 1 removed layers into 2 segments"):
        selection.search(handle, windows, options.replace(segments=2))


def test_with_one_segment_and_k_candidates_only_those_are_scored_on_every_window():
    """Every contiguous cut is ranked on the first --gate-screen windows; only the K lowest and the tail are scored
    on all, with the KL any other method reports for them."""
    handle = Handle.of(build_tiny("llama", layers=8))
    windows = random_ids(batch=8, length=12, seed=6)
    options = SearchOptions(remove=2, method="repair", segments=1, repair_candidates=2, gate_screen=2)
    scorer = _Counting(exact_scorer(handle, windows, options))
    kl, scored = repair.scored_cuts(handle, windows, 2, options, 4, 0, scorer=scorer)
    every = cuts(handle.num_layers, 2, 1)
    rough = dict(zip(every, exact_scorer(handle, windows, options)(every, 2)))
    lowest = sorted(every, key=rough.get)[:2]
    assert scorer.full == lowest + [((6, 8),)] * (((6, 8),) not in lowest) == list(kl)
    assert scored == len(every) + len(kl)
    exhaustive = selection.search(handle, windows, SearchOptions(remove=2, method="exhaustive"))
    assert all(exhaustive.landscape[candidate_key(c)] == value for c, value in kl.items())
    whole = _Counting(exact_scorer(handle, windows, options))
    assert list(repair.scored_cuts(handle, windows, 2, options.replace(gate_screen=0), 4, 0, scorer=whole)[0]) == every
    assert whole.full == every


def test_a_lone_finalist_wins_without_a_longer_heal(monkeypatch):
    handle = Handle.of(build_tiny("llama"))
    windows = random_ids(batch=8, length=12, seed=2)
    heals = []
    short_heal = repair.short_heal
    monkeypatch.setattr(repair, "short_heal", lambda *args: heals.append(args[4]) or short_heal(*args))
    options = SearchOptions(remove=2, method="repair", segments=1, repair_screen_steps=2, repair_steps=3,
                            repair_candidates=3, repair_finalists=1)
    found = selection.search(handle, windows, options)
    assert heals == [2] * len(found.trajectory)  # the screens only
    assert all(row["repaired_kl"] is None and row["extrapolated_kl"] is None for row in found.trajectory)
    best = min(found.trajectory, key=lambda row: row["screened_kl"])
    assert [candidate_key(tuple(found.segments))] == [best["cut"]]


def test_the_default_search_reports_one_unit_of_progress_per_short_heal():
    """A progress bar's total: the gate's steps for clp; for the default, its candidates and the tail at most,
    each screen one unit; unknown before the search with several segments."""
    handle = Handle.of(build_tiny("llama", layers=8))
    windows = random_ids(batch=8, length=12, seed=6)
    options = SearchOptions(remove=2, repair_screen_steps=1)
    done = []
    found = selection.search(handle, windows, options, progress=done.append)
    assert selection.search_steps(options) == REPAIR_CANDIDATES + 1
    assert sum(done) == len(found.trajectory) <= selection.search_steps(options)
    assert selection.search_steps(options.replace(repair_finalists=2)) == REPAIR_CANDIDATES + 3
    assert selection.search_steps(options.replace(method="clp")) == 5  # the gate's steps for one segment
    assert selection.search_steps(options.replace(segments=2)) is None
    assert selection.search_steps(options.replace(method="exhaustive")) is None


def test_lean_short_heals_score_the_candidates_as_the_full_ones_do():
    """--gate-checkpointing: the short heals recompute each layer in backward and run the head and KL over chunks of
    positions; the screened KLs are the same up to the order of the sums, the pick is the same, and every weight is
    put back from its host copy."""
    handle = Handle.of(build_tiny("llama", layers=8))
    windows = random_ids(batch=8, length=12, seed=6)
    before = {name: value.clone() for name, value in handle.model.state_dict().items()}
    options = SearchOptions(remove=2, repair_screen_steps=3, repair_finalists=2, repair_steps=4)
    full = selection.search(handle, windows, options)
    lean = selection.search(handle, windows, options.replace(gate_checkpointing=True))
    assert lean.segments == full.segments and len(lean.trajectory) == len(full.trajectory)
    for row, other in zip(lean.trajectory, full.trajectory):
        assert row["cut"] == other["cut"] and row["screened_kl"] == pytest.approx(other["screened_kl"], rel=1e-5)
    assert all(torch.equal(value, before[name]) for name, value in handle.model.state_dict().items())
    # no candidate's gradients outlive its short heal (at 8B each endpoint layer's are 0.44 GB), and the lean heals
    # leave no hook on the input embeddings that would make a later backward run down to them
    assert all(p.grad is None and not p.requires_grad for p in handle.model.parameters())
    assert not handle.model.get_input_embeddings()._forward_hooks


def test_the_top_k_kl_over_chunks_equals_the_whole_one_with_its_gradient():
    model = build_tiny("llama")
    ids = random_ids(batch=3, length=10, seed=4)
    teacher = heal.teacher_targets(model, random_ids(batch=3, length=10, seed=5), 8, 4)
    hidden = forward.final_hidden(model, ids).detach().requires_grad_(True)
    whole = heal.top_k_kl(forward.head_logits(model, hidden), teacher.log_probs, teacher.indices)
    (expected,) = torch.autograd.grad(whole, hidden)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunked = heal.chunked_top_k_kl(model, hidden, teacher.log_probs, teacher.indices, budget=3 * 4 * vocab)
    (found,) = torch.autograd.grad(chunked, hidden)  # three chunks of 4 positions (the last of 2)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(found, expected, rtol=1e-5, atol=1e-8)
