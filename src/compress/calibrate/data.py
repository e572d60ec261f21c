"""Calibration and evaluation data: a ``--dataset SOURCE`` string in, token tensors out.

A SOURCE is one of, tried in this order:

- a built-in corpus name: ``demo-calib`` (the calibration split shipped with the package) or ``demo-heldout``
  (held-out text for perplexity; never used for calibration, so eval does not reward overfitting);
- an existing local file or folder, optionally followed by ``#column``: ``.txt``, ``.json`` / ``.jsonl`` /
  ``.parquet`` / ``.csv`` (the text is the ``#column`` if given, else the ``text`` column, else the first string
  column); a folder means every supported file under it, in sorted path order;
- a Hugging Face Hub dataset written ``id[:config][@split][#column]``, for example
  ``Salesforce/wikitext:wikitext-2-raw-v1@test#text`` or ``allenai/c4:en@train[:2000]``. The split defaults to
  ``train`` and accepts the datasets slicing syntax, which is how to take a small part of a big corpus.

What a document is (the protocol; it decides where BOS/EOS go, so it moves perplexity):

- a plain ``.txt`` file is ONE document: the whole file's text, newlines kept, as lm-eval and the papers score
  wikitext. Only when a ``doc_separator`` is given (recipe ``calibration.doc_separator`` /
  ``eval.doc_separator``, e.g. ``"\\n\\n"``) is the text split at it into documents (each stripped, blank
  ones dropped);
- a row of a JSON / JSONL / CSV / parquet file or of a hub dataset is one document (stripped, blank rows
  dropped), whatever ``doc_separator`` says; the built-in corpora are JSONL, so they are one document per row.

Documents are tokenized without special tokens and joined with EOS (SEP for encoders) into one stream;
calibration takes GPTQ-style random windows from it, evaluation takes consecutive non-overlapping windows.
Everything is deterministic for a seed, and a fingerprint of the exact token ids goes into the manifest.

:func:`check_source` does what can be decided before a model loads: it parses the SOURCE and, for local
files, checks they exist, have a supported suffix and are not empty (hub ids cannot be checked offline).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from compress.core.errors import CompressError

__all__ = [
    "BUILTIN_CORPORA",
    "DatasetSpec",
    "TokenSamples",
    "calibration_samples",
    "check_source",
    "eval_windows",
    "load_texts",
    "parse_source",
    "tokenize_stream",
]

Progress = Callable[[str, int, int], None]

_CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
BUILTIN_CORPORA: dict[str, Path] = {
    "demo-calib": _CORPUS_DIR / "calibration.jsonl",
    "demo-heldout": _CORPUS_DIR / "heldout.jsonl",
}

# file suffix → the datasets packaged loader that reads it
_LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_RE = re.compile(
    r"^(?P<id>[A-Za-z0-9][\w.\-]*(?:/[\w.\-]+)?)"
    r"(?::(?P<config>[^@#]+))?(?:@(?P<split>[^#]+))?(?:#(?P<column>.+))?$"
)
_TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed SOURCE. ``path`` is the corpus name (builtin), the absolute file/folder (local) or the hub id."""

    kind: Literal["builtin", "local", "hub"]
    path: str
    config: str | None = None
    split: str | None = None
    column: str | None = None


@dataclass(frozen=True)
class TokenSamples:
    """Calibration windows plus what the manifest and the CLI need to describe them."""

    input_ids: Tensor  # long [num_samples, seq_len]
    fingerprint: str  # sha256: same value ⇔ same calibration tokens from the same recipe inputs
    total_tokens: int  # tokens in the whole stream the windows were drawn from
    overlapping: bool  # num_samples * seq_len > total_tokens: the windows must share tokens (caller warns)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or Path(spec.split("#")[0]).suffix in _LOADERS


def parse_source(spec: str) -> DatasetSpec:
    """Classify a SOURCE string (see the module docstring); a missing local path is an error here."""
    if spec in BUILTIN_CORPORA:
        return DatasetSpec("builtin", spec, column="text")
    path, column = Path(spec).expanduser(), None
    if not path.exists() and "#" in spec:
        head, _, column = spec.rpartition("#")
        path = Path(head).expanduser()
        if not path.exists():
            path, column = Path(spec).expanduser(), None
    if path.exists():
        return DatasetSpec("local", str(path.resolve()), column=column or None)
    if _looks_like_path(spec):
        raise CompressError(f"dataset file '{spec}' does not exist")
    m = _HUB_RE.match(spec)
    if m is None:
        raise CompressError(
            f"dataset '{spec}' is not a built-in corpus, an existing file or folder, or a hub id written "
            "id[:config][@split][#column]"
        )
    return DatasetSpec("hub", m["id"], m["config"], m["split"], m["column"])


