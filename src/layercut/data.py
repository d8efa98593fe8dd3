"""Text sources (built-in offline corpora, local files, Hugging Face datasets when online) -> token windows.

Every source has two disjoint parts: ``"calib"`` (calibration) and ``"test"`` (perplexity evaluation). A window
starts with BOS when the tokenizer adds one to a text (``bos_prefix``), and is text tokens only otherwise.
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from xml.etree import ElementTree

import torch

from layercut.assets import GENSIM_WHEEL, cache_dir, fetch_wheel
from layercut.errors import LayercutError
from layercut.files import write_atomically

if TYPE_CHECKING:
    from layercut.config import DataOptions

logger = logging.getLogger(__name__)

SPLITS = ("calib", "test")
BUILTIN_SOURCES = ("wiki", "lee")
HUB_SOURCES = ("wikitext2", "c4", "alpaca")
LOCAL_SUFFIXES = (".txt", ".jsonl")
TEST_EVERY = 5  # built-in corpora: documents 4, 9, 14, ... (0-based) are test text, the others calibrate
LOCAL_CALIB_FRACTION = 0.9  # local files: the first 90% of paragraphs/records calibrate, the rest test
CORPUS_FORMAT = 2  # part of the cache file names: bump it whenever the cleaning below changes
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKITEXT_SPLITS = {"calib": "train", "test": "test"}
C4_SHARDS = {"calib": "en/c4-train.00000-of-01024.json.gz", "test": "en/c4-validation.00000-of-00008.json.gz"}
C4_DOCUMENTS = {"calib": 2000, "test": 1100}  # the first documents of each shard

_DROPPED_LINK_PREFIXES = {"category", "file", "image", "media"}
_DROPPED_TAGS = {"ref", "references", "table", "math", "gallery", "timeline", "source", "syntaxhighlight"}
_DROPPED_SECTIONS = {"see also", "references", "notes", "footnotes", "external links", "further reading",
                     "bibliography", "sources", "citations", "notes and references", "works cited"}
_LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|</?[a-zA-Z][^<>]*>|\b(?:class|style|align)=")


def load_text(source: str, split: str) -> str:
    """Text of ``source`` for ``split`` ("calib" or "test"); the two parts never share a document.

    ``source`` is a built-in offline corpus ("wiki": 106 Wikipedia articles; "lee": 293 distinct news
    stories; every 5th document is test text), a local ``.txt`` / ``.jsonl`` file (the first 90% of its
    paragraphs or records calibrate, the last 10% test), or, when the Hugging Face Hub is reachable,
    "wikitext2", "c4" or "alpaca". Documents are joined with a blank line ("\\n\\n").
    """
    if split not in SPLITS:
        raise LayercutError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    check_source(source)
    if source in BUILTIN_SOURCES:
        return _builtin_text(source, split)
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    return _local_text(Path(source).expanduser(), split)


def check_source(source: str) -> None:
    """LayercutError unless ``source`` is a built-in corpus, a Hub dataset, or an existing .txt/.jsonl file."""
    if source in BUILTIN_SOURCES or source in HUB_SOURCES:
        return
    path = Path(source).expanduser()
    suffixes = " or ".join(LOCAL_SUFFIXES)
    if path.is_file() and path.suffix in LOCAL_SUFFIXES:
        return
    if path.is_file():
        raise LayercutError(f"cannot read {path}: a local text file must end in {suffixes}")
    raise LayercutError(
        f"unknown text source {source!r}: use a built-in corpus ({', '.join(BUILTIN_SOURCES)}), a Hub "
        f"dataset ({', '.join(HUB_SOURCES)}; needs internet) or the path of a {suffixes} file that exists"
    )


@dataclass(frozen=True)
class Windows:
    """The token windows of a run: calibration ``[N, T]`` (search, GPTQ) and held-out test ``[M, T]``."""

    calibration: torch.Tensor
    test: torch.Tensor | None = None


def calibrate(tokenizer, options: DataOptions, test: bool = True) -> Windows:
    """The calibration stage: ``calib_windows`` random windows of the calibration text, and (``test``) the first
    ``ppl_windows`` consecutive windows of the test text (all of them for 0)."""
    calibration = calibration_windows(tokenizer, load_text(options.calib, "calib"), options.seq_len,
                                      options.calib_windows, options.seed)
    if not test:
        return Windows(calibration)
    return Windows(calibration, evaluation_windows(tokenizer, load_text(options.ppl, "test"), options.seq_len,
                                                   options.ppl_windows or None))


def calibration_windows(tokenizer, text: str, seq_len: int, count: int, seed: int) -> torch.LongTensor:
    """``[count, seq_len]`` windows of the token stream of ``text`` at random start offsets (GPTQ-style).

    Each window is ``bos_prefix(tokenizer)`` followed by ``step = seq_len - len(prefix)`` consecutive stream
    tokens: ``[BOS] + seq_len - 1`` text tokens for a tokenizer that adds BOS (Gemma, Llama), ``seq_len`` text
    tokens otherwise (SmolLM2, GPT-2, Qwen). Starts are uniform on ``[0, num_tokens - step]``, drawn with
    ``torch.Generator().manual_seed(seed)``: the same seed gives the same windows. Windows may overlap.
    ``tokenize`` defines the stream.
    """
    if count < 1:
        raise LayercutError(f"the number of calibration windows must be at least 1, got {count}")
    prefix = bos_prefix(tokenizer)
    step = seq_len - len(prefix)
    tokens = _stream_for_windows(tokenizer, text, seq_len, prefix)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - step + 1, (count,), generator=generator)
    return _prefixed(tokens[starts[:, None] + torch.arange(step)], prefix)


def shares_no_run(rows: torch.Tensor, avoid: torch.Tensor, shingle: int = 16) -> torch.Tensor:
    """``[N]`` bool: whether each window of ``rows`` ``[N, T]`` shares no run of ``shingle`` consecutive tokens with
    any window of ``avoid`` ``[M, T]`` (text the windows of ``avoid`` never contained)."""
    seen = {tuple(row[i : i + shingle]) for row in avoid.tolist() for i in range(len(row) - shingle + 1)}
    return torch.tensor([not any(tuple(row[i : i + shingle]) in seen for i in range(len(row) - shingle + 1))
                         for row in rows.tolist()], dtype=torch.bool)


def held_out_windows(tokenizer, text: str, seq_len: int, count: int, seed: int, avoid: torch.Tensor,
                     shingle: int = 16) -> torch.LongTensor:
    """``[count, seq_len]`` windows of ``text`` drawn as :func:`calibration_windows` (with ``seed``) that share no run
    of ``shingle`` consecutive tokens with any window of ``avoid`` ``[M, T]`` (say, the heal's own windows): text
    the heal never trained on, for scoring it. Up to 16 × ``count`` windows are drawn; LayercutError when fewer than
    ``count`` of them are held out."""
    drawn = calibration_windows(tokenizer, text, seq_len, 16 * count, seed)
    kept = drawn[shares_no_run(drawn, avoid, shingle)][:count]
    if kept.shape[0] < count:
        raise LayercutError(f"only {kept.shape[0]} of {count} windows of the calibration text are held out from the "
                            f"{avoid.shape[0]} heal windows: use fewer heal windows or proxy windows, or a longer text")
    return kept


def evaluation_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None
) -> torch.LongTensor:
    """``[N, seq_len]`` consecutive non-overlapping windows of the token stream of ``text`` (perplexity).

    Each window is ``bos_prefix(tokenizer)`` followed by ``step = seq_len - len(prefix)`` stream tokens:
    window ``i`` holds stream tokens ``[i * step, (i + 1) * step)``, after BOS for a tokenizer that adds one
    (so ``step = seq_len - 1`` and the model reads every window as the start of a document, as it was trained),
    alone otherwise (``step = seq_len``). The ragged tail is dropped; only the first ``max_windows`` windows are
    kept when it is given. ``tokenize`` defines the stream.
    """
    if max_windows is not None and max_windows < 1:
        raise LayercutError(f"max_windows must be at least 1 (or None for all windows), got {max_windows}")
    prefix = bos_prefix(tokenizer)
    step = seq_len - len(prefix)
    tokens = _stream_for_windows(tokenizer, text, seq_len, prefix)
    windows = tokens[: tokens.numel() // step * step].view(-1, step)
    return _prefixed(windows if max_windows is None else windows[:max_windows], prefix)


def bos_prefix(tokenizer) -> list[int]:
    """``[bos_token_id]`` when the tokenizer's own encoding of a text is BOS followed by the text's tokens
    (Gemma, Llama), else ``[]`` (SmolLM2, GPT-2, Qwen: no BOS added, whatever ``bos_token`` is set to).

    Read from the tokenizer's behaviour, not from its name or its ``add_bos_token`` attribute, which not every
    tokenizer class has or honours.
    """
    bos = tokenizer.bos_token_id
    plain = tokenizer("a", add_special_tokens=False, return_attention_mask=False)["input_ids"]
    special = tokenizer("a", return_attention_mask=False)["input_ids"]
    adds_bos = bos is not None and special[:1] == [bos] and special[1 : len(plain) + 1] == plain
    return [bos] if adds_bos else []


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """``[num_tokens]`` ids of the whole ``text`` from one tokenizer call with no special tokens (no BOS).

    One call on the whole text gives exactly the tokens the model sees for it (tokenizing pieces changes the
    tokens at the seams); ``verbose=False`` silences the longer-than-model-max-length warning. The windows put
    BOS in front of each window themselves (``bos_prefix``), not once in front of the whole text.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def clean_wikitext(wikitext: str) -> str:
    """Plain prose of one article's wiki markup, paragraphs joined with "\\n\\n": headings stay as lines;
    templates, tables, refs, math, files, categories and the reference / link-list sections go."""
    import mwparserfromhell  # a dependency of layercut, imported here so that importing data stays cheap

    code = mwparserfromhell.parse(_drop_sections(wikitext))
    # Empty unwanted nodes in place: Wikicode.remove searches the whole tree for each node (minutes in all).
    for link in code.filter_wikilinks():
        if str(link.title).strip().lstrip(":").split(":")[0].strip().lower() in _DROPPED_LINK_PREFIXES:
            link.title, link.text = "", None
    for tag in code.filter_tags():
        if str(tag.tag).strip().lower() in _DROPPED_TAGS:
            tag.contents = ""
    text = code.strip_code(normalize=True, collapse=True)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)  # refs left unparsed
    text = re.sub(r"^\{\|.*?^\|\}", "", text, flags=re.DOTALL | re.MULTILINE)  # tables left unparsed
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # brackets that only held templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    lines = (line.strip().lstrip(":;*# ") for line in text.split("\n"))  # list and indent markers
    keep = [p for p in lines if re.search(r"\w", p) and p[0] not in "|!" and not _LEFTOVER_MARKUP.search(p)]
    return "\n\n".join(keep)


