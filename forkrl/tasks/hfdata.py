"""Task rows from local Hugging Face ``datasets`` data, read offline: a Parquet, Arrow, CSV or JSON-array file, or a
directory written by ``save_to_disk`` (a Dataset, or a DatasetDict with one split chosen by name).

JSON Lines files (``.jsonl``, and a ``.json`` file holding one object per line) do not come here: forkrl's own
bounded reader names their errors by file and line. A row from here is named ``<path>[row N]`` (N from 0, as in
``dataset[N]``); for a DatasetDict split the path is the split's own directory, ``<dir>/<split>``.

Values reach forkrl as plain Python (``int``, ``str``, ``list``, ``dict``...), never numpy or arrow scalars, so a
reward reading ``meta`` sees what it would have seen from the equivalent JSONL row. Columnar formats have one schema
for all rows: a key missing from some rows of the original data is ``None`` in those rows.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .base import TaskError

KINDS = {".parquet": "a Parquet file", ".arrow": "an Arrow file", ".csv": "a CSV file", ".json": "a JSON file"}
_BATCH = 1024


def is_dataset_source(path: Path) -> bool:
    """Whether ``path`` is read here rather than as JSON Lines: a directory, a ``.parquet``/``.arrow``/``.csv``
    file, or a ``.json`` file whose first non-blank character is ``[`` (a JSON array of objects)."""
    if path.is_dir():
        return True
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow", ".csv"):
        return path.is_file()
    if suffix == ".json" and path.is_file():
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        return head.startswith(b"[")
    return False


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets' progress bars off while forkrl reads (a task is read in well under a second), then as they were."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _arrow_file(path: Path):
    """An ``.arrow`` file: the stream format ``datasets`` writes (``save_to_disk`` shards, its cache), else the
    Arrow IPC file format (``pyarrow.feather``, ``pyarrow.ipc.new_file``)."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_file(str(path), in_memory=True)
    except pa.ArrowInvalid:
        with pa.memory_map(str(path)) as source:
            return datasets.Dataset(pa.ipc.open_file(source).read_all())


def _saved(path: Path, split: str | None, option: str, split_option: str):
    """A ``save_to_disk`` directory: (the Dataset, the path its rows are named by)."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if split is None:
            raise TaskError(f"{option}={str(path)!r} is a DatasetDict with splits {', '.join(splits) or '(none)'}; "
                            f"choose one with {split_option}, e.g. {split_option}: {splits[0] if splits else 'train'}.")
        if split not in splits:
            raise TaskError(f"{split_option}={split!r} is not a split of {path}; its splits are: "
                            f"{', '.join(splits) or '(none)'}.")
        return datasets.load_from_disk(str(path / split), keep_in_memory=True), path / split
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        if split is not None:
            raise TaskError(f"{split_option}={split!r} is set, but {path} is a single Dataset, not a DatasetDict, so "
                            f"it has no splits: leave {split_option} unset.")
        return datasets.load_from_disk(str(path), keep_in_memory=True), path
    raise TaskError(f"{option}={str(path)!r} is a directory but not one written by datasets' save_to_disk (it has "
                    f"neither dataset_info.json with state.json, nor dataset_dict.json). Point {option} to a JSONL, "
                    f"Parquet, Arrow, CSV or JSON file, or to a save_to_disk directory.")


def _load(path: Path, split: str | None, option: str, split_option: str):
    import datasets

    if path.is_dir():
        return _saved(path, split, option, split_option)
    if split is not None:
        raise TaskError(f"{split_option}={split!r} is set, but {path} is a file, which has no splits: leave "
                        f"{split_option} unset (it selects a split of a DatasetDict saved with save_to_disk).")
    suffix = path.suffix.lower()
    if suffix == ".arrow":
        return _arrow_file(path), path
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(str(path)).metadata.num_rows == 0:  # datasets' reader fails on it with a riddle
            return datasets.Dataset.from_dict({}), path
    readers = {".parquet": datasets.Dataset.from_parquet, ".csv": datasets.Dataset.from_csv,
               ".json": datasets.Dataset.from_json}
    # a throwaway cache: datasets converts the file to Arrow in its cache, which the user never asked for
    with tempfile.TemporaryDirectory(prefix="forkrl-data-") as cache:
        return readers[suffix](str(path), cache_dir=cache, keep_in_memory=True), path


def plain(value: Any, where: str, key: str) -> Any:
    """``value`` as JSON-like Python: numpy and arrow scalars to ``int``/``float``/``str``, arrays to lists, dates to
    ISO text, decimals to text (exact). Anything else (bytes, images...) is refused, naming the field."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, where, key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, where, key) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if type(value).__module__ == "numpy":
        return plain(value.tolist(), where, key)  # a numpy scalar's tolist() is its Python value
    raise TaskError(f"{where}: field {key!r} holds {type(value).__name__} data, which forkrl cannot keep as task data "
                    f"(it keeps text, numbers, lists and objects). Drop the column (Dataset.remove_columns) or convert "
                    f"it to text before saving.")


def read_rows(path: Path, split: str | None, option: str, split_option: str) -> list[tuple[str, int, dict]]:
    """(the path rows are named by, N from 0, row N as plain Python) for every row of a datasets source; row N is
    ``f"{path}[row {N}]"`` in messages. ``option`` and ``split_option`` are the config keys naming the path and the
    split, for messages."""
    if not path.exists():
        raise TaskError(f"task data file {path} does not exist. Check {option} "
                        f"(relative paths are from the working directory).")
    kind = "a save_to_disk directory" if path.is_dir() else KINDS[path.suffix.lower()]
    try:
        import datasets  # noqa: F401 - not a dependency of forkrl: only this kind of data needs it
    except ImportError:
        raise TaskError(f"{path} is {kind}, which forkrl reads with the Hugging Face datasets library, and that is "
                        f"not installed: pip install datasets (or convert the data to JSON Lines).") from None
    try:
        with _quiet():
            ds, shown = _load(path, split, option, split_option)
            batches = [batch.to_pylist() for batch in ds.with_format("arrow").iter(batch_size=_BATCH)]
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or mislabelled file; datasets and pyarrow raise many kinds
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise TaskError(f"{path}: cannot be read as {kind} ({type(e).__name__}: {reason}). Check that {option} "
                        f"points to {kind} (load it with the datasets library to see why not).") from None
    rows, n = [], 0
    for batch in batches:
        for row in batch:
            where = f"{shown}[row {n}]"
            rows.append((str(shown), n, {str(k): plain(v, where, str(k)) for k, v in row.items()}))
            n += 1
    if not rows:
        raise TaskError(f"task data {shown} ({kind}) has no rows. Check {option}.")
    return rows
