"""The ``layercut`` command line; its options are generated from the typed recipe in :mod:`layercut.config`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from layercut import config
from layercut.errors import LayercutError

logger = logging.getLogger("layercut")


def _stage_printer():
    """A ``progress(stage, total)`` callback: a timed line per stage, and a progress bar when ``total`` is given."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    bars = []

    def show(stage: str, total: int | None = None):
        while bars:
            bars.pop().close()
        print(f"[{time.perf_counter() - started:7.1f}s] {stage}", file=sys.stderr, flush=True)
        if total:
            bars.append(tqdm(total=total, desc=stage, file=sys.stderr, leave=False))
            return bars[-1].update
        return None

    return show


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'':{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:{width}} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_prune(arguments: argparse.Namespace) -> int:
    from layercut.export import metric_rows
    from layercut.pipeline import prune

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    record = prune(arguments.model, recipe, arguments.output, arguments.overwrite, progress=_stage_printer())
    ppl = record["metrics"]["perplexity"]
    rows = [
        ("removed segments", ", ".join(f"[{s}:{e})" for s, e in record["segments"])),
        ("layers", f"{record['num_layers_before']} -> {record['num_layers_after']}"),
        ("parameters", f"{record['parameters_before']:,} -> {record['parameters_after']:,}"),
        ("search", f"{record['method']} (KL {_number(record['search']['kl'])}, {record['search']['seconds']:.1f}s)"),
        ("heal", f"{record['heal']} ({record['healing'].get('trainable_parameters', 0):,} trainable parameters)"),
        ("perplexity after the cut, before repair", _number(ppl["after_cut"])),
        *((f"{name}: dense -> pruned", f"{_number(before)} -> {_number(after)}")
          for name, before, after in metric_rows(record)),
    ]
    if "quantization" in record:
        rows += _quantization_rows(record["quantization"], "pruned -> quantized")
    rows.append(("output", str(arguments.output)))
    print(_table(rows))
    return 0


def _quantization_rows(entry: dict, label: str) -> list[tuple[str, str]]:
    from layercut.quantize import quantization_rows

    return [("quantization", f"{entry['scheme']} ({entry['library']} {entry['library_version']})"),
            *((f"{name}: {label}", f"{_number(before)} -> {_number(after)}")
              for name, before, after in quantization_rows(entry))]


