"""Splitting a CSV byte stream into records as the bytes arrive, without holding the file.

Records end at a line break (`\\n`, `\\r\\n` or a lone `\\r`) outside quotes. A `"` opens a quoted value only at
the start of a value (as Python's `csv` reads it): a quoted value may hold delimiters, line breaks and doubled
quotes. Splitting works on bytes, which is safe for UTF-8 (no multi-byte sequence contains an ASCII byte), so
each record can be decoded on its own and one bad row never spoils the next.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

QUOTE = 0x22
CR = 0x0D
LF = 0x0A
SPECIAL = re.compile(rb'[\r\n"]')
DEFAULT_MAX_RECORD = 1024 * 1024


@dataclass(frozen=True)
class Record:
    data: bytes  # without the line break; empty when `problem` says the record was too long to keep
    problem: str | None = None


class RecordSplitter:
    """Feed chunks in order; each `feed` yields the records the chunk completes, `finish` the last one.

    `delimiters` are the bytes after which a quote opens a quoted value; set it to the file's delimiter once
    the header is known (before that any of `,;\\t` counts). A record longer than `max_record` bytes (usually
    an unclosed quote that swallowed the rest of the file) is reported with a problem instead of being kept,
    so memory stays bounded whatever the input.
    """

    def __init__(self, max_record: int = DEFAULT_MAX_RECORD) -> None:
        self.delimiters = b",;\t"
        self.max_record = max_record
        self._buf = bytearray()
        self._in_quotes = False
        self._quote_pending = False  # inside quotes, the last byte was a quote: closing, or the first of ""
        self._skip_lf = False  # the last record ended with \r: a \n starting the next chunk belongs to it
        self._oversized = False
        self._last = -1  # last byte of the current record (kept even when an oversized record is dropped)

    def feed(self, data: bytes) -> Iterator[Record]:
        n = len(data)
        i = 0
        if self._skip_lf and n:
            self._skip_lf = False
            if data[0] == LF:
                i = 1
        start = i  # where the current record's bytes begin in `data`
        while i < n:
            if self._in_quotes:
                if self._quote_pending:
                    self._quote_pending = False
                    if data[i] == QUOTE:  # "" is a quote inside the value
                        i += 1
                        continue
                    self._in_quotes = False  # the quote closed the value; look at this byte again unquoted
                    continue
                j = data.find(b'"', i)
                if j < 0:
                    break
                i = j + 1
                self._quote_pending = True
                continue
            match = SPECIAL.search(data, i)
            if match is None:
                break
            j = match.start()
            byte = data[j]
            if byte == QUOTE:
                previous = data[j - 1] if j > start else self._last
                if previous < 0 or previous in self.delimiters:
                    self._in_quotes = True
                i = j + 1
                continue
            yield self._end(data[start:j])
            i = j + 1
            if byte == CR:
                if i < n:
                    if data[i] == LF:
                        i += 1
                else:
                    self._skip_lf = True
            start = i
        self._keep(data[start:n])

    def finish(self) -> Iterator[Record]:
        """The last record, if the stream did not end with a line break."""
        if self._in_quotes and not self._quote_pending:
            self._in_quotes = False
            if self._oversized:
                yield self._end(b"")
            else:
                data = bytes(self._buf)
                self._reset()
                yield Record(data, 'a quoted value is not closed (a " is missing)')
            return
        self._in_quotes = self._quote_pending = False
        if self._buf or self._oversized:
            yield self._end(b"")

    def _keep(self, part: bytes) -> None:
        if not part:
            return
        self._last = part[-1]
        if self._oversized:
            return
        self._buf += part
        if len(self._buf) > self.max_record:
            self._oversized = True
            self._buf.clear()

    def _end(self, tail: bytes) -> Record:
        if self._oversized or len(self._buf) + len(tail) > self.max_record:
            record = Record(b"", f"the row is longer than {self.max_record // 1024} KiB (is a quote not closed?)")
        else:
            record = Record(bytes(self._buf) + tail if self._buf else bytes(tail))
        self._reset()
        return record

    def _reset(self) -> None:
        self._buf.clear()
        self._oversized = False
        self._last = -1