def _drop_sections(wikitext: str) -> str:
    """``wikitext`` without the ``_DROPPED_SECTIONS`` (reference and link lists) and their subsections.

    Works on heading lines, not on the parse tree: markup left open earlier in an article nests later
    headings inside other nodes, where ``get_sections`` does not see them.
    """
    kept, dropped_level = [], None
    for line in wikitext.split("\n"):
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1\s*", line)
        if heading and dropped_level is not None and len(heading[1]) <= dropped_level:
            dropped_level = None
        if heading and dropped_level is None and heading[2].lower() in _DROPPED_SECTIONS:
            dropped_level = len(heading[1])
        if dropped_level is None:
            kept.append(line)
    return "\n".join(kept)


def _stream_for_windows(tokenizer, text: str, seq_len: int, prefix: list[int]) -> torch.LongTensor:
    """``[num_tokens]`` token stream of ``text``, checked to fill one window: ``seq_len`` tokens, of which the
    ``prefix`` (BOS or nothing) takes its share."""
    if seq_len < 2:
        raise LayercutError(f"seq_len must be at least 2 tokens (an input and a target), got {seq_len}")
    tokens = tokenize(tokenizer, text)
    if tokens.numel() < seq_len - len(prefix):
        bos = f" (BOS and {seq_len - len(prefix)} text tokens)" if prefix else ""
        raise LayercutError(
            f"the text has {tokens.numel()} tokens but one window needs seq_len={seq_len}{bos}; "
            "use a smaller --seq-len or a longer text"
        )
    return tokens