def _label(spec: str | DatasetSpec) -> str:
    return spec if isinstance(spec, str) else spec.path


def _pick_column(ds, column: str | None, label: str) -> str:
    """``#column`` if given, else ``text``, else the first string column: the one users almost always mean."""
    names = list(ds.column_names)
    if column is not None:
        if column not in names:
            raise CompressError(f"dataset '{label}' has no column '{column}' (columns: {', '.join(names)})")
        return column
    if "text" in names:
        return "text"
    for name, feature in ds.features.items():
        if getattr(feature, "dtype", None) in ("string", "large_string"):
            return name
    raise CompressError(f"dataset '{label}' has no text column (columns: {', '.join(names) or 'none'})")


def _texts_of(ds, column: str | None, label: str) -> list[str]:
    col = _pick_column(ds, column, label)
    return [t.strip() for t in ds[col] if isinstance(t, str) and t.strip()]


def _local_files(path: Path, label: str) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in _LOADERS:
            raise CompressError(
                f"dataset file '{label}' has unsupported extension '{path.suffix}'; use .txt, .json, .jsonl, "
                ".parquet or .csv"
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _LOADERS
        and not any(s.startswith(".") for s in p.relative_to(path).parts)
    )
    if not files:
        raise CompressError(f"dataset folder '{label}' has no .txt, .json, .jsonl, .parquet or .csv files")
    return files


def _root_reason(exc: BaseException) -> str:
    """The innermost cause's first line ("JSON parse error: ... in row 1"), not datasets' generic wrapper."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0][:200].rstrip(".") if text else type(exc).__name__


_NO_TEXT = "has no text (it is empty, holds only blank lines, or has no rows with text)"


def _is_blank(path: Path) -> bool:
    """True when the file holds nothing but whitespace (read until the first other byte)."""
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                if chunk.strip():
                    return False
    except OSError as error:
        raise CompressError(f"could not read dataset file '{path}' ({error.strerror})") from None
    return True


def _read_txt(path: Path, column: str | None, label: str, doc_separator: str | None) -> list[str]:
    """A plain text file: one document (the whole text), or pieces at ``doc_separator``."""
    if column not in (None, "text"):
        raise CompressError(f"dataset '{label}' has no column '{column}' (columns: text)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompressError(f"dataset file '{path}' is not UTF-8 text") from None
    except OSError as error:
        raise CompressError(f"could not read dataset file '{path}' ({error.strerror})") from None
    if doc_separator is None:
        return [text] if text.strip() else []
    return [piece.strip() for piece in text.split(doc_separator) if piece.strip()]


def _load_local(files: Sequence[Path], column: str | None, label: str,
                doc_separator: str | None = None) -> list[str]:
    import datasets

    texts: list[str] = []
    for f in files:
        builder = _LOADERS[f.suffix.lower()]
        if builder == "text":
            texts.extend(_read_txt(f, column, label, doc_separator))
            continue
        if _is_blank(f):  # datasets would fail on it with its own internals ("StopIteration", "no columns")
            continue
        try:
            ds = datasets.load_dataset(builder, data_files=[str(f)], split="train")
        except Exception as exc:  # arrow / json / csv parse errors all mean an unreadable file
            if "corresponds to no data" in str(exc):  # a CSV header without rows, say
                continue
            raise CompressError(f"could not read dataset file '{f}': {_root_reason(exc)}") from exc
        texts.extend(_texts_of(ds, column, label))
    return texts


def _load_hub(spec: DatasetSpec, label: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.path, spec.config, split=spec.split or "train")
    except Exception as exc:
        chain, e = [], exc
        while e is not None and e not in chain:
            chain.append(e)
            e = e.__cause__ or e.__context__
        names = {type(x).__name__ for x in chain}
        # offline first: datasets chains a "not cached" FileNotFoundError under its ConnectionError
        if names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError"}:
            raise CompressError(
                f"dataset '{label}' is not a local path or built-in corpus, and the Hugging Face Hub is unreachable"
            ) from exc
        if names & {"DatasetNotFoundError", "RepositoryNotFoundError"}:
            raise CompressError(
                f"dataset '{label}' is not a local path, a built-in corpus or a dataset on the Hugging Face Hub"
            ) from exc
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"could not load dataset '{label}' from the Hugging Face Hub: {reason}") from exc
    return _texts_of(ds, spec.column, label)


def check_source(spec: str | DatasetSpec) -> DatasetSpec:
    """The parsed SOURCE, refused in one sentence if a local path is missing, unsupported or empty, so a
    bad ``--dataset`` is caught before any weights load (``--dry-run`` too). Hub ids are not checked."""
    label = _label(spec)
    parsed = parse_source(spec) if isinstance(spec, str) else spec
    if parsed.kind == "builtin":
        path = BUILTIN_CORPORA[parsed.path]
        if not path.is_file():
            raise CompressError(f"built-in corpus '{parsed.path}' is missing from this installation ({path})")
    elif parsed.kind == "local":
        path = Path(parsed.path)
        if not path.exists():
            raise CompressError(f"dataset file '{label}' does not exist")
        files = _local_files(path, label)
        if path.is_file() and _is_blank(files[0]):
            raise CompressError(f"dataset file '{label}' {_NO_TEXT}")
    return parsed


def load_texts(spec: str | DatasetSpec, doc_separator: str | None = None) -> list[str]:
    """The non-empty documents of a SOURCE, in file order; every user mistake is a ``CompressError``.

    ``doc_separator`` splits plain ``.txt`` files into documents; without it each ``.txt`` file is one."""
    label = _label(spec)
    parsed = check_source(spec)
    if parsed.kind == "builtin":
        texts = _load_local([BUILTIN_CORPORA[parsed.path]], parsed.column, label, doc_separator)
    elif parsed.kind == "local":
        path = Path(parsed.path)
        texts = _load_local(_local_files(path, label), parsed.column, label, doc_separator)
    else:
        texts = _load_hub(parsed, label)
    if not texts:
        what = "dataset file" if parsed.kind == "local" and Path(parsed.path).is_file() else "dataset"
        raise CompressError(f"{what} '{label}' {_NO_TEXT}")
    return texts


def tokenize_stream(tokenizer, texts: Sequence[str], progress: Progress | None = None) -> Tensor:
    """One long [N] token stream: each document encoded as the tokenizer frames it (BOS for Llama-style
    tokenizers, CLS ... SEP for BERT), documents separated by EOS (SEP for encoders) unless the framing
    already ends with it.

    That is how packed pretraining data looks (``<s> doc </s> <s> doc ...``), so calibration and eval
    windows show the model what it saw in training; dropping the BOS a model always saw at a document start
    measurably inflates perplexity (16% on the demo model).
    """
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        encoded = tokenizer(batch, add_special_tokens=True, verbose=False)["input_ids"]
        for doc in encoded:
            if ids and sep is not None and ids[-1] != sep:
                ids.append(sep)
            ids.extend(doc)
        if progress is not None:
            progress("tokenize", min(start + _TOKENIZE_BATCH, len(texts)), len(texts))
    return torch.tensor(ids, dtype=torch.long)


def _vocab_hash(tokenizer) -> str:
    """Identifies the tokenizer by what it does (its vocabulary), not by where it was loaded from."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def _spec_text(source: str | DatasetSpec) -> str:
    return source if isinstance(source, str) else json.dumps(asdict(source), sort_keys=True)


