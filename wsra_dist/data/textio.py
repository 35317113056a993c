"""Text files the user gives (annotations, duration csvs, prediction files, recipes), read as UTF-8.

Every reader of such a file goes through here for two reasons: a file in another encoding must be refused
naming the file and the line of its first bad byte (Python's codec message names neither: "'utf-8' codec
can't decode byte 0xe9 in position 40137"), and prediction files are read with a bounded readline, so one
huge line cannot take the machine's memory before it is refused (a 190 MB line took 2.8 GB).

A leading UTF-8 byte-order mark is dropped: spreadsheet tools write one, and it would otherwise become part
of the first id or column name.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

from .records import DataError

UTF8_BOM = b"\xef\xbb\xbf"


def decode(data: bytes, path: str | Path, first_line: int = 1, error: type[Exception] = DataError) -> str:
    """`data` (bytes of `path` starting at line `first_line`) as text, or `error` naming the file and the line
    and byte of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1  # 1-based byte in its line
        raise error(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte {column} of the "
                    "line); save the file as UTF-8") from None


def read_text(path: str | Path, what: str, error: type[Exception] = DataError) -> str:
    """The whole file as text (a leading BOM dropped); `error` names the file (and line) when it cannot be read
    or is not UTF-8.  `what` says what the file is for in the message ("annotations", "durations", ...)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    return decode(data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data, path, error=error)


def bounded_lines(f: BinaryIO, path: str | Path, max_bytes: int,
                  error: type[Exception] = DataError) -> Iterator[tuple[int, str]]:
    """(line number, text) of every line of the binary file `f`, each read with readline(max_bytes + 1): a line
    longer than `max_bytes` bytes (its line end included) is refused naming the file and line as soon as that
    many bytes are read, so memory stays bounded by `max_bytes` whatever the file holds."""
    number = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes:
            raise error(f"{path}: line {number}: longer than {max_bytes:,} bytes (the limit for one line of this "
                        "file); refused without reading the rest of it")
        if number == 1 and raw.startswith(UTF8_BOM):
            raw = raw[len(UTF8_BOM):]
        yield number, decode(raw, path, number, error)
