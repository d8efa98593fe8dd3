"""The ``layercut`` command line; its options are generated from the typed recipe in :mod:`layercut.config`."""

from __future__ import annotations

import argparse
import json
import logging
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


def run_prune(arguments: argparse.Namespace) -> int:
    from layercut.pipeline import prune
    from layercut.report import summary

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    record = prune(arguments.model, recipe, arguments.output, arguments.overwrite, progress=_stage_printer())
    print(summary(record, arguments.output))
    return 0


def run_quantize(arguments: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from layercut.data import calibrate
    from layercut.load import resolve_device, resolve_dtype
    from layercut.pipeline import quantize_folder
    from layercut.quantize import SCHEMES, check_scheme
    from layercut.record import read_record
    from layercut.report import key_value_table, quantization_summary_rows

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
    windows = calibrate(tokenizer, recipe.data, test=arguments.evaluate) if SCHEMES[scheme].calibrated or \
        arguments.evaluate else None
    show(f"quantize ({scheme})")
    output = quantize_folder(source, arguments.output, recipe, windows, device,
                             resolve_dtype(recipe.model.dtype, device), arguments.overwrite,
                             evaluate_after=arguments.evaluate)
    entry = read_record(output).quantization
    print(key_value_table([*quantization_summary_rows(entry, "before -> after"), ("output", str(output))]))
    return 0


def run_search(arguments: argparse.Namespace) -> int:
    from layercut import selection
    from layercut.data import calibrate
    from layercut.load import load_model
    from layercut.report import search_charts, search_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    show = _stage_printer()
    show("load")
    handle = load_model(arguments.model, recipe.model)
    selection.plan(recipe.search, handle.num_layers)
    windows = calibrate(handle.tokenizer, recipe.data, test=False)
    found = selection.search(handle, windows.calibration, recipe.search, recipe.data.batch_size, recipe.data.seed,
                             show(f"search ({recipe.search.method})", selection.gate_steps(recipe.search)))
    if arguments.plots:
        folder = Path(arguments.plots)
        folder.mkdir(parents=True, exist_ok=True)
        search_charts(found, folder)
        (folder / "search.json").write_text(json.dumps(found.summary(with_details=True), indent=2) + "\n")
    if arguments.json:
        print(json.dumps(found.summary()))
    else:
        print(search_table(found))
    return 0


def run_eval(arguments: argparse.Namespace) -> int:
    from layercut.evaluate import evaluate, task_list
    from layercut.load import load_model
    from layercut.report import eval_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    want_ppl = "data.ppl" in vars(arguments) or not (task_list(recipe.evaluation) or recipe.evaluation.speed)
    show = _stage_printer()
    show("load")
    handle = load_model(arguments.model, recipe.model)
    windows = None
    if want_ppl:
        from layercut.data import evaluation_windows, load_text

        windows = evaluation_windows(handle.tokenizer, load_text(recipe.data.ppl, "test"), recipe.data.seq_len,
                                     recipe.data.ppl_windows or None)
    bar = show(f"evaluate ({recipe.data.ppl}, {windows.shape[0]} windows of {windows.shape[1]} tokens)"
               if windows is not None else "evaluate", None if windows is None else windows.shape[0])
    measured = evaluate(handle.model, handle.tokenizer, windows, recipe.evaluation, recipe.data.batch_size,
                        recipe.data.seed, bar)
    result: dict = {"model": arguments.model}
    if measured.perplexity is not None:
        result.update(perplexity=measured.perplexity, text=recipe.data.ppl)
    if measured.zero_shot is not None:
        result.update(measured.zero_shot.model_dump())
    if measured.speed is not None:
        result["speed"] = measured.speed.model_dump()
    print(json.dumps(result) if arguments.json else eval_table(result))
    return 0


def run_compare(arguments: argparse.Namespace) -> int:
    from layercut.compare import compare
    from layercut.report import compare_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    print(compare_table(compare(arguments.model, recipe, methods, arguments.output, progress=_stage_printer())))
    return 0


def run_report(arguments: argparse.Namespace) -> int:
    from layercut.record import read_record
    from layercut.report import records_chart, records_table

    records = [(Path(folder).name, read_record(folder)) for folder in arguments.folders]
    chart = Path(arguments.chart)
    if chart.exists() and not arguments.overwrite:
        raise LayercutError(f"{chart} already exists; choose another --chart path or pass --overwrite")
    print(records_table(records))
    records_chart(records, chart)
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
