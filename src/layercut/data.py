"""Text sources (built-in offline corpora, local files, Hugging Face datasets when online) -> token windows.

Every source has two disjoint parts: ``"calib"`` (calibration) and ``"test"`` (perplexity evaluation).
"""

from __future__ import annotations

import bz2
import io
import json
import logging
import os
import re
import tempfile
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import torch

from layercut.assets import GENSIM_WHEEL, cache_dir, fetch_wheel
from layercut.errors import LayercutError

logger = logging.getLogger(__name__)

SPLITS = ("calib", "test")
BUILTIN_SOURCES = ("wiki", "lee")
HUB_SOURCES = ("wikitext2", "c4", "alpaca")
LOCAL_SUFFIXES = (".txt", ".jsonl")
TEST_EVERY = 5  # documents 4, 9, 14, ... (0-based) of a corpus are test text, all others calibration text
LOCAL_CALIB_FRACTION = 0.9  # local files: the first 90% of paragraphs calibrate, the last 10% test
C4_DOCUMENTS = {"calib": 2000, "test": 1100}  # first documents of the train / validation shard
CORPUS_FORMAT = 1  # part of the cache file names: bump it when the cleaning below changes
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"

_DROPPED_LINK_PREFIXES = {"category", "file", "image", "media"}
_DROPPED_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "score", "pre",
                 "source", "syntaxhighlight", "chem", "ce", "code", "hiero", "poem", "blockquote", "div"}
_DROPPED_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography",
                     "sources", "footnotes", "citations", "notes and references", "works cited"}
_LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|</?[a-zA-Z][^<>]*>|\b(?:class|style|align)=")


def load_text(source: str, split: str) -> str:
    """Text of ``source`` for ``split`` ("calib" or "test"; the two parts never share a document).

    ``source`` is a built-in offline corpus ("wiki": 106 Wikipedia articles; "lee": 300 news stories; every
    5th document is test text), a local ``.txt`` / ``.jsonl`` file (first 90% of paragraphs or records
    calibrate, last 10% test), or, when the Hugging Face Hub is reachable, "wikitext2", "c4" or "alpaca".
    """
    if split not in SPLITS:
        raise LayercutError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source in BUILTIN_SOURCES:
        return _builtin_text(source, split)
    if source in HUB_SOURCES:
        return _hub_text(source, split)
    path = Path(source).expanduser()
    if path.suffix in LOCAL_SUFFIXES and path.is_file():
        return _local_text(path, split)
    if path.is_file():
        raise LayercutError(f"cannot read {path}: a local text source must end in {' or '.join(LOCAL_SUFFIXES)}")
    raise LayercutError(
        f"unknown text source {source!r}: use a built-in corpus ({', '.join(BUILTIN_SOURCES)}), a hub dataset "
        f"({', '.join(HUB_SOURCES)}; needs internet) or the path of a local {' or '.join(LOCAL_SUFFIXES)} file "
        f"that exists (no file {path} was found)"
    )


