"""Reading the files a user gives forkrl, so that a bad one is one clear error and never a traceback.

* Text (a YAML config, a JSON Lines task file, a JSON file of a run) must be UTF-8; a UTF-8 byte-order mark is
  accepted. Bytes that are not UTF-8 are an error naming the file, the line, the column and the byte offset.
* Sizes are bounded before anything is parsed or tokenized: a config file by ``MAX_CONFIG_BYTES``, a JSON Lines
  line by the reader's bound, read in pieces of at most that size, so a huge line is refused quickly and in
  bounded memory.
* A model directory's files (``config.json``, the tokenizer's files, the safetensors headers) are checked one by
  one when loading fails, so the error names the damaged file (``damaged_model_file``).

``error`` is the exception class the caller's users see (``ConfigError``, ``TaskError``, ``ModelLoadError``); the
command line prints any of them and exits with status 2.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

BOM = b"\xef\xbb\xbf"
MAX_CONFIG_BYTES = 4 << 20  # a YAML config is a few kilobytes; a larger file is not one


def _not_utf8(path, data: bytes, start: int, offset: int, what: str, line: int | None = None) -> str:
    """The message for a byte at ``data[start]`` (file offset ``offset``; on ``line``, by default the line of
    ``data`` it is on) that does not decode as UTF-8."""
    line = line if line is not None else data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return (f"{path}:{line}: not UTF-8 text (byte 0x{data[start]:02x} at byte offset {offset}, column {column}); "
            f"{what} must be UTF-8: save it with that encoding")


def decode(data: bytes, path, what: str, error: type[Exception]) -> str:
    """``data`` as UTF-8 text, a leading byte-order mark dropped; ``error`` naming the line and byte otherwise."""
    skip = len(BOM) if data.startswith(BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(_not_utf8(path, data, skip + e.start, skip + e.start, what)) from None


def read_text(path: Path, what: str, error: type[Exception], *, max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path`` (``what`` it is, for the message), at most ``max_bytes`` long if given."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"{path} is {size:,} bytes, more than {what} can be ({max_bytes:,}); is it the right file?")
        return decode(path.read_bytes(), path, what, error)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: Path, what: str, error: type[Exception]):
    """The JSON value in ``path``; ``error`` with the line and column where it does not parse."""
    try:
        return json.loads(read_text(path, what, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); {what} is damaged") from None


def lines(path: Path, what: str, error: type[Exception], *, max_line_bytes: int,
          advice: str = "is it the right file?") -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line of ``path``, decoded as UTF-8 (a byte-order mark accepted on the
    first line). A line longer than ``max_line_bytes`` is refused after reading that much of it, not all of it
    (the message ends with ``advice``)."""
    offset = 0
    with open(path, "rb") as f:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n")):
                raise error(f"{path}:{number}: a line longer than {max_line_bytes:,} bytes (from byte offset "
                            f"{offset}); each line of {what} is one record: {advice}")
            skip = len(BOM) if number == 1 and raw.startswith(BOM) else 0
            try:
                text = raw[skip:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(_not_utf8(path, raw, skip + e.start, offset + skip + e.start, what, number)) from None
            yield number, text
            offset += len(raw)


def json_objects(path: Path, what: str, error: type[Exception], *, max_line_bytes: int, advice: str,
                 shape: str = "{...}") -> Iterator[tuple[str, dict]]:
    """(``path:line``, the object) of every non-blank line of a JSON Lines file, read as ``lines`` reads it; a line
    that is not one JSON object (``shape`` shows the expected one) is ``error`` naming file:line."""
    for number, line in lines(path, what, error, max_line_bytes=max_line_bytes, advice=advice):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: invalid JSON ({e.msg} at column {e.colno}). "
                        f"Each line must be one complete JSON object, {shape}.") from None
        except RecursionError:
            raise error(f"{where}: JSON nested too deeply to read.") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object ({shape}), got {type(row).__name__}.")
        yield where, row


def _safetensors_header(path: Path) -> str | None:
    """What is wrong with a safetensors file's header, or None: 8 bytes of header length, then that much JSON."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors file (empty or truncated)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            return f"its header claims {n:,} bytes but the file has {size - 8:,} after it (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not JSON (not a safetensors file, or damaged)"
    if not isinstance(header, dict):
        return "its header is not a JSON object (damaged)"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
               and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        return f"its tensors need {8 + n + end:,} bytes but the file has {size:,} (truncated)"
    return None


def damaged_model_file(directory: Path) -> str | None:
    """The first damaged file of a model directory and what is wrong with it, or None when none is found."""
    directory = Path(directory)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json",
                 "special_tokens_map.json", "model.safetensors.index.json", "adapter_config.json"):
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            try:
                json.loads(decode(data, path, "a model file", ValueError))
            except ValueError as e:
                return str(e) if str(path) in str(e) else f"{path}: not valid JSON ({e})"
    for name in ("chat_template.jinja", "vocab.json", "merges.txt"):
        path = directory / name
        if path.is_file():
            try:
                decode(path.read_bytes(), path, "a tokenizer file", ValueError)
            except ValueError as e:
                return str(e)
    for path in sorted(directory.glob("*.safetensors")):
        why = _safetensors_header(path)
        if why is not None:
            return f"{path}: {why}"
    return None