def run_quantize(arguments: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from layercut.load import resolve_device, resolve_dtype
    from layercut.pipeline import calibration, evaluation, perplexity_windows
    from layercut.quantize import SCHEMES, check_scheme, quantize_checkpoint

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    scheme = recipe.quantization.quantize
    if not scheme:
        raise LayercutError("say which scheme: --scheme with one of " + ", ".join(config.QUANT_SCHEMES))
    source = Path(arguments.model)
    if not (source / "config.json").is_file():
        raise LayercutError(f"{source} is not a checkpoint folder (no config.json); give a folder written by "
                            "layercut prune or save_pretrained")
    device = resolve_device(recipe.model.device)
    check_scheme(scheme, device)
    show = _stage_printer()
    tokenizer = AutoTokenizer.from_pretrained(source)
    windows = calibration(tokenizer, recipe) if SCHEMES[scheme].calibrated else None
    test_windows = perplexity_windows(tokenizer, recipe) if arguments.evaluate else None

    measured = evaluation(recipe, test_windows)

    def evaluate(model, tokenizer) -> dict:
        show("evaluate")
        return measured(model, tokenizer)

    show(f"quantize ({scheme})")
    output = quantize_checkpoint(source, scheme, arguments.output, windows, arguments.overwrite, device,
                                 resolve_dtype(recipe.model.dtype, device), evaluate if arguments.evaluate else None,
                                 group=recipe.quantization.group_size)
    entry = json.loads((output / "layercut.json").read_text())["quantization"]
    print(_table([*_quantization_rows(entry, "before -> after"), ("output", str(output))]))
    return 0


def run_search(arguments: argparse.Namespace) -> int:
    from layercut.load import load_model
    from layercut.pipeline import calibration, gate_steps, planned_removal, select_segments

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    show = _stage_printer()
    show("load")
    model, tokenizer = load_model(arguments.model, recipe.model)
    planned_removal(model, recipe)
    windows = calibration(tokenizer, recipe)
    found = select_segments(model, windows, recipe, show(f"search ({recipe.search.method})", gate_steps(recipe)))
    if arguments.plots:
        from layercut import plots

        folder = Path(arguments.plots)
        folder.mkdir(parents=True, exist_ok=True)
        plots.search_plots(found, folder)
        (folder / "search.json").write_text(json.dumps(_search_json(found, with_details=True), indent=2) + "\n")
    if arguments.json:
        print(json.dumps(_search_json(found)))
    else:
        print(_table([("method", found.method),
                      ("segments", ", ".join(f"[{s}:{e})" for s, e in found.segments)),
                      ("KL (nats/token)", _number(found.kl)), ("seconds", f"{found.seconds:.1f}"),
                      ("cuts scored exactly", str(found.evaluations))]))
    return 0


def _search_json(found, with_details: bool = False) -> dict:
    result = {"method": found.method, "segments": [list(s) for s in found.segments],
              "kl": None if math.isnan(found.kl) else found.kl, "seconds": found.seconds,
              "evaluations": found.evaluations}
    if with_details:
        result.update(trajectory=found.trajectory, landscape=found.landscape)
    return result


def run_eval(arguments: argparse.Namespace) -> int:
    from layercut.evaluate import perplexity
    from layercut.load import load_model
    from layercut.pipeline import perplexity_windows, task_list

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    given = vars(arguments)
    tasks = task_list(recipe)
    want_ppl = "data.ppl" in given or not (tasks or recipe.evaluation.speed)
    show = _stage_printer()
    show("load")
    model, tokenizer = load_model(arguments.model, recipe.model)
    result: dict = {"model": arguments.model}
    if want_ppl:
        windows = perplexity_windows(tokenizer, recipe)
        bar = show(f"perplexity ({recipe.data.ppl}, {windows.shape[0]} windows of {windows.shape[1]} tokens)",
                   windows.shape[0])
        result["perplexity"] = perplexity(model, windows, recipe.data.batch_size, bar)
    if tasks:
        from layercut.zeroshot import evaluate_zero_shot

        show("zero-shot tasks")
        result.update(evaluate_zero_shot(model, tokenizer, tasks, recipe.evaluation.limit, recipe.data.batch_size,
                                         recipe.data.seed))
    if recipe.evaluation.speed:
        from layercut.evaluate import throughput

        show("speed")
        result["speed"] = throughput(model)
    if arguments.json:
        print(json.dumps(result))
        return 0
    rows = []
    if "perplexity" in result:
        rows.append((f"perplexity ({recipe.data.ppl})", _number(result["perplexity"])))
    for task, values in result.get("tasks", {}).items():
        rows.append((f"{task} acc / acc_norm", f"{_number(values.get('acc'))} / {_number(values.get('acc_norm'))}"))
    for kind in ("prefill", "decode"):
        if "speed" in result:
            rows.append((f"{kind} tokens/s", _number(result["speed"][f"{kind}_tokens_per_s"])))
    if "average" in result:
        rows.append(("average acc / acc_norm",
                     f"{_number(result['average']['acc'])} / {_number(result['average']['acc_norm'])}"))
    print(_table(rows))
    return 0


def run_compare(arguments: argparse.Namespace) -> int:
    from layercut.compare import compare
    from layercut.pipeline import task_list

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    tasks = task_list(recipe) or None
    result = compare(arguments.model, recipe, methods, arguments.output, tasks, recipe.evaluation.limit,
                     progress=_stage_printer())
    from layercut.compare import markdown_table

    print(markdown_table(result))
    return 0


def run_report(arguments: argparse.Namespace) -> int:
    from layercut import report

    records = report.read_records(arguments.folders)
    chart = Path(arguments.chart)
    if chart.exists() and not arguments.overwrite:
        raise LayercutError(f"{chart} already exists; choose another --chart path or pass --overwrite")
    print(report.markdown(records))
    report.chart(records, chart)
    print(f"chart: {chart}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layercut", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser("prune", help="search, cut, heal and export a pruned checkpoint")
    prune.add_argument("model", help="model folder, hub id, or smollm2-135m")
    prune.add_argument("--output", required=True, help="folder to write the pruned checkpoint into")
    prune.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    prune.add_argument("--recipe", help="YAML recipe with model/data/search/heal sections; flags override it")
    config.add_arguments(prune)
    prune.set_defaults(run=run_prune)

    search = commands.add_parser("search", help="find the segment(s) to cut; writes nothing unless asked")
    search.add_argument("model", help="model folder, hub id, or smollm2-135m")
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.add_argument("--plots", help="folder to write the trajectory and landscape plots into")
    search.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(search, ("model", "data", "search"))
    search.set_defaults(run=run_search)

    evaluate = commands.add_parser("eval", help="perplexity and zero-shot accuracy of a model")
    evaluate.add_argument("model", help="model folder, hub id, or smollm2-135m")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(evaluate, ("model", "data", "evaluation"), exclude=("eval",))
    evaluate.set_defaults(run=run_eval)

    quantizing = commands.add_parser("quantize", help="quantize a checkpoint (e.g. a pruned one) and measure the cost")
    quantizing.add_argument("model", help="checkpoint folder (written by layercut prune or save_pretrained)")
    quantizing.add_argument("--output", required=True, help="folder to write the quantized checkpoint into")
    quantizing.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    quantizing.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                            help="measure perplexity (and --tasks, --speed) before and after (default: on)")
    quantizing.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(quantizing, ("quantization", "model", "data", "evaluation"),
                         exclude=("eval", "device_map", "trust_remote_code", "layers_path"))
    quantizing.set_defaults(run=run_quantize)

    comparison = commands.add_parser("compare", help="run several selection methods under one protocol")
    comparison.add_argument("model", help="model folder, hub id, or smollm2-135m")
    comparison.add_argument("--methods", default=",".join(config.METHODS),
                            help=f"comma-separated methods (default: all of {', '.join(config.METHODS)})")
    comparison.add_argument("--output", required=True, help="folder for compare.json/.md/.png; reruns resume")
    comparison.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(comparison, exclude=("eval", "speed", "quantize"))
    comparison.set_defaults(run=run_compare)

    reporting = commands.add_parser("report", help="compare exported checkpoints: markdown table and PNG chart")
    reporting.add_argument("folders", nargs="+", help="folders written by layercut prune")
    reporting.add_argument("--chart", default="layercut-report.png", help="PNG chart to write")
    reporting.add_argument("--overwrite", action="store_true", help="replace --chart if it exists")
    reporting.set_defaults(run=run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return arguments.run(arguments)
    except LayercutError as error:
        print(f"layercut: error: {error}", file=sys.stderr)
        return 2