def calibration_samples(
    tokenizer,
    source: str | DatasetSpec,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    progress: Progress | None = None,
    doc_separator: str | None = None,
) -> TokenSamples:
    """``num_samples`` random ``seq_len`` windows of the stream (GPTQ-style), reproducible for a seed."""
    if num_samples < 1 or seq_len < 1:
        raise CompressError(f"--num-samples and --seq-len must be positive (got {num_samples} and {seq_len})")
    stream = tokenize_stream(tokenizer, load_texts(source, doc_separator), progress)
    total = int(stream.numel())
    if total < seq_len:
        raise CompressError(
            f"dataset {_label(source)} has {total} tokens, fewer than one sample of --seq-len {seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seq_len + 1, (num_samples,), generator=gen)
    input_ids = stream[starts[:, None] + torch.arange(seq_len)]
    header = {
        "source": _spec_text(source),
        "tokenizer": _vocab_hash(tokenizer),
        "seed": seed,
        "num_samples": num_samples,
        "seq_len": seq_len,
    }
    if doc_separator is not None:  # absent otherwise, so fingerprints from before the field are unchanged
        header["doc_separator"] = doc_separator
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(input_ids.numpy().astype("<i8").tobytes())
    return TokenSamples(
        input_ids=input_ids,
        fingerprint=digest.hexdigest(),
        total_tokens=total,
        overlapping=num_samples * seq_len > total,
    )


def eval_windows(
    tokenizer,
    source: str | DatasetSpec,
    seq_len: int,
    max_windows: int | None = None,
    progress: Progress | None = None,
    doc_separator: str | None = None,
) -> Tensor:
    """Consecutive non-overlapping [W, seq_len] windows over the whole stream; the short tail is dropped."""
    if seq_len < 1:
        raise CompressError(f"--seq-len must be positive (got {seq_len})")
    stream = tokenize_stream(tokenizer, load_texts(source, doc_separator), progress)
    windows = stream.numel() // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CompressError(
            f"dataset {_label(source)} has {stream.numel()} tokens, fewer than one window of --seq-len {seq_len}"
        )
    return stream[: windows * seq_len].view(windows, seq_len).clone()