def _prefixed(windows: torch.LongTensor, prefix: list[int]) -> torch.LongTensor:
    """``windows`` ``[N, T]`` with the ``prefix`` ids as their first columns (``[N, len(prefix) + T]``)."""
    if not prefix:
        return windows
    return torch.cat([torch.tensor(prefix, dtype=windows.dtype).expand(len(windows), -1), windows], dim=1)


def _split_documents(documents: list[str], split: str) -> list[str]:
    """Every ``TEST_EVERY``-th document (0-based indices 4, 9, ...) for "test", all the others for "calib"."""
    is_test = [index % TEST_EVERY == TEST_EVERY - 1 for index in range(len(documents))]
    return [doc for doc, test in zip(documents, is_test) if test == (split == "test")]


def _builtin_text(source: str, split: str) -> str:
    """A built-in corpus part, parsed once from the gensim wheel, then read from ``cache_dir()/corpora``."""
    path = cache_dir() / "corpora" / f"{source}-v{CORPUS_FORMAT}-{split}.txt"
    if not path.is_file():
        documents = _wiki_articles() if source == "wiki" else _lee_stories()
        documents = list(dict.fromkeys(documents))  # a repeated document could land in both parts
        logger.info("built the %s corpus: %d distinct documents", source, len(documents))
        for part in SPLITS:
            text = "\n\n".join(_split_documents(documents, part))
            write_atomically(path.with_name(f"{source}-v{CORPUS_FORMAT}-{part}.txt"), text)
    return path.read_text(encoding="utf-8")


