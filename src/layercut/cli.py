"""The ``layercut`` command line; its options are generated from the typed recipe in :mod:`layercut.config`."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
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
    from layercut.pipeline import check_before_work, quantize_folder
    from layercut.quantize import SCHEMES
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
    check_before_work(str(source), recipe, arguments.output, arguments.overwrite, cuts=False)
    device = resolve_device(recipe.model.device)
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


def run_export(arguments: argparse.Namespace) -> int:
    from layercut.data import evaluation_windows, load_text
    from layercut.export import export
    from layercut.load import load_model
    from layercut.pipeline import check_before_work
    from layercut.record import read_record
    from layercut.report import gguf_rows, key_value_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    source = Path(arguments.model)
    record = read_record(source)  # a folder layercut wrote: its record and model card carry over
    check_before_work(str(source), recipe, arguments.output, arguments.overwrite, cuts=False)
    show = _stage_printer()
    show("load")
    handle = load_model(str(source), recipe.model)
    windows = evaluation_windows(handle.tokenizer, load_text(recipe.data.ppl, "test"), recipe.data.seq_len,
                                 recipe.export.gguf_windows)
    show(f"export ({recipe.export.format})")
    recipe_yaml = (source / "recipe.yaml").read_text() if (source / "recipe.yaml").is_file() else ""
    export(handle, record, recipe_yaml, arguments.output, arguments.overwrite, protected=[source],
           formats=recipe.export, test_windows=windows)
    print(key_value_table([*gguf_rows(record.gguf or []), ("output", str(arguments.output))]))
    return 0


def run_search(arguments: argparse.Namespace) -> int:
    from layercut import selection
    from layercut.data import calibrate
    from layercut.files import check_output, staged_folder
    from layercut.load import load_model
    from layercut.pipeline import check_before_work
    from layercut.report import search_charts, search_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    if arguments.plots:
        check_output(arguments.plots, arguments.overwrite, marker="search.json")
    check_before_work(arguments.model, recipe)
    show = _stage_printer()
    show("load")
    handle = load_model(arguments.model, recipe.model)
    windows = calibrate(handle.tokenizer, recipe.data, test=False)
    found = selection.search(handle, windows.calibration, recipe.search, recipe.data.batch_size, recipe.data.seed,
                             show(f"search ({recipe.search.method})", selection.search_steps(recipe.search)))
    if arguments.plots:
        with staged_folder(arguments.plots, arguments.overwrite, marker="search.json") as folder:
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
    from layercut.pipeline import check_before_work
    from layercut.report import eval_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    want_ppl = "data.ppl" in vars(arguments) or not (task_list(recipe.evaluation) or recipe.evaluation.speed)
    check_before_work(arguments.model, recipe, cuts=False)
    show = _stage_printer()
    reference, dense = None, None
    if recipe.evaluation.agreement:
        from layercut.pipeline import dense_model_outputs

        dense = arguments.dense or dense_source(arguments.model)
        show(f"dense outputs of {dense}")
        reference = dense_model_outputs(dense, recipe)
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
    if reference is not None:
        from layercut.evaluate import agreement

        show("agreement with the dense model")
        result.update(dense=dense, agreement=agreement(handle.model, reference, recipe.data.batch_size,
                                                       recipe.evaluation.generation_batch).model_dump())
    print(json.dumps(result) if arguments.json else eval_table(result))
    return 0


def dense_source(folder: str) -> str:
    """The dense model a pruned ``folder`` was cut from, as its layercut.json names it."""
    from layercut.record import RECORD_FILE, read_record

    if not (Path(folder) / RECORD_FILE).is_file():
        raise LayercutError(f"--agreement compares {folder} with its dense model, but {folder} has no {RECORD_FILE} "
                            "naming it; give the dense model with --dense MODEL")
    return read_record(folder).source


def run_compare(arguments: argparse.Namespace) -> int:
    from layercut.compare import compare
    from layercut.report import compare_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    methods = [m.strip() for m in arguments.methods.split(",") if m.strip()]
    result = compare(arguments.model, recipe, methods, arguments.output, arguments.overwrite, _stage_printer())
    print(compare_table(result))
    return 0


def run_sweep(arguments: argparse.Namespace) -> int:
    from layercut.pipeline import parse_sizes, sweep
    from layercut.report import sweep_table

    recipe = config.recipe_from_arguments(arguments, arguments.recipe)
    remove = parse_sizes(arguments.remove, int) if arguments.remove else []
    ratio = parse_sizes(arguments.ratio, float) if arguments.ratio else []
    result = sweep(arguments.model, recipe, remove, ratio, arguments.output, arguments.overwrite, _stage_printer())
    print(sweep_table(result))
    print(f"table, plot and JSON: {arguments.output}", file=sys.stderr)
    return 0


def run_report(arguments: argparse.Namespace) -> int:
    from layercut.files import check_writable, staged_file
    from layercut.record import read_record
    from layercut.report import records_chart, records_table

    records = [(Path(folder).name, read_record(folder)) for folder in arguments.folders]
    chart = Path(arguments.chart)
    if chart.exists() and (chart.is_dir() or not arguments.overwrite):
        raise LayercutError(f"{chart} already exists; choose another --chart path"
                            + ("" if chart.is_dir() else " or pass --overwrite"))
    check_writable(chart.parent)
    print(records_table(records))
    if len(records) > 1:
        from layercut.paired import compare_records
        from layercut.report import paired_table

        first_name, first = records[0]
        for name, record in records[1:]:  # each against the first, item by item where both kept the items
            print(paired_table(name, first_name, compare_records(record, first)))
    with staged_file(chart) as staging:
        records_chart(records, staging)
    print(f"chart: {chart}", file=sys.stderr)
    return 0


def model_help() -> str:
    from layercut.load import ALIASES

    return f"model folder, hub id, or a built-in alias: {', '.join(ALIASES)}"


def add_eval(command) -> None:
    """The ``eval`` command: one model's measures, or with --agreement a pruned one's against its dense model."""
    evaluate = command("eval", help="perplexity, zero-shot accuracy, speed, and agreement with the dense model")
    evaluate.add_argument("model", help=model_help())
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--recipe", help="YAML recipe; flags override it")
    evaluate.add_argument("--dense", help="with --agreement: the dense model to compare with (default: the source "
                                          "named in the pruned folder's layercut.json)")
    config.add_arguments(evaluate, ("model", "data", "evaluation"), exclude=("eval",))
    evaluate.set_defaults(run=run_eval)


def add_sweep(command) -> None:
    """The ``sweep`` command; its own --remove and --ratio take several sizes."""
    sweeping = command("sweep", help="how much can I cut? prune at several sizes; table and plot of perplexity, "
                                     "zero-shot accuracy, agreement with the dense model and speed-up")
    sweeping.add_argument("model", help=model_help())
    sweeping.add_argument("--remove", help="numbers of layers to remove: START:STOP (both ends included), "
                                           "START:STOP:STEP or a list, e.g. 2:10 or 2,4,8")
    sweeping.add_argument("--ratio", help="fractions of the layers to remove (rounded to whole layers): "
                                          "START:STOP:STEP (both ends included) or a list, e.g. 0.1:0.4:0.1")
    sweeping.add_argument("--output", required=True, help="folder for sweep.json, sweep.md and sweep.png")
    sweeping.add_argument("--overwrite", action="store_true", help="replace --output if it holds an earlier sweep")
    sweeping.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(sweeping, exclude=("segment", "remove", "ratio", "eval", "speed", "agreement", "quantize",
                                            "group_size", *config.ExportOptions.model_fields))
    sweeping.set_defaults(run=run_sweep)


def add_export_command(command) -> None:
    """The ``export`` command: an existing layercut output written again, with the GGUF files it asks for."""
    exporting = command("export", help="write a pruned checkpoint again, e.g. as GGUF for llama.cpp, checked "
                                       "against transformers")
    exporting.add_argument("model", help="checkpoint folder written by layercut prune")
    exporting.add_argument("--output", required=True, help="folder to write the checkpoint (and GGUF files) into")
    exporting.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    exporting.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(exporting, ("export", "model", "data"),
                         exclude=("device_map", "max_memory", "offload_folder", "calib", "calib_windows", "seed",
                                  "ppl_windows"))
    exporting.set_defaults(run=run_export)


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags: --segment must never be read as --segments.
    parser = argparse.ArgumentParser(prog="layercut", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    commands = parser.add_subparsers(dest="command", required=True)
    command = functools.partial(commands.add_parser, allow_abbrev=False)

    prune = command("prune", help="search, cut, heal and export a pruned checkpoint")
    prune.add_argument("model", help=model_help())
    prune.add_argument("--output", required=True, help="folder to write the pruned checkpoint into")
    prune.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    prune.add_argument("--recipe", help="YAML recipe with model/data/search/heal sections; flags override it")
    config.add_arguments(prune)
    prune.set_defaults(run=run_prune)

    add_export_command(command)

    search = command("search", help="find the segment(s) to cut; writes nothing unless asked")
    search.add_argument("model", help=model_help())
    search.add_argument("--json", action="store_true", help="print one JSON object")
    search.add_argument("--plots", help="folder to write search.json and the trajectory and landscape plots into")
    search.add_argument("--overwrite", action="store_true", help="replace --plots if it holds an earlier search")
    search.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(search, ("model", "data", "search"))
    search.set_defaults(run=run_search)

    add_eval(command)

    quantizing = command("quantize", help="quantize a checkpoint (e.g. a pruned one) and measure the cost")
    quantizing.add_argument("model", help="checkpoint folder (written by layercut prune or save_pretrained)")
    quantizing.add_argument("--output", required=True, help="folder to write the quantized checkpoint into")
    quantizing.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    quantizing.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                            help="measure perplexity (and --tasks, --speed) before and after (default: on)")
    quantizing.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(quantizing, ("quantization", "model", "data", "evaluation"),
                         exclude=("eval", "device_map", "trust_remote_code", "layers_path"))
    quantizing.set_defaults(run=run_quantize)

    comparison = command("compare", help="run several selection methods under one protocol")
    comparison.add_argument("model", help=model_help())
    comparison.add_argument("--methods", default=",".join(config.METHODS),
                            help=f"comma-separated methods (default: all of {', '.join(config.METHODS)})")
    comparison.add_argument("--output", required=True, help="folder for compare.json/.md/.png; reruns resume")
    comparison.add_argument("--overwrite", action="store_true",
                            help="replace the cells of --output when they were made with another model, data or "
                                 "recipe")
    comparison.add_argument("--recipe", help="YAML recipe; flags override it")
    config.add_arguments(comparison, exclude=("eval", "speed", "quantize", "group_size", "segment",
                                              *config.ExportOptions.model_fields))
    comparison.set_defaults(run=run_compare)

    add_sweep(command)

    reporting = command("report", help="compare exported checkpoints: table, paired tests, PNG chart")
    reporting.add_argument("folders", nargs="+", help="folders written by layercut prune")
    reporting.add_argument("--chart", default="layercut-report.png", help="PNG chart to write")
    reporting.add_argument("--overwrite", action="store_true", help="replace --chart if it exists")
    reporting.set_defaults(run=run_report)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that what it was writing is cleaned up on the way out."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (one line naming the fix), 130 SIGINT, 143 SIGTERM; a
    staging folder is removed on the way out, and nothing half-written is left at the output."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "lm_eval", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return arguments.run(arguments)
    except LayercutError as error:
        print(f"layercut: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layercut: interrupted (SIGINT); nothing half-written was left", file=sys.stderr)
        return 130
    except Terminated:
        print("layercut: terminated (SIGTERM); nothing half-written was left", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