def calibration_windows(tokenizer, text: str, seq_len: int, count: int, seed: int) -> torch.LongTensor:
    """``[count, seq_len]`` windows of the token stream of ``text`` starting at random offsets (GPTQ-style).

    Starts are drawn uniformly from ``[0, num_tokens - seq_len]`` with ``torch.Generator().manual_seed(seed)``,
    so the same seed gives the same windows; windows may overlap. See ``tokenize`` for the stream.
    """
    if count < 1:
        raise LayercutError(f"the number of calibration windows must be at least 1, got {count}")
    tokens = _stream_for_windows(tokenizer, text, seq_len)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def evaluation_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """``[N, seq_len]`` consecutive non-overlapping windows of the token stream of ``text`` (perplexity protocol).

    Window ``i`` is tokens ``[i * seq_len, (i + 1) * seq_len)``; the ragged tail is dropped; only the first
    ``max_windows`` windows are kept when it is given.
    """
    if max_windows is not None and max_windows < 1:
        raise LayercutError(f"max_windows must be at least 1 (or None for all windows), got {max_windows}")
    tokens = _stream_for_windows(tokenizer, text, seq_len)
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    return windows if max_windows is None else windows[:max_windows]


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """``[num_tokens]`` token ids of the whole ``text`` in one tokenizer call, with no special tokens (no BOS).

    One call on the whole text gives exactly the tokens the model would see for it (splitting the text first
    changes the tokens at the seams); ``verbose=False`` silences the longer-than-max-length warning.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def clean_wikitext(wikitext: str) -> str:
    """Plain prose of one article's wiki markup: no templates, tables, refs, files, categories or link lists."""
    import mwparserfromhell  # a dependency of layercut; imported here so that importing data stays cheap

    code = mwparserfromhell.parse(wikitext)
    for section in code.get_sections(include_lead=False):
        headings = section.filter_headings()  # empty when an enclosing section was removed already
        if headings and headings[0].title.strip_code().strip().lower() in _DROPPED_SECTIONS:
            _remove(code, section)
    for link in code.filter_wikilinks():
        if str(link.title).strip().lstrip(":").split(":")[0].strip().lower() in _DROPPED_LINK_PREFIXES:
            _remove(code, link)
    for tag in code.filter_tags():
        if str(tag.tag).strip().lower() in _DROPPED_TAGS:
            _remove(code, tag)
    text = code.strip_code(normalize=True, collapse=True)
    text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)  # refs the parser left as text
    text = re.sub(r"^\{\|.*?^\|\}", "", text, flags=re.DOTALL | re.MULTILINE)  # tables the parser left as text
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # brackets whose contents were templates
    text = re.sub(r"[ \t]{2,}", " ", text)
    paragraphs = (line.strip().lstrip(":;*# ") for line in text.split("\n"))  # list and indent markers
    return "\n\n".join(p for p in paragraphs if re.search(r"\w", p) and p[0] not in "|!" and not _LEFTOVER_MARKUP.search(p))


def _remove(code, node) -> None:
    """Remove ``node`` from ``code``; a node already removed with its parent is ignored."""
    try:
        code.remove(node)
    except ValueError:
        pass


def _stream_for_windows(tokenizer, text: str, seq_len: int) -> torch.LongTensor:
    """``[num_tokens]`` token stream of ``text``, checked to hold at least one window of ``seq_len`` tokens."""
    if seq_len < 2:
        raise LayercutError(f"seq_len must be at least 2 tokens (one input and one target), got {seq_len}")
    tokens = tokenize(tokenizer, text)
    if tokens.numel() < seq_len:
        raise LayercutError(
            f"the text has {tokens.numel()} tokens but one window needs seq_len={seq_len}; "
            "use a smaller --seq-len or a longer text"
        )
    return tokens


def _split_documents(documents: list[str], split: str) -> list[str]:
    """Every ``TEST_EVERY``-th document (0-based indices 4, 9, ...) for "test", all the others for "calib"."""
    is_test = [index % TEST_EVERY == TEST_EVERY - 1 for index in range(len(documents))]
    return [doc for doc, test in zip(documents, is_test) if test == (split == "test")]


def _builtin_text(source: str, split: str) -> str:
    """A built-in corpus part, parsed once from the gensim wheel and cached under ``cache_dir()/corpora``."""
    path = cache_dir() / "corpora" / f"{source}-v{CORPUS_FORMAT}-{split}.txt"
    if not path.is_file():
        documents = _wiki_articles() if source == "wiki" else _lee_stories()
        logger.info("built the %s corpus: %d documents", source, len(documents))
        for part in SPLITS:
            _write_atomically(path.with_name(f"{source}-v{CORPUS_FORMAT}-{part}.txt"),
                              "\n\n".join(_split_documents(documents, part)))
    return path.read_text(encoding="utf-8")


