"""Crash-safe file I/O shared by every stage.

Writes go to a temporary file in the same directory, are fsynced, then renamed over the target,
so a reader never sees a half-written manifest or JSONL: it sees the old file or the new one.
Readers name the file and line of any malformed row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml


class DataFileError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8"):
    """Yield a file handle whose content replaces `path` only if the block finishes."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_writer(path) as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSONL atomically; return the number of rows written."""
    count = 0
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, row) for each non-blank line; errors name file:line."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: file not found")
    with p.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(f"{p}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{p}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def iter_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL, JSON-list, or CSV file, or an HF dataset saved with save_to_disk."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{p}: file not found")
    if p.is_dir():
        from datasets import load_from_disk  # heavy import only when needed

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys") and not hasattr(ds, "column_names"):
            raise DataFileError(f"{p}: a DatasetDict; point at one split directory")
        for i, row in enumerate(ds, start=1):
            yield i, dict(row)
        return
    suffix = p.suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        yield from iter_jsonl(p)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{p}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise DataFileError(f"{p}: expected a JSON list of objects")
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise DataFileError(f"{p}: item {i} is not an object")
            yield i, row
    elif suffix in {".csv", ".tsv"}:
        with p.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield reader.line_num, dict(row)
    else:
        raise DataFileError(f"{p}: unsupported data format '{suffix}' (use .jsonl, .json, .csv, .tsv or a dataset dir)")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(child.relative_to(p)).encode())
            h.update(sha256_file(child).encode())
        return h.hexdigest()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: equal meaning -> equal string (used for hashing)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_id(inp: Any) -> str:
    """The id of a row whose data names none: `r-` + 12 hex characters of its input's hash. The one
    derivation generate, curate (test files) and the fixtures share; runs and teacher caches
    recorded with it keep their ids."""
    return "r-" + sha256_text(canonical_json(inp))[:12]


# -- YAML with line marks (recipes, training configs) ---------------------------------------------


class YamlSyntaxError(ValueError):
    """YAML that does not parse: the 1-based `line` of the parser's mark and its `problem`. Each
    caller words it in its own error type (a RecipeError, a training config CheckReport problem)."""

    def __init__(self, line: int, problem: str):
        self.line, self.problem = line, problem
        super().__init__(f"line {line}: {problem}")


def load_yaml_with_lines(text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """(data, line index) of a YAML document: the index maps every key path (mapping keys and list
    positions, e.g. ("datasets", 0, "path")) to its 1-based line, so a schema error can name the
    line. Raises YamlSyntaxError. An empty document is (None, {})."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise YamlSyntaxError(mark.line + 1 if mark else 1, str(getattr(exc, "problem", exc))) from None
    return data, yaml_line_index(node) if node is not None else {}


def yaml_line_index(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map every key path in a composed YAML tree to its 1-based line."""
    index: dict[tuple[Any, ...], int] = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            index[path + (key,)] = key_node.start_mark.line + 1
            for sub, line in yaml_line_index(value_node, path + (key,)).items():
                if sub != path + (key,):
                    index[sub] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            for sub, line in yaml_line_index(item, path + (i,)).items():
                index[sub] = line
    return index
