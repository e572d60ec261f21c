"""Dataset sources → texts → token windows: parsing, every file format, determinism, fingerprints, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compress.calibrate.data import (
    BUILTIN_CORPORA,
    DatasetSpec,
    calibration_samples,
    check_source,
    eval_windows,
    load_texts,
    parse_source,
    tokenize_stream,
)
from compress.core.errors import CompressError

# --- parse_source ------------------------------------------------------------------------------------------------


def test_parse_builtin() -> None:
    assert parse_source("demo-calib") == DatasetSpec("builtin", "demo-calib", column="text")
    assert BUILTIN_CORPORA["demo-heldout"].name == "heldout.jsonl"
    assert BUILTIN_CORPORA["demo-calib"].parent.parts[-2:] == ("assets", "corpus")


def test_parse_local(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("body\nhello\n")
    assert parse_source(str(f)) == DatasetSpec("local", str(f.resolve()))
    assert parse_source(f"{f}#body") == DatasetSpec("local", str(f.resolve()), column="body")
    assert parse_source(str(tmp_path)) == DatasetSpec("local", str(tmp_path.resolve()))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("wikitext", DatasetSpec("hub", "wikitext")),
        ("allenai/c4:en", DatasetSpec("hub", "allenai/c4", "en")),
        (
            "Salesforce/wikitext:wikitext-2-raw-v1@test#text",
            DatasetSpec("hub", "Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
        ),
        ("user/data@train[:100]", DatasetSpec("hub", "user/data", None, "train[:100]")),
        ("user/data#content", DatasetSpec("hub", "user/data", column="content")),
    ],
)
def test_parse_hub(spec: str, expected: DatasetSpec) -> None:
    assert parse_source(spec) == expected


@pytest.mark.parametrize(
    "spec", ["./missing.jsonl", "/no/such/dir", "missing.txt", "data/train.parquet#text"]
)
def test_parse_missing_local_path(spec: str) -> None:
    with pytest.raises(CompressError, match=r"dataset file '.*' does not exist"):
        parse_source(spec)


def test_parse_invalid() -> None:
    with pytest.raises(CompressError, match="hub id written"):
        parse_source("a b c")


# --- load_texts per format -------------------------------------------------------------------------------------


def test_txt_paragraphs_are_documents(tmp_path: Path) -> None:
    """A .txt file is ONE document (newlines kept) unless a separator is asked for; then paragraphs split."""
    text = "first line\nsame doc\n\n\nsecond doc\n\nthird doc\n"
    f = tmp_path / "a.txt"
    f.write_text(text)
    assert load_texts(str(f)) == [text]
    assert load_texts(str(f), doc_separator="\n\n") == ["first line\nsame doc", "second doc", "third doc"]
    assert load_texts(str(f), doc_separator="doc") == ["first line\nsame", "second", "third"]


def test_txt_stream_is_the_concatenated_text(tiny_tokenizer, corpus_texts, tmp_path: Path) -> None:
    """The held-out-text protocol of lm-eval / the papers: the whole file tokenized as one stream, one BOS."""
    text = "\n\n".join(corpus_texts) + "\n"
    f = tmp_path / "heldout.txt"
    f.write_text(text)
    stream = tokenize_stream(tiny_tokenizer, load_texts(str(f)))
    assert stream.tolist() == tiny_tokenizer(text).input_ids
    assert torch.equal(eval_windows(tiny_tokenizer, str(f), seq_len=16).flatten(), stream[: stream.numel() // 16 * 16])
    split = tokenize_stream(tiny_tokenizer, load_texts(str(f), doc_separator="\n\n"))
    assert torch.equal(split, tokenize_stream(tiny_tokenizer, corpus_texts))  # one document per paragraph
    assert not torch.equal(split, stream)
    windows = eval_windows(tiny_tokenizer, str(f), seq_len=16, doc_separator="\n\n")
    assert torch.equal(windows.flatten(), split[: windows.numel()])


def test_a_folder_of_txt_files_is_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    assert load_texts(str(tmp_path)) == ["one\n\ntwo\n", "three\n"]
    assert load_texts(str(tmp_path), doc_separator="\n\n") == ["one", "two", "three"]


def test_rows_stay_documents_whatever_the_separator(tmp_path: Path) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a\n\nb", "c"]))
    assert load_texts(str(f)) == load_texts(str(f), doc_separator="\n\n") == ["a\n\nb", "c"]


@pytest.mark.skipif(not BUILTIN_CORPORA["demo-calib"].is_file(), reason="embedded corpus not built yet")
@pytest.mark.parametrize("name", ["demo-calib", "demo-heldout"])
def test_builtin_corpora_are_one_document_per_row(name: str) -> None:
    rows = [json.loads(line)["text"] for line in BUILTIN_CORPORA[name].read_text(encoding="utf-8").splitlines()
            if line.strip()]
    expected = [r.strip() for r in rows if r.strip()]
    assert load_texts(name) == expected
    assert load_texts(name, doc_separator="\n\n") == expected


def test_separator_is_part_of_the_calibration_fingerprint(tiny_tokenizer, corpus_txt: Path) -> None:
    whole = calibration_samples(tiny_tokenizer, str(corpus_txt), 2, 16)
    split = calibration_samples(tiny_tokenizer, str(corpus_txt), 2, 16, doc_separator="\n\n")
    assert whole.fingerprint != split.fingerprint and whole.total_tokens != split.total_tokens


def test_jsonl_text_field_and_column(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    rows = [
        {"id": 1, "text": "alpha", "title": "A"},
        {"id": 2, "text": "  ", "title": "B"},
        {"id": 3, "text": "gamma", "title": "C"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_texts(str(f)) == ["alpha", "gamma"]  # blank documents dropped
    assert load_texts(f"{f}#title") == ["A", "B", "C"]


def test_json_first_string_column(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"n": 1, "body": "one"}, {"n": 2, "body": "two"}]))
    assert load_texts(str(f)) == ["one", "two"]


def test_parquet_and_csv(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"label": [0, 1], "text": ["pq one", "pq two"]}).to_parquet(
        str(tmp_path / "a.parquet")
    )
    (tmp_path / "b.csv").write_text("score,content\n1,csv one\n2,csv two\n")
    assert load_texts(str(tmp_path / "a.parquet")) == ["pq one", "pq two"]
    assert load_texts(str(tmp_path / "b.csv")) == ["csv one", "csv two"]
    # a folder: every supported file, sorted by path; unsupported files are ignored
    (tmp_path / "notes.md").write_text("ignored")
    assert load_texts(str(tmp_path)) == ["pq one", "pq two", "csv one", "csv two"]


def test_no_text_column_names_the_columns(tmp_path: Path) -> None:
    f = tmp_path / "nums.csv"
    f.write_text("a,b\n1,2\n3,4\n")
    with pytest.raises(CompressError, match=r"has no text column \(columns: a, b\)"):
        load_texts(str(f))
    with pytest.raises(CompressError, match=r"has no column 'c' \(columns: a, b\)"):
        load_texts(f"{f}#c")


def test_unsupported_extension_and_empty(tmp_path: Path) -> None:
    f = tmp_path / "a.xml"
    f.write_text("<doc/>")
    with pytest.raises(CompressError, match="unsupported extension '.xml'"):
        load_texts(str(f))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(CompressError, match="has no text"):
        load_texts(str(empty))
    (tmp_path / "sub").mkdir()
    with pytest.raises(CompressError, match="has no .txt, .json"):
        load_texts(str(tmp_path / "sub"))


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.txt", ""), ("blank.txt", "\n\n   \n\n"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n"),
     ("empty.csv", ""), ("header.csv", "text\n"), ("blank-rows.jsonl", '{"text": "  "}\n')],
)
def test_a_file_without_text_says_so_in_one_sentence(tmp_path: Path, name: str, content: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CompressError) as error:
        load_texts(str(f))
    message = str(error.value)
    assert message.startswith(f"dataset file '{f}' has no text (") and "\n" not in message
    for internals in ("features", "StopIteration", "columns to parse", "corresponds to no data"):
        assert internals not in message


def test_check_source_refuses_bad_local_paths_without_reading_them(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match=r"dataset file '.*absent\.txt' does not exist"):
        check_source(str(tmp_path / "absent.txt"))
    (tmp_path / "data.xml").write_text("<doc/>")
    with pytest.raises(CompressError, match="unsupported extension '.xml'"):
        check_source(str(tmp_path / "data.xml"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(CompressError, match="has no text"):
        check_source(str(tmp_path / "empty.jsonl"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(CompressError, match="has no .txt, .json"):
        check_source(str(tmp_path / "sub"))
    assert check_source("demo-calib").kind == "builtin"
    assert check_source("someorg/somedata").kind == "hub"  # cannot be checked offline: left to the load


def test_missing_file_spec_object(tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="does not exist"):
        load_texts(DatasetSpec("local", str(tmp_path / "gone.jsonl")))


def test_hub_unreachable() -> None:
    msg = "dataset 'nobody/nothing' is not a local path or built-in corpus, and the Hugging Face Hub is unreachable"
    with pytest.raises(CompressError, match=msg):
        load_texts("nobody/nothing")


# --- token streams and windows --------------------------------------------------------------------------------------


def test_tokenize_stream_frames_documents_like_pretraining(tiny_tokenizer, tiny_encoder_tokenizer) -> None:
    stream = tokenize_stream(tiny_tokenizer, ["the cat", "the dog"])
    a = tiny_tokenizer("the cat").input_ids  # with the tokenizer's own framing (BOS where it adds one)
    b = tiny_tokenizer("the dog").input_ids
    assert stream.dtype == torch.long
    eos = tiny_tokenizer.eos_token_id
    assert stream.tolist() == a + ([] if a[-1] == eos else [eos]) + b
    enc = tokenize_stream(tiny_encoder_tokenizer, ["the cat", "the dog"]).tolist()
    ea, eb = tiny_encoder_tokenizer("the cat").input_ids, tiny_encoder_tokenizer("the dog").input_ids
    sep = tiny_encoder_tokenizer.sep_token_id  # encoders have no EOS: SEP separates documents
    assert enc == ea + ([] if ea[-1] == sep else [sep]) + eb


def test_tokenize_stream_adds_bos_for_llama_style_tokenizers() -> None:
    from compress.models.load import DEMO_MODEL_DIR, load_tokenizer

    tok = load_tokenizer(str(DEMO_MODEL_DIR))
    stream = tokenize_stream(tok, ["hello world", "a second document"]).tolist()
    assert stream[0] == tok.bos_token_id and stream.count(tok.bos_token_id) == 2
    assert stream[stream.index(tok.bos_token_id, 1) - 1] == tok.eos_token_id  # </s> <s> between documents


def test_calibration_samples_deterministic(tiny_tokenizer, corpus_jsonl: Path) -> None:
    src = str(corpus_jsonl)
    a = calibration_samples(tiny_tokenizer, src, num_samples=4, seq_len=32, seed=0)
    b = calibration_samples(tiny_tokenizer, src, num_samples=4, seq_len=32, seed=0)
    c = calibration_samples(tiny_tokenizer, src, num_samples=4, seq_len=32, seed=1)
    assert a.input_ids.shape == (4, 32) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 64
    assert not a.overlapping and a.total_tokens > 4 * 32
    # every window is a contiguous slice of the stream
    stream = tokenize_stream(tiny_tokenizer, load_texts(src))
    assert a.total_tokens == stream.numel()
    for row in a.input_ids:
        starts = [i for i in range(stream.numel() - 31) if torch.equal(stream[i : i + 32], row)]
        assert starts


def test_fingerprint_changes_with_data(tiny_tokenizer, corpus_texts, tmp_path: Path) -> None:
    f1, f2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    f1.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts))
    f2.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(corpus_texts)))
    a = calibration_samples(tiny_tokenizer, DatasetSpec("local", str(f1)), 2, 16)
    b = calibration_samples(tiny_tokenizer, DatasetSpec("local", str(f2)), 2, 16)
    f2.write_text(f1.read_text())
    c = calibration_samples(tiny_tokenizer, DatasetSpec("local", str(f2)), 2, 16)
    assert a.fingerprint != b.fingerprint
    assert (
        torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    )  # the source is part of it


def test_too_short_and_overlapping(tiny_tokenizer, tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("the quick brown fox\n\njumps over the lazy dog\n")
    total = tokenize_stream(tiny_tokenizer, load_texts(str(f))).numel()
    with pytest.raises(CompressError, match=rf"has {total} tokens, fewer than one sample of --seq-len 512"):
        calibration_samples(tiny_tokenizer, str(f), num_samples=2, seq_len=512)
    s = calibration_samples(tiny_tokenizer, str(f), num_samples=3, seq_len=total - 1)
    assert s.overlapping and s.total_tokens == total and s.input_ids.shape == (3, total - 1)
    exact = calibration_samples(tiny_tokenizer, str(f), num_samples=1, seq_len=total)
    assert not exact.overlapping
    with pytest.raises(CompressError, match="must be positive"):
        calibration_samples(tiny_tokenizer, str(f), num_samples=0, seq_len=4)


def test_eval_windows_non_overlapping(tiny_tokenizer, corpus_txt: Path) -> None:
    stream = tokenize_stream(tiny_tokenizer, load_texts(str(corpus_txt)))
    w = eval_windows(tiny_tokenizer, str(corpus_txt), seq_len=50)
    assert w.shape == (stream.numel() // 50, 50)
    assert torch.equal(w.flatten(), stream[: w.numel()])  # consecutive, no overlap, tail dropped
    assert eval_windows(tiny_tokenizer, str(corpus_txt), seq_len=50, max_windows=2).shape == (2, 50)
    with pytest.raises(CompressError, match="fewer than one window of --seq-len"):
        eval_windows(tiny_tokenizer, str(corpus_txt), seq_len=stream.numel() + 1)


def test_progress_callback(tiny_tokenizer, corpus_texts) -> None:
    calls: list[tuple[str, int, int]] = []
    tokenize_stream(tiny_tokenizer, corpus_texts, progress=lambda *a: calls.append(a))
    assert calls and calls[-1] == ("tokenize", len(corpus_texts), len(corpus_texts))


@pytest.mark.skipif(not BUILTIN_CORPORA["demo-calib"].is_file(), reason="embedded corpus not built yet")
def test_builtin_corpus_loads() -> None:
    texts = load_texts("demo-calib")
    assert texts and all(isinstance(t, str) and t for t in texts)