def _wheel_member(member: str) -> bytes:
    """Bytes of ``member`` inside the gensim wheel (a zip), which is downloaded once and never installed."""
    wheel = fetch_wheel(GENSIM_WHEEL)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise LayercutError(f"{wheel} is damaged or lacks {member} ({error}); delete it and retry") from error


def _wiki_articles() -> list[str]:
    """Cleaned text of the articles (namespace 0, no redirects) of the Wikipedia excerpt, in dump order."""
    articles = []
    for _, element in ElementTree.iterparse(io.BytesIO(bz2.decompress(_wheel_member(WIKI_MEMBER)))):
        if element.tag.rpartition("}")[2] != "page":
            continue
        fields = {child.tag.rpartition("}")[2]: child for child in element.iter()}
        if fields["ns"].text == "0" and "redirect" not in fields:
            articles.append(clean_wikitext(fields["text"].text or ""))
        element.clear()
    return [article for article in articles if article]


def _lee_stories() -> list[str]:
    """The 300 stories of the Lee news corpus (7 of them repeats), one per line of the file."""
    lines = _wheel_member(LEE_MEMBER).decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _local_text(path: Path, split: str) -> str:
    """A part of a local file: the first ``LOCAL_CALIB_FRACTION`` of its units calibrate, the rest test.

    Units are the ``"text"`` fields of a ``.jsonl`` file; for a ``.txt`` file, its blank-line separated
    paragraphs, or its lines when it has fewer than 10 paragraphs. Units are joined with "\\n\\n".
    """
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise LayercutError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); give a text file "
                            "saved as UTF-8") from None
    if path.suffix == ".jsonl":
        lines = enumerate(content.splitlines(), start=1)
        units = [_jsonl_text(line, path, number) for number, line in lines if line.strip()]
    else:
        units = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
        units = units if len(units) >= 10 else [line.strip() for line in content.splitlines() if line.strip()]
    if len(units) < 2:
        raise LayercutError(f"{path} has {len(units)} non-empty paragraphs/records but needs at least 2 "
                            "for disjoint calibration and test parts; use a longer file")
    cut = min(max(round(len(units) * LOCAL_CALIB_FRACTION), 1), len(units) - 1)
    return "\n\n".join(units[:cut] if split == "calib" else units[cut:])


def _jsonl_text(line: str, path: Path, number: int) -> str:
    """The ``"text"`` field of JSON line ``number`` (1-based) of ``path``; a LayercutError names bad lines."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LayercutError(f"{path} line {number} is not valid JSON ({error}); fix that line") from error
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise LayercutError(f'{path} line {number} lacks a string "text" field; write {{"text": ...}} lines')
    return record["text"]


def _hub_text(source: str, split: str) -> str:
    """A Hub dataset part via ``datasets.load_dataset`` (needs the Hub), rows joined by "\\n\\n"."""
    try:
        import datasets
    except ImportError as error:
        raise LayercutError(f"{source!r} needs the datasets package: pip install 'layercut[data]'") from error
    try:
        if source == "wikitext2":  # the GPTQ protocol: rows joined with "\n\n"
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=WIKITEXT_SPLITS[split])
            return "\n\n".join(rows["text"])
        if source == "c4":
            shard = C4_SHARDS[split]
            rows = datasets.load_dataset("allenai/c4", data_files=shard, split="train", streaming=True)
            return "\n\n".join(row["text"] for row in rows.take(C4_DOCUMENTS[split]))
        rows = datasets.load_dataset("yahma/alpaca-cleaned", split="train")  # one split: cut it like a corpus
        records = ["\n".join(r[key] for key in ("instruction", "input", "output") if r[key]) for r in rows]
        return "\n\n".join(_split_documents(records, split))
    except Exception as error:  # whatever failed, the dataset could not be fetched: say so and keep the cause
        raise LayercutError(
            f"could not load {source!r} from the Hugging Face Hub ({type(error).__name__}: {error}); "
            "the Hub may be unreachable: use the built-in offline corpus 'wiki' (or 'lee') or a local file"
        ) from error