def _wheel_member(member: str) -> bytes:
    """Bytes of ``member`` inside the gensim wheel (a zip), which is downloaded once and never installed."""
    wheel = fetch_wheel(GENSIM_WHEEL)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise LayercutError(f"{wheel} is damaged or lacks {member} ({error}); delete it and run again") from error


def _wiki_articles() -> list[str]:
    """Cleaned text of the articles (namespace 0, not redirects) of the Wikipedia excerpt, in dump order."""
    articles = []
    xml = bz2.decompress(_wheel_member(WIKI_MEMBER))
    for _, element in ElementTree.iterparse(io.BytesIO(xml)):
        if element.tag.rpartition("}")[2] != "page":
            continue
        fields = {child.tag.rpartition("}")[2]: child for child in element.iter()}
        if fields["ns"].text == "0" and "redirect" not in fields:
            articles.append(clean_wikitext(fields["text"].text or ""))
        element.clear()
    return [article for article in articles if article]


def _lee_stories() -> list[str]:
    """The 300 stories of the Lee news corpus, one per line of the file."""
    lines = _wheel_member(LEE_MEMBER).decode("utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, then rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False, suffix=".tmp") as file:
        file.write(text)
    os.chmod(file.name, 0o644)  # temporary files are private; the cache is as readable as any other file
    os.replace(file.name, path)


def _local_text(path: Path, split: str) -> str:
    """A part of a local file: first ``LOCAL_CALIB_FRACTION`` of its units calibrate, the rest test.

    Units are the ``"text"`` fields of a ``.jsonl`` file, else blank-line separated paragraphs of a ``.txt``
    file, or its lines when it has fewer than 10 paragraphs. Units are joined with a blank line.
    """
    content = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        units = [_jsonl_text(line, path, number) for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    else:
        units = [p.strip() for p in re.split(r"\n\s*\n", content) if p.strip()]
        units = units if len(units) >= 10 else [line.strip() for line in content.splitlines() if line.strip()]
    if len(units) < 2:
        raise LayercutError(f"{path} has {len(units)} non-empty paragraphs/records; it needs at least 2 to "
                            "give disjoint calibration and test parts: use a longer file")
    cut = min(max(round(len(units) * LOCAL_CALIB_FRACTION), 1), len(units) - 1)
    return "\n\n".join(units[:cut] if split == "calib" else units[cut:])


def _jsonl_text(line: str, path: Path, number: int) -> str:
    """The ``"text"`` field of one JSON line (1-based ``number``), or a LayercutError naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise LayercutError(f"{path} line {number} is not valid JSON ({error}); fix or remove that line") from error
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise LayercutError(f'{path} line {number} has no string "text" field; each line must be {{"text": "..."}}')
    return record["text"]


def _hub_text(source: str, split: str) -> str:
    """A part of a Hugging Face dataset through ``datasets.load_dataset`` (needs the Hub; "\\n\\n" joins rows)."""
    try:
        import datasets
    except ImportError as error:
        raise LayercutError(f"{source!r} needs the `datasets` package: pip install 'layercut[data]'") from error
    try:
        if source == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
            return "\n\n".join(rows["text"])
        if source == "c4":
            shard = "en/c4-train.00000-of-01024.json.gz" if split == "calib" else "en/c4-validation.00000-of-00008.json.gz"
            rows = datasets.load_dataset("allenai/c4", data_files=shard, split="train", streaming=True)
            return "\n\n".join(row["text"] for row in rows.take(C4_DOCUMENTS[split]))
        rows = datasets.load_dataset("yahma/alpaca-cleaned", split="train")
        records = ["\n".join(r[key] for key in ("instruction", "input", "output") if r[key]) for r in rows]
        return "\n\n".join(_split_documents(records, split))
    except Exception as error:  # any failure here means the dataset could not be fetched: say so, keep the cause
        raise LayercutError(
            f"could not load {source!r} from the Hugging Face Hub ({type(error).__name__}: {error}); the Hub may "
            "be unreachable: use the built-in offline corpus 'wiki' (or 'lee') or a local .txt/.jsonl file"
        ) from error
