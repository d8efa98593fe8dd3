"""Text sources and token windows: disjoint calib/test parts, clean corpora, exact windows, helpful errors."""

import json
import logging
import random

import pytest
import torch

from conftest import byte_level_tokenizer
from layercut import data
from layercut.assets import GENSIM_WHEEL, fetch_wheel
from layercut.data import calibration_windows, clean_wikitext, evaluation_windows, load_text, tokenize
from layercut.errors import LayercutError

WORDS = ["the", "model", "layer", "cut", "heals", "after", "pruning", "and", "keeps", "most", "of", "its"]
WORDS += ["accuracy", "on", "every", "task", "we", "measured", "while", "removed", "block", "saves", "time"]


def random_prose(words: int, seed: int) -> str:
    """Deterministic pseudo-English: sentences of words drawn from WORDS."""
    rng = random.Random(seed)
    sentences = [
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(words // 12)
    ]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained offline on a few KB; it adds BOS by default (like Gemma's); max length 64."""
    return byte_level_tokenizer([random_prose(2000, seed=0)], "<s>", add_bos=True, bos_token="<s>",
                                model_max_length=64)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The same tokenizer without the BOS it would add: a BOS token is set but never added (like SmolLM2's)."""
    return byte_level_tokenizer([random_prose(2000, seed=0)], "<s>", bos_token="<s>", model_max_length=64)


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    """A fresh layercut cache holding only the gensim wheel (fetched once into the real cache)."""
    wheel = fetch_wheel(GENSIM_WHEEL)
    cache = tmp_path_factory.mktemp("cache")
    (cache / "wheels").mkdir()
    (cache / "wheels" / wheel.name).symlink_to(wheel)
    return cache


@pytest.fixture(scope="module")
def wiki(corpus_cache):
    """The two wiki parts, parsed once into the fresh cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAYERCUT_CACHE", str(corpus_cache))
        return {split: load_text("wiki", split) for split in ("calib", "test")}


def long_paragraphs(text: str) -> set[str]:
    return {p for p in text.split("\n\n") if len(p) > 200}


@pytest.mark.slow  # parses the Wikipedia sample on a first run
def test_wiki_parts_are_clean_disjoint_prose(wiki, corpus_cache):
    calib, test = wiki["calib"], wiki["test"]
    assert 300_000 < len(calib.split()) and 40_000 < len(test.split()) < len(calib.split()) / 2
    for markup in ("[[", "]]", "{{", "}}", "{|", "<ref", "</", "thumb|", "Category:", "&amp;"):
        assert markup not in calib and markup not in test, markup
    assert long_paragraphs(calib) and long_paragraphs(test)
    assert not long_paragraphs(calib) & long_paragraphs(test)
    assert calib.startswith("Anarchism is a political philosophy")  # article 0 calibrates
    assert test.startswith("Alabama is a state")  # article 4 is the first test article
    names = {path.name for path in (corpus_cache / "corpora").iterdir()}
    assert {f"wiki-v{data.CORPUS_FORMAT}-{split}.txt" for split in data.SPLITS} <= names


def test_builtin_corpus_is_read_from_cache_after_first_build(tmp_path, corpus_cache, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(tmp_path))
    (tmp_path / "wheels").symlink_to(corpus_cache / "wheels")
    first = load_text("lee", "test")
    monkeypatch.setattr(data, "_wheel_member", lambda member: pytest.fail("the corpus was parsed twice"))
    assert load_text("lee", "test") == first
    assert not list((tmp_path / "corpora").glob("*.tmp"))


def test_lee_splits_by_story(corpus_cache, monkeypatch):
    monkeypatch.setenv("LAYERCUT_CACHE", str(corpus_cache))
    calib, test = (load_text("lee", split).split("\n\n") for split in ("calib", "test"))
    assert (len(calib), len(test)) == (235, 58)  # 300 stories, 7 of them repeats
    assert not set(calib) & set(test)


def test_clean_wikitext_keeps_prose_and_drops_markup():
    wikitext = (
        "{{Infobox person|name=X}}'''Ada''' was a [[mathematician|math person]].<ref>Source, p. 1.</ref>\n"
        '[[File:Ada.jpg|thumb|A portrait]]\n{| class="wikitable"\n|-\n| cell\n|}\n'
        "== Life ==\nShe wrote the first program.\n== References ==\n* A book\n[[Category:Mathematicians]]"
    )
    assert clean_wikitext(wikitext) == "Ada was a math person.\n\nLife\n\nShe wrote the first program."


def test_local_txt_paragraphs_split_90_10(tmp_path):
    paragraphs = [f"Paragraph {i} says something." for i in range(20)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    assert load_text(str(path), "calib").split("\n\n") == paragraphs[:18]
    assert load_text(str(path), "test").split("\n\n") == paragraphs[18:]


def test_local_txt_without_blank_lines_splits_by_line(tmp_path):
    lines = [f"Story {i} happened." for i in range(30)]
    path = tmp_path / "stories.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    calib, test = (load_text(str(path), split).split("\n\n") for split in ("calib", "test"))
    assert calib + test == lines and len(test) == 3


def test_local_jsonl_splits_by_record(tmp_path):
    records = [{"text": f"Record {i}.\nSecond line.", "id": i} for i in range(10)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_text(str(path), "calib") == "\n\n".join(r["text"] for r in records[:9])
    assert load_text(str(path), "test") == records[9]["text"]


@pytest.mark.parametrize(
    ("content", "word"),
    [('{"text": "ok"}\nnot json\n', "line 2"), ('{"text": "ok"}\n{"body": "no text"}\n', '"text"')],
)
def test_bad_jsonl_names_the_line(tmp_path, content, word):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LayercutError, match=word):
        load_text(str(path), "calib")


@pytest.mark.parametrize(
    ("source", "split", "word"),
    [
        ("wikipedia", "calib", "wiki"),  # unknown name: lists the built-in corpora
        ("/no/such/file.txt", "test", "exist"),
        ("wiki", "train", "calib"),  # unknown split: lists the valid ones
    ],
)
def test_bad_sources_raise_helpful_errors(source, split, word):
    with pytest.raises(LayercutError, match=word):
        load_text(source, split)


def test_unsupported_or_tiny_local_files_raise(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(LayercutError, match=".jsonl"):
        load_text(str(tmp_path / "table.csv"), "calib")
    (tmp_path / "one.txt").write_text("A single line.\n", encoding="utf-8")
    with pytest.raises(LayercutError, match="longer file"):
        load_text(str(tmp_path / "one.txt"), "calib")


def test_unreachable_hub_suggests_offline_sources(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for source in data.HUB_SOURCES:
        with pytest.raises(LayercutError, match="unreachable.*'wiki'"):
            load_text(source, "test")


class FakeStream(list):
    """Stands in for a streamed dataset: a list with ``take``."""

    def take(self, count):
        return self[:count]


@pytest.mark.parametrize(
    ("source", "split", "rows", "expected"),
    [
        ("wikitext2", "test", {"text": [" = Title = ", "", " Body text "]}, " = Title = \n\n\n\n Body text "),
        ("c4", "calib", FakeStream({"text": f"doc {i}"} for i in range(3000)), None),
        ("c4", "test", FakeStream({"text": f"doc {i}"} for i in range(3000)), None),
        (
            "alpaca",
            "test",
            [{"instruction": f"Do {i}", "input": "", "output": "Done"} for i in range(5)],
            "Do 4\nDone",
        ),
    ],
)
def test_hub_sources_join_rows(monkeypatch, source, split, rows, expected):
    datasets = pytest.importorskip("datasets")
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append(kwargs) or rows)
    text = load_text(source, split)
    if source == "c4":
        assert text.split("\n\n") == [f"doc {i}" for i in range(data.C4_DOCUMENTS[split])]
        assert calls[0]["data_files"] == data.C4_SHARDS[split] and calls[0]["streaming"]
    else:
        assert text == expected


def test_tokenize_adds_no_special_tokens_and_accepts_long_text(tokenizer, caplog):
    text = random_prose(3000, seed=1)
    with caplog.at_level(logging.WARNING):
        tokens = tokenize(tokenizer, text)
    assert tokens.dtype == torch.long and tokens.numel() > 10 * tokenizer.model_max_length
    assert tokenizer("The cut.").input_ids[0] == tokenizer.bos_token_id  # the tokenizer would add BOS ...
    assert tokenizer.bos_token_id not in tokens.tolist()  # ... but the token stream has none
    assert tokenizer.decode(tokens) == text
    assert "longer than" not in caplog.text


def test_bos_prefix_is_read_from_what_the_tokenizer_adds(tokenizer, plain_tokenizer, tiny_tokenizer):
    assert data.bos_prefix(tokenizer) == [tokenizer.bos_token_id] == [0]
    assert data.bos_prefix(plain_tokenizer) == []  # a bos_token that is never added is no prefix
    assert data.bos_prefix(tiny_tokenizer) == []  # BOS = EOS = <|endoftext|>, not added (GPT-2 style)


def old_calibration_windows(stream: torch.Tensor, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """The calibration windows layercut drew before BOS windows (the GPTQ recipe), written out independently."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([stream[start : start + seq_len] for start in starts.tolist()])


def test_calibration_windows_without_bos_are_seeded_slices_of_the_stream(plain_tokenizer):
    text = random_prose(1500, seed=2)
    stream = tokenize(plain_tokenizer, text)
    windows = calibration_windows(plain_tokenizer, text, seq_len=32, count=16, seed=0)
    assert windows.shape == (16, 32) and windows.dtype == torch.long
    assert torch.equal(windows, old_calibration_windows(stream, 32, 16, seed=0))  # exactly as before BOS windows
    assert not torch.equal(windows, calibration_windows(plain_tokenizer, text, seq_len=32, count=16, seed=1))


def test_calibration_windows_with_bos_are_bos_then_seeded_slices_of_the_stream(tokenizer):
    text = random_prose(1500, seed=2)
    stream = tokenize(tokenizer, text)
    windows = calibration_windows(tokenizer, text, seq_len=32, count=16, seed=0)
    assert windows.shape == (16, 32) and windows.dtype == torch.long
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer.bos_token_id not in windows[:, 1:].tolist()
    assert torch.equal(windows, calibration_windows(tokenizer, text, seq_len=32, count=16, seed=0))
    assert not torch.equal(windows, calibration_windows(tokenizer, text, seq_len=32, count=16, seed=1))
    slices = stream.unfold(0, 31, 1)  # [num_tokens - 30, 31]: every run of 31 consecutive text tokens
    assert (windows[:, None, 1:] == slices[None]).all(-1).any(-1).all()
    assert len(set(windows[:, 1].tolist())) > 1  # random starts, not one slice repeated


def test_calibration_windows_fit_a_text_of_exactly_one_window(tokenizer, plain_tokenizer):
    text = "The model layer cut heals."
    stream = tokenize(plain_tokenizer, text)
    windows = calibration_windows(plain_tokenizer, text, stream.numel(), count=3, seed=0)
    assert torch.equal(windows, stream.expand(3, -1))
    stream = tokenize(tokenizer, text)
    windows = calibration_windows(tokenizer, text, stream.numel() + 1, count=3, seed=0)
    assert torch.equal(windows, torch.cat([torch.tensor([tokenizer.bos_token_id]), stream]).expand(3, -1))


def test_evaluation_windows_without_bos_are_the_stream_reshaped(plain_tokenizer):
    text = random_prose(1500, seed=3)
    stream = tokenize(plain_tokenizer, text)
    windows = evaluation_windows(plain_tokenizer, text, seq_len=50)
    count = stream.numel() // 50
    assert windows.shape == (count, 50) and windows.dtype == torch.long
    assert torch.equal(windows, stream[: count * 50].reshape(count, 50))
    assert torch.equal(evaluation_windows(plain_tokenizer, text, seq_len=50, max_windows=2), windows[:2])


def test_evaluation_windows_with_bos_are_bos_then_consecutive_text(tokenizer):
    text = random_prose(1500, seed=3)
    stream = tokenize(tokenizer, text).tolist()
    windows = evaluation_windows(tokenizer, text, seq_len=50)
    count = len(stream) // 49
    assert windows.shape == (count, 50) and windows.dtype == torch.long
    for index, window in enumerate(windows.tolist()):
        assert window == [tokenizer.bos_token_id] + stream[index * 49 : (index + 1) * 49]
    assert sum(len(window) - 1 for window in windows.tolist()) > len(stream) - 49  # only the ragged tail is left
    assert torch.equal(evaluation_windows(tokenizer, text, seq_len=50, max_windows=2), windows[:2])


@pytest.mark.parametrize(
    ("call", "word"),
    [
        (lambda tok: calibration_windows(tok, "Too short.", seq_len=512, count=4, seed=0), "--seq-len"),
        (lambda tok: evaluation_windows(tok, "Too short.", seq_len=512), "longer text"),
        (lambda tok: evaluation_windows(tok, "Some text here.", seq_len=1), "at least 2"),
        (lambda tok: calibration_windows(tok, "Some text here.", seq_len=2, count=0, seed=0), "at least 1"),
        (lambda tok: evaluation_windows(tok, "Some text here.", seq_len=2, max_windows=0), "max_windows"),
    ],
)
def test_bad_window_requests_raise_helpful_errors(tokenizer, plain_tokenizer, call, word):
    for any_tokenizer in (tokenizer, plain_tokenizer):
        with pytest.raises(LayercutError, match=word):
            call(any_tokenizer)


def test_too_short_error_states_the_token_counts(tokenizer, plain_tokenizer):
    count = tokenize(plain_tokenizer, "Too short.").numel()
    with pytest.raises(LayercutError, match=f"has {count} tokens but one window needs seq_len=512; "):
        evaluation_windows(plain_tokenizer, "Too short.", seq_len=512)
    with pytest.raises(LayercutError, match=rf"has {count} tokens but one window needs seq_len=512 \(BOS and 511 "):
        evaluation_windows(tokenizer, "Too short.", seq_len=512)


def test_held_out_windows_share_no_run_with_the_windows_to_avoid(plain_tokenizer):
    text = random_prose(6000, seed=4)
    avoid = calibration_windows(plain_tokenizer, text, 32, 40, seed=1)
    held = data.held_out_windows(plain_tokenizer, text, 32, 8, 2, avoid, shingle=8)
    assert held.shape == (8, 32)
    runs = {tuple(row[i:i + 8]) for row in avoid.tolist() for i in range(25)}
    assert not any(tuple(row[i:i + 8]) in runs for row in held.tolist() for i in range(25))
    drawn = calibration_windows(plain_tokenizer, text, 32, 128, seed=2)
    assert torch.equal(data.shares_no_run(drawn, avoid, 8), torch.tensor(
        [not any(tuple(row[i:i + 8]) in runs for i in range(25)) for row in drawn.tolist()]))
    assert not data.shares_no_run(avoid[:3], avoid, 8).any()  # a window always shares its own text
    with pytest.raises(LayercutError, match="held out from the 4000 heal windows"):
        data.held_out_windows(plain_tokenizer, text, 32, 8, 2, calibration_windows(plain_tokenizer, text, 32, 4000, 1),
                              shingle=8)
