"""How layercut shows its results: numbers and segments as text, tables, the model card, and the PNG charts.

Everything here reads the typed records of :mod:`layercut.record`; nothing computes a metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from math import nan
from pathlib import Path
from typing import TYPE_CHECKING

from layercut.record import Agreement, CompareResult, GgufExport, Paired, Quantization, RunRecord, SweepResult

if TYPE_CHECKING:
    from layercut.gate import SearchResult
    from layercut.paired import Difference, PairedRow

Row = tuple[str, "float | int | None", "float | int | None"]


# ----------------------------------------------------------------------------------------------- text


def number(value, spec: str = ".4g") -> str:
    """A number as text with format ``spec``; ``-`` for None or NaN; integers and strings as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def segments_text(segments: Sequence[Sequence[int]], separator: str = ", ") -> str:
    """``[(12, 18)] -> "[12:18)"``: 0-based, end exclusive, the way layercut prints segments."""
    return separator.join(f"[{start}:{end})" for start, end in segments)


def key_value_table(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column markdown table of (name, value) rows, both columns padded so that every line has the same
    length and the same column borders."""
    width = max(len(name) for name, _ in rows)
    value_width = max(len("value"), *(len(value) for _, value in rows))
    lines = [f"| {'':{width}} | {'value':{value_width}} |", f"|{'-' * (width + 2)}|{'-' * (value_width + 2)}|"]
    lines += [f"| {name:{width}} | {value:{value_width}} |" for name, value in rows]
    return "\n".join(lines)


def metric_rows(record: RunRecord) -> list[Row]:
    """``(name, dense, pruned)`` rows of a record's metrics: perplexity, zero-shot accuracy, speed."""
    metrics, rows = record.metrics, []
    if metrics.perplexity is not None:
        ppl = metrics.perplexity
        rows.append((f"perplexity ({ppl.text or '?'}, {ppl.windows or '?'} x {ppl.seq_len or '?'} tokens)",
                     ppl.before, ppl.after))
    if metrics.zero_shot is not None:
        before, after = metrics.zero_shot.before, metrics.zero_shot.after
        rows += [(f"{task} acc", score.acc, after.tasks[task].acc) for task, score in before.tasks.items()]
        rows.append(("zero-shot average acc", before.average.acc, after.average.acc))
    if metrics.speed is not None:
        speed = metrics.speed
        rows.append(("prefill tokens/s", speed.before.prefill_tokens_per_s, speed.after.prefill_tokens_per_s))
        rows.append(("decode tokens/s", speed.before.decode_tokens_per_s, speed.after.decode_tokens_per_s))
    if metrics.agreement is not None:
        rows += agreement_rows(metrics.agreement)
    return rows


def agreement_rows(agreement: Agreement) -> list[Row]:
    """``(name, dense, pruned)`` rows of the agreement with the dense model (the dense model agrees with itself:
    KL 0, top-1 1, the whole continuation)."""
    rows: list[Row] = []
    for text, found in agreement.texts.items():
        rows.append((f"KL(dense || pruned) per token ({text}, {found.windows} x {found.seq_len} tokens)", 0.0,
                     found.kl))
        rows.append((f"top-1 agreement with dense ({text})", 1.0, found.top1))
    generation = agreement.generation
    if generation is not None:
        name = f"generation: mean matching prefix ({generation.prompts} prompts, of {generation.new_tokens} tokens)"
        rows.append((name, float(generation.new_tokens), generation.mean_prefix))
        rows.append((f"generation: share with first {generation.match_tokens} tokens matching", 1.0,
                     generation.share_matching))
    return rows


def quantization_rows(entry: Quantization) -> list[Row]:
    """``(name, before, after)`` rows of a quantization entry: sizes in MiB, then what was evaluated."""
    before, after = entry.before, entry.after
    rows: list[Row] = [("weights on disk (MiB)", entry.size_before_bytes / 2**20, entry.size_after_bytes / 2**20)]
    for key, name in (("memory_footprint_bytes", "parameters in memory (MiB)"),
                      ("peak_gpu_bytes", "peak GPU memory (MiB)")):
        if getattr(after, key) is not None:
            earlier = getattr(before, key)
            rows.append((name, None if earlier is None else earlier / 2**20, getattr(after, key) / 2**20))
    if after.perplexity is not None:
        rows.append(("perplexity", before.perplexity, after.perplexity))
    if after.zero_shot is not None:
        rows.append(("zero-shot average acc", before.zero_shot.average.acc if before.zero_shot else None,
                     after.zero_shot.average.acc))
    return rows


def summary(record: RunRecord, output: str | Path) -> str:
    """The table ``layercut prune`` prints: what was cut, how, and the metrics dense -> pruned."""
    rows = [
        ("removed segments", segments_text(record.segments or [])),
        ("layers", f"{record.num_layers_before} -> {record.num_layers_after}"),
        ("parameters", f"{record.parameters_before:,} -> {record.parameters_after:,}"),
        ("search", f"{record.method} (KL {number(record.search.kl)}, {record.search.seconds:.1f}s)"),
        ("heal", f"{record.heal} ({record.healing.trainable_parameters:,} trainable parameters)"),
        ("perplexity after the cut, before repair", number(record.metrics.perplexity.after_cut)),
        *((f"{name}: dense -> pruned", f"{number(before)} -> {number(after)}")
          for name, before, after in metric_rows(record)),
    ]
    if record.quantization is not None:
        rows += quantization_summary_rows(record.quantization, "pruned -> quantized")
    rows += gguf_rows(record.gguf or [])
    rows.append(("output", str(output)))
    return key_value_table(rows)


def quantization_summary_rows(entry: Quantization, label: str) -> list[tuple[str, str]]:
    """Rows for :func:`key_value_table`: the scheme and library, then each measure ``label``-ed before -> after."""
    return [("quantization", f"{entry.scheme} ({entry.library} {entry.library_version})"),
            *((f"{name}: {label}", f"{number(before)} -> {number(after)}")
              for name, before, after in quantization_rows(entry))]


def gguf_rows(entries: Sequence[GgufExport]) -> list[tuple[str, str]]:
    """Rows for :func:`key_value_table`: each GGUF file with its perplexity in transformers -> llama.cpp."""
    return [(f"GGUF {e.file} ({e.size_bytes / 2**20:.0f} MiB): ppl transformers -> llama.cpp",
             (f"{number(e.parity.perplexity_transformers)} -> {number(e.parity.perplexity_llama_cpp)} "
              f"(top-1 {e.parity.top1_agreement:.1%}, KL {e.parity.mean_kl:.2g})")) for e in entries]


def search_table(found: SearchResult) -> str:
    """The table ``layercut search`` prints."""
    return key_value_table([("method", found.method), ("segments", segments_text(found.segments)),
                            ("KL (nats/token)", number(found.kl)), ("seconds", f"{found.seconds:.1f}"),
                            ("cuts scored exactly", str(found.evaluations))])


def eval_table(result: dict) -> str:
    """The table ``layercut eval`` prints from its JSON result."""
    rows = []
    if "perplexity" in result:
        rows.append((f"perplexity ({result['text']})", number(result["perplexity"])))
    for task, values in result.get("tasks", {}).items():
        rows.append((f"{task} acc / acc_norm", f"{number(values.get('acc'))} / {number(values.get('acc_norm'))}"))
    if "speed" in result:
        for kind in ("prefill", "decode"):
            rows.append((f"{kind} tokens/s", number(result["speed"][f"{kind}_tokens_per_s"])))
    if "average" in result:
        rows.append(("average acc / acc_norm",
                     f"{number(result['average']['acc'])} / {number(result['average']['acc_norm'])}"))
    if "agreement" in result:
        agreed = Agreement.model_validate(result["agreement"])
        rows += [(f"{name} (against {result['dense']})", number(pruned))
                 for name, _, pruned in agreement_rows(agreed)]
    return key_value_table(rows)


# ----------------------------------------------------------------------------------------------- model card


def model_card(record: RunRecord, recipe_yaml: str, name: str = "pruned model") -> str:
    """A README.md for the pruned checkpoint that states what was removed and embeds the exact recipe."""
    rows = "\n".join(f"| {metric} | {number(before)} | {number(after)} |" for metric, before, after in
                     metric_rows(record))
    table = f"| metric | dense | pruned |\n|---|---|---|\n{rows}\n" if rows else "No metrics were recorded.\n"
    return f"""---
library_name: transformers
tags:
- layercut
- pruned
---
# {name}

Pruned with layercut from `{record.source}`: decoder layers {segments_text(record.segments or [])}
(0-based, end exclusive) were removed, leaving {record.num_layers_after} of {record.num_layers_before} layers
({record.parameters_after:,} of {record.parameters_before:,} parameters). Selection: `{record.method}`;
heal: `{record.heal}`.

It is a standard checkpoint: `AutoModelForCausalLM.from_pretrained(path)` loads it without layercut.

## Metrics

{table}
## Recipe

```yaml
{recipe_yaml}```

Full record: `layercut.json`. Library versions: {', '.join(f'{k} {v}' for k, v in record.versions.items())}.
""" + (gguf_card(record.gguf) if record.gguf else "")


def gguf_card(entries: Sequence[GgufExport]) -> str:
    """The model-card section on the GGUF files: how they were made, how to run them, and their parity with
    transformers on held-out windows."""
    rows = "".join(
        f"| `{e.file}` | {e.size_bytes / 2**20:.1f} | {e.parity.perplexity_transformers:.4g} | "
        f"{e.parity.perplexity_llama_cpp:.4g} | {e.parity.perplexity_change:+.2%} | {e.parity.top1_agreement:.1%} | "
        f"{e.parity.mean_kl:.3g} | {e.layer_pattern} |\n" for e in entries)
    first = entries[0]
    warnings = "".join(f"\n> {warning}\n" for e in entries for warning in dict.fromkeys(e.warnings))
    return (f"\n## GGUF (llama.cpp, Ollama)\n\nConverted by llama.cpp's own `convert_hf_to_gguf.py` and quantized by "
            f"its quantizer ({first.llama_cpp}); llama.cpp loads it as `{first.model_description}`. Each file was "
            f"loaded in llama.cpp and compared with this transformers checkpoint on {first.parity.windows} held-out "
            f"windows of {first.parity.seq_len} tokens:\n\n"
            "| file | MiB | ppl transformers | ppl llama.cpp | change | top-1 agreement | mean KL | layer pattern |\n"
            f"|---|---|---|---|---|---|---|---|\n{rows}{warnings}\n"
            f"Run: `llama-cli -m {first.file}`; Ollama: a `Modelfile` with `FROM ./{first.file}`, then "
            "`ollama create NAME -f Modelfile`.\n")


def quantization_card(entry: Quantization) -> str:
    """The model-card section that says how the weights were quantized, what it cost, and which package loads them."""
    table = "".join(f"| {name} | {number(before)} | {number(after)} |\n"
                    for name, before, after in quantization_rows(entry))
    return (f"\n## Quantization\n\nQuantized with `{entry.scheme}`: {entry.description}, by "
            f"{entry.library} {entry.library_version}.\n\n"
            f"Loading needs `pip install {entry.loader}` next to transformers; then "
            "`AutoModelForCausalLM.from_pretrained(path)` loads it as usual.\n\n"
            f"| measure | before | after |\n|---|---|---|\n{table}")


# ----------------------------------------------------------------------------------------------- several runs


def records_table(records: Sequence[tuple[str, RunRecord]]) -> str:
    """One row per checkpoint: segments, layers, perplexity dense → pruned, zero-shot average and speed-up."""
    lines = [("| checkpoint | source | removed | layers | parameters | ppl dense | ppl pruned | avg acc dense | "
              "avg acc pruned | retention | decode speed-up (limit) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in records:
        ppl, zero_shot, speed = record.metrics.perplexity, record.metrics.zero_shot, record.metrics.speed
        speed_up = f"{speed.decode_ratio:.2f} ({speed.limit:.2f})" if speed else "-"
        accuracy = [number(zero_shot.before.average.acc, ".3f"), number(zero_shot.after.average.acc, ".3f"),
                    number(zero_shot.retention.average.retention, ".3f")] if zero_shot else ["-"] * 3
        lines.append(
            f"| {name} | {record.source} | {segments_text(record.segments or [], ' ')} | "
            f"{record.num_layers_before} → {record.num_layers_after} | {(record.parameters_after or 0) / 1e6:.1f}M | "
            f"{number(ppl.before if ppl else None, '.2f')} | {number(ppl.after if ppl else None, '.2f')} | "
            f"{' | '.join(accuracy)} | {speed_up} |"
        )
    return "\n".join(lines) + "\n"


def difference_text(difference: Difference | None, reason: str = "", spec: str = "+.3f") -> str:
    """``+0.012 [−0.004, +0.028]``: a paired difference with its interval, or the reason there is none."""
    if difference is None:
        return reason or "unpaired"
    return (f"{format(difference.estimate, spec)} [{format(difference.low, spec)}, "
            f"{format(difference.high, spec)}]")


def paired_table(name_a: str, name_b: str, rows: Sequence[PairedRow]) -> str:
    """The pruned model of ``name_a`` against that of ``name_b``, measure by measure, with paired 95 % intervals
    (a tie: the interval holds 0); the perplexity row also as a ratio of perplexities."""
    lines = [f"{name_a} against {name_b} (paired; A − B with its 95 % bootstrap interval):", "",
             f"| measure | {name_a} | {name_b} | A − B [95 %] | verdict for {name_a} |", "|---|---|---|---|---|"]
    for row in rows:
        text = difference_text(row.difference, row.reason)
        if row.difference is not None and row.log_ratio:
            low, high = math.exp(row.difference.low), math.exp(row.difference.high)
            text += f"; perplexity ratio {math.exp(row.difference.estimate):.3f} [{low:.3f}, {high:.3f}]"
        verdict = "-" if row.difference is None else row.difference.verdict(row.higher_is_better)
        lines.append(f"| {row.measure} | {number(row.a, '.4f')} | {number(row.b, '.4f')} | {text} | {verdict} |")
    return "\n".join(lines) + "\n"


def stored_text(paired: Paired | None, higher_is_better: bool = True) -> str:
    """A stored paired difference as ``tie (+0.004 [-0.010, +0.018])``; ``unpaired`` when there is none."""
    from layercut.paired import Difference

    if paired is None:
        return "unpaired"
    difference = Difference(paired.estimate, paired.low, paired.high, paired.items, paired.level)
    return f"{difference.verdict(higher_is_better)} ({difference_text(difference)})"


def compare_table(result: CompareResult) -> str:
    """The comparison as a markdown table, dense model first; each later method against the first, paired over
    the test windows (log perplexity) and the items (average accuracy)."""
    zero_shot = result.dense.zero_shot is not None
    first = result.rows[0].method
    head = f"| method | segments | KL | ppl cut | ppl healed | log ppl vs {first} | trainable | search s | heal s |"
    rule = "|---|---|---|---|---|---|---|---|---|"
    if zero_shot:
        head += f" avg acc | acc vs {first} | retention |"
        rule += "---|---|---|"
    agreed = next((row.agreement for row in result.rows if row.agreement is not None), None)
    if agreed is not None:
        head += "".join(f" {name} |" for name in agreement_names(agreed))
        rule += "---|" * len(agreement_names(agreed))
    lines = [f"# {result.model}: {result.remove} layers removed, heal `{result.rows[0].heal}`", "", head, rule]
    dense_row = f"| dense | - | - | - | {number(result.dense.perplexity, '.2f')} | - | - | - | - |"
    if zero_shot:
        dense_row += f" {number(result.dense.zero_shot.average.acc, '.3f')} | - | 1.000 |"
    if agreed is not None:
        dense_row += " - |" * len(agreement_names(agreed))
    lines.append(dense_row)
    for index, row in enumerate(result.rows):
        against_ppl = "-" if index == 0 else stored_text(row.log_perplexity_vs, higher_is_better=False)
        line = (f"| {row.method} | {segments_text(row.segments, ' ')} | {number(row.kl, '.3f')} | "
                f"{number(row.perplexity_cut, '.2f')} | {number(row.perplexity, '.2f')} | {against_ppl} | "
                f"{row.trainable_parameters:,} | {number(row.search_seconds, '.1f')} | {number(row.heal_seconds, '.1f')} |")
        if zero_shot:
            retention = row.retention.retention if row.retention else None
            against_acc = "-" if index == 0 else stored_text(row.accuracy_vs)
            line += f" {number(row.zero_shot.average.acc, '.3f')} | {against_acc} | {number(retention, '.3f')} |"
        if agreed is not None:
            line += "".join(f" {value} |" for value in agreement_values(row.agreement, agreed))
        lines.append(line)
    lines += ["", (f"Against {first}: paired 95 % bootstrap intervals of the difference (test windows; zero-shot "
                   "items); a tie when the interval holds 0.")]
    return "\n".join(lines) + "\n"


def agreement_names(agreement: Agreement) -> list[str]:
    """Column names of the agreement measures: KL and top-1 per text, then the generation's two."""
    names = [name for text in agreement.texts for name in (f"KL {text}", f"top-1 {text}")]
    if agreement.generation is not None:
        generation = agreement.generation
        names += [f"gen prefix /{generation.new_tokens}", f"gen first {generation.match_tokens}"]
    return names


def agreement_values(agreement: Agreement | None, layout: Agreement) -> list[str]:
    """The cells under :func:`agreement_names` of ``layout`` (``-`` where ``agreement`` lacks a measure)."""
    values: list[float | None] = []
    for text in layout.texts:
        found = agreement.texts.get(text) if agreement is not None else None
        values += [found.kl, found.top1] if found is not None else [None, None]
    if layout.generation is not None:
        generation = agreement.generation if agreement is not None else None
        values += [generation.mean_prefix, generation.share_matching] if generation is not None else [None, None]
    return [number(value, ".3f") for value in values]


# ----------------------------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(path: Path, names: list[str], series: list[tuple[str, list[float], str]], ylabel: str,
          title: str | None = None, line: tuple[str, float] | None = None, log: bool = False) -> None:
    """Grouped bars, one group per name and one bar per ``(label, values, colour)`` series."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(1.3 * len(names) + 3, 3.5))
    width = 0.8 / len(series)
    for index, (label, values, colour) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        axis.bar([p + offset for p in range(len(names))], values, width, label=label, color=colour)
    if line is not None:
        axis.axhline(line[1], color="k", ls="--", lw=1, label=line[0])
    axis.set_xticks(list(range(len(names))), names, rotation=20)
    if log:
        axis.set_yscale("log")
    axis.set_ylabel(ylabel)
    if title:
        axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def records_chart(records: Sequence[tuple[str, RunRecord]], path: Path) -> None:
    """Bar chart of dense and pruned perplexity per checkpoint."""
    def perplexity(record: RunRecord, key: str) -> float:
        ppl = record.metrics.perplexity
        return float("nan") if ppl is None else getattr(ppl, key)

    _bars(path, [name for name, _ in records],
          [("dense", [perplexity(r, "before") for _, r in records], "tab:gray"),
           ("pruned", [perplexity(r, "after") for _, r in records], "tab:blue")], "perplexity")


def compare_chart(result: CompareResult, path: Path) -> None:
    """Bar chart of healed (and cut) perplexity per method, with the dense model as a line."""
    _bars(path, [row.method for row in result.rows],
          [("cut", [row.perplexity_cut for row in result.rows], "tab:gray"),
           ("healed", [row.perplexity for row in result.rows], "tab:blue")], "perplexity",
          f"{result.model}: {result.remove} layers removed", ("dense", result.dense.perplexity), log=True)


def profile_track(trajectory: list[dict], profile: int, segment: int = 0) -> list[float]:
    """Notch ``segment``'s start of gate ``profile`` at each step of a gate trajectory; NaN once the profile has
    stopped training (it rounded to the same cut as a better profile)."""
    return [row["starts"][profile][segment] if profile in row.get("active", [profile]) else nan
            for row in trajectory]


def search_charts(found: SearchResult, folder: Path) -> dict[str, Path]:
    """Write ``gate_trajectory.png`` (when the gate ran) and ``kl_landscape.png`` (when cuts were scored)."""
    plt = _pyplot()
    written = {}
    if found.trajectory and "starts" in found.trajectory[0]:
        steps = [row["step"] for row in found.trajectory]
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        profiles = len(found.trajectory[0]["starts"])
        for profile in range(profiles):
            for segment in range(len(found.trajectory[0]["starts"][profile])):
                top.plot(steps, profile_track(found.trajectory, profile, segment), lw=1)
            bottom.plot(steps, [nan if row["loss"][profile] is None else row["loss"][profile]
                                for row in found.trajectory], lw=1)
        top.set_ylabel("notch start (layer)")
        top.set_title(f"gate search: chosen {segments_text(found.segments)}")
        tau = top.twinx()
        tau.plot(steps, [row["tau"] for row in found.trajectory], "k--", lw=1)
        tau.set_ylabel("temperature τ (dashed)")
        bottom.set_ylabel("KL per profile (nats/token)")
        bottom.set_xlabel("step")
        bottom.set_yscale("log")
        figure.tight_layout()
        written["gate_trajectory.png"] = folder / "gate_trajectory.png"
        figure.savefig(written["gate_trajectory.png"], dpi=110)
        plt.close(figure)
    single = {int(key.split(":")[0]): value for key, value in found.landscape.items() if " " not in key and key}
    if single:
        figure, axis = plt.subplots(figsize=(7, 3.5))
        starts = sorted(single)
        axis.bar(starts, [single[s] for s in starts], color="tab:blue")
        chosen = found.segments[0][0] if len(found.segments) == 1 else None
        if chosen in single:
            axis.bar([chosen], [single[chosen]], color="tab:red", label="chosen")
            axis.legend()
        axis.set_xlabel("segment start (layer)")
        kl = found.method in ("clp", "exhaustive", "repair")
        axis.set_ylabel("hard-cut KL (nats/token)" if kl else f"{found.method} score")
        axis.set_title(f"{found.method}: {'KL of each scored cut' if kl else 'score by start layer'}")
        figure.tight_layout()
        written["kl_landscape.png"] = folder / "kl_landscape.png"
        figure.savefig(written["kl_landscape.png"], dpi=110)
        plt.close(figure)
    return written


# ----------------------------------------------------------------------------------------------- sweep


def sweep_table(result: SweepResult) -> str:
    """The sweep as a markdown table: one row per number of layers removed, the dense model first."""
    tasks = next((list(row.zero_shot.tasks) for row in result.rows if row.zero_shot is not None), [])
    agreed = next((row.agreement for row in result.rows if row.agreement is not None), None)
    names = ["removed", "segments", "KL (search)", "ppl cut", "ppl healed", *(f"{task} acc" for task in tasks),
             *(["retention"] if tasks else []), *(agreement_names(agreed) if agreed else []),
             "prefill x", "decode x", "limit x"]
    dense = result.dense
    dense_cells = ["0 (dense)", "-", "-", "-", number(dense.perplexity, ".2f"),
                   *(number(dense.zero_shot.tasks[task].acc, ".3f") if dense.zero_shot else "-" for task in tasks),
                   *(["1.000"] if tasks else []), *(["-"] * len(agreement_names(agreed)) if agreed else []),
                   "1.00", "1.00", "1.00"]
    title = f"# {result.model}: {result.layers} layers, method `{result.rows[0].method}`, heal `{result.rows[0].heal}`"
    lines = [title, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names), "| " + " | ".join(dense_cells) + " |"]
    for row in result.rows:
        speed = row.speed
        cells = [str(row.remove), segments_text(row.segments, " "), number(row.kl, ".3f"),
                 number(row.perplexity_cut, ".2f"), number(row.perplexity, ".2f"),
                 *(number(row.zero_shot.tasks[task].acc, ".3f") if row.zero_shot else "-" for task in tasks),
                 *([number(row.retention.retention if row.retention else None, ".3f")] if tasks else []),
                 *(agreement_values(row.agreement, agreed) if agreed else []),
                 *((number(speed.prefill_ratio, ".2f"), number(speed.decode_ratio, ".2f"), number(speed.limit, ".2f"))
                   if speed is not None else ("-", "-", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_chart(result: SweepResult, path: Path) -> None:
    """Four panels against the number of layers removed: perplexity (cut and healed), zero-shot accuracy per task,
    agreement with the dense model, and the measured speed-up next to its limit L / (L − n)."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    removed = [row.remove for row in result.rows]
    _sweep_perplexity(axes[0][0], result, removed)
    _sweep_zero_shot(axes[0][1], result, removed)
    _sweep_agreement(axes[1][0], result, removed)
    _sweep_speed(axes[1][1], result, removed)
    for axis in (axes[1][0], axes[1][1]):
        axis.set_xlabel("layers removed")
    figure.suptitle(f"{result.model}: {result.layers} layers, method {result.rows[0].method}, heal "
                    f"{result.rows[0].heal}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _sweep_perplexity(axis, result: SweepResult, removed: list[int]) -> None:
    axis.plot(removed, [row.perplexity_cut for row in result.rows], "o--", color="tab:gray", label="after the cut")
    axis.plot(removed, [row.perplexity for row in result.rows], "o-", color="tab:blue", label="healed")
    axis.axhline(result.dense.perplexity, color="k", ls=":", lw=1, label="dense")
    axis.set_yscale("log")
    axis.set_ylabel("perplexity")
    axis.legend(fontsize=8)


def _sweep_zero_shot(axis, result: SweepResult, removed: list[int]) -> None:
    dense = result.dense.zero_shot
    if dense is None:
        axis.text(0.5, 0.5, "no zero-shot tasks asked (--tasks)", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return
    for task in dense.tasks:
        line, = axis.plot(removed, [row.zero_shot.tasks[task].acc if row.zero_shot else math.nan
                                    for row in result.rows], "o-", label=task)
        axis.axhline(dense.tasks[task].acc, color=line.get_color(), ls=":", lw=1)
    axis.set_ylabel("accuracy (dotted: dense)")
    axis.legend(fontsize=7)


def _sweep_agreement(axis, result: SweepResult, removed: list[int]) -> None:
    agreed = next((row.agreement for row in result.rows if row.agreement is not None), None)
    if agreed is None:
        axis.set_axis_off()
        return
    for text in agreed.texts:
        axis.plot(removed, [row.agreement.texts[text].top1 if row.agreement else math.nan for row in result.rows],
                  "o-", label=f"top-1 agreement ({text})")
    if agreed.generation is not None:
        axis.plot(removed, [row.agreement.generation.share_matching if row.agreement else math.nan
                            for row in result.rows], "s-",
                  label=f"generation: first {agreed.generation.match_tokens} tokens match")
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("agreement with dense")
    twin = axis.twinx()
    for text in agreed.texts:
        twin.plot(removed, [row.agreement.texts[text].kl if row.agreement else math.nan for row in result.rows],
                  "x:", color="tab:red", alpha=0.6)
    twin.set_ylabel("KL(dense || pruned) per token (red)", color="tab:red")
    axis.legend(fontsize=7, loc="lower left")


def _sweep_speed(axis, result: SweepResult, removed: list[int]) -> None:
    rows = [row for row in result.rows if row.speed is not None]
    axis.plot([row.remove for row in rows], [row.speed.prefill_ratio for row in rows], "o-", label="prefill")
    axis.plot([row.remove for row in rows], [row.speed.decode_ratio for row in rows], "o-", label="decode")
    axis.plot([row.remove for row in rows], [row.speed.limit for row in rows], "k:", label="limit L / (L - n)")
    axis.set_ylabel("speed-up over dense")
    axis.legend(fontsize=8)
