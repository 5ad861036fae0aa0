"""Rows from parquet, json (an array), jsonl, csv and txt files, each with its 1-based row
number; a row that cannot be decoded comes back as a ``BadRow`` carrying the reason (after
``materialize``), so the caller counts and reports it instead of losing it."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple, Union

from recipes.errors import BadInput, MissingInput

EXTENSIONS = (".parquet", ".json", ".jsonl", ".csv", ".txt")


@dataclass
class BadRow:
    reason: str


Row = Tuple[int, Union[dict, BadRow]]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"non-UTF-8 bytes at byte {e.start}") from None


@dataclass
class RawLine:
    """A jsonl line still in bytes: decoded and parsed by ``materialize`` in a worker, so
    ``--workers`` parallelises the parsing as well as the tokenising."""

    data: bytes


def materialize(record):
    if not isinstance(record, RawLine):
        return record
    raw = record.data
    if not raw.strip():
        return BadRow("blank line")
    try:
        line = _decode(raw)
    except ValueError as e:
        return BadRow(str(e))
    try:
        obj = json.loads(line)
    except ValueError as e:
        return BadRow(f"malformed JSON: {e}")
    return obj if isinstance(obj, dict) else BadRow(f"expected a JSON object, got {type(obj).__name__}")


def _jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            yield i, RawLine(raw)


def _json(path: Path) -> Iterator[Row]:
    raw = path.read_bytes()
    try:
        data = json.loads(_decode(raw))
    except ValueError as e:
        raise BadInput(f"{path}: not a readable JSON document ({e}); use .jsonl for one object per line") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise BadInput(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, obj in enumerate(data, start=1):
        yield i, obj if isinstance(obj, dict) else BadRow(f"expected a JSON object, got {type(obj).__name__}")


def _csv(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        text = f.read()
    try:
        decoded = _decode(text)
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
    reader = csv.DictReader(io.StringIO(decoded, newline=""))
    for i, row in enumerate(reader, start=1):
        if None in row:
            yield i, BadRow(f"{len(row[None])} more fields than the header's {len(reader.fieldnames)}")
        else:
            yield i, dict(row)


def _txt(path: Path) -> Iterator[Row]:
    """One document per line (as Megatron's preprocess_data treats loose text)."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                yield i, {"text": _decode(raw).rstrip("\n")}
            except ValueError as e:
                yield i, BadRow(str(e))


def _parquet(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet as pq

    i = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                i += 1
                yield i, rec
    except (pyarrow.ArrowException, OSError) as e:  # truncated file, bad compressed pages
        where = f"after row {i}" if i else "before its first row"
        raise BadInput(f"{path}: not a readable parquet file ({e}), {where}; re-export or drop it") from None


def read_rows(path: Union[str, Path]) -> Iterator[Row]:
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"input not found: {path}")
    readers = {".parquet": _parquet, ".json": _json, ".jsonl": _jsonl, ".csv": _csv, ".txt": _txt}
    try:
        reader = readers[path.suffix.lower()]
    except KeyError:
        raise BadInput(f"{path}: unsupported extension {path.suffix!r}; expected one of {', '.join(EXTENSIONS)}") from None
    return reader(path)


def input_files(spec: str):
    """A file, or a folder (every supported file in it, sorted)."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS)
        if not files:
            raise MissingInput(f"no {'/'.join(EXTENSIONS)} files in {spec}")
        return files
    if not p.is_file():
        raise MissingInput(f"input not found: {spec}")
    return [p]
