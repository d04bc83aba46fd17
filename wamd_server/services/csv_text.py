"""The text encoding of an uploaded lead CSV: UTF-8, or Windows-1252.

UTF-8 is the default. Excel on Windows saves "CSV (Comma delimited)" in the system's code page: Windows-1252 in
English and Malay locales, where a name like "José" arrives as bytes that are not UTF-8. The file's first bytes
(`SNIFF_BYTES`, or the whole file) decide: UTF-8 if they hold UTF-8 text beyond ASCII (rows that are not valid
UTF-8 then fail), Windows-1252 if they hold bytes beyond ASCII and no UTF-8 character at all. A file whose start is
plain ASCII is read as UTF-8 until a row is not, and is Windows-1252 from there on (the earlier rows read the same
either way). A row that is UTF-8 text in a file found to be Windows-1252 fails rather than being read wrongly. A
UTF-8 byte order mark, or the import's `encoding` option, settles the question at the start.
"""

from __future__ import annotations

import re

UTF8 = "utf-8"
WINDOWS_1252 = "windows-1252"
LABELS = {UTF8: "UTF-8", WINDOWS_1252: "Windows-1252"}
SNIFF_BYTES = 64 * 1024
# What the `encoding` option accepts (case-insensitive); "auto" and an empty value mean: decide from the file.
_NAMES = {"utf-8": UTF8, "utf8": UTF8, "windows-1252": WINDOWS_1252, "cp1252": WINDOWS_1252}
OPTION_VALUES = ("auto", UTF8, WINDOWS_1252)
# One complete UTF-8 character beyond ASCII. Windows-1252 text almost never holds one: it would take an accented
# capital or symbol (0xC2-0xF4) followed by the right number of the bytes 0x80-0xBF (mostly punctuation there).
_UTF8_CHARACTER = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")


def encoding_option(value: str | None) -> str | None:
    """The encoding the option names, None for "decide from the file"; ValueError for anything else."""
    name = (value or "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in _NAMES:
        raise ValueError(f"encoding must be one of {', '.join(OPTION_VALUES)}")
    return _NAMES[name]


class RowDecoder:
    """Decodes a CSV's records (bytes without their line break) one after another, in file order."""

    def __init__(self, encoding: str | None) -> None:
        self.encoding = encoding or UTF8
        self._told = encoding is not None  # by the option: read as told, whatever the bytes look like
        self._settled = self._told

    def sniff(self, start: bytes) -> None:
        """Decide from the file's first bytes (with or without a UTF-8 byte order mark), unless already settled."""
        if self._settled or start.isascii():
            return
        try:
            start.decode(UTF8)
        except UnicodeDecodeError as exc:
            cut_at_end = exc.reason == "unexpected end of data" and exc.end == len(start)
            utf8 = cut_at_end or _UTF8_CHARACTER.search(start) is not None
            self.encoding = UTF8 if utf8 else WINDOWS_1252
        self._settled = True

    def settle_utf8(self) -> None:
        """The file starts with a UTF-8 byte order mark."""
        if not self._settled:
            self.encoding, self._settled = UTF8, True

    def decode(self, data: bytes) -> str:
        """The record as text; ValueError with a sentence for the user when it is not text in the file's
        encoding."""
        if self.encoding == UTF8:
            try:
                return data.decode(UTF8)
            except UnicodeDecodeError:
                if self._settled:
                    why = "the file is read as UTF-8" if self._told else "the file is UTF-8"
                    raise ValueError(f"the row is not valid UTF-8 text ({why}); save the file as CSV UTF-8") from None
                self.encoding, self._settled = WINDOWS_1252, True
        if not self._told and _UTF8_CHARACTER.search(data) and _is_utf8(data):
            raise ValueError("the row is UTF-8 text but the file is Windows-1252; save the whole file as CSV UTF-8")
        try:
            return data.decode(WINDOWS_1252)
        except UnicodeDecodeError:
            raise ValueError(
                "the row is not Windows-1252 text (as the file is read); save the file as CSV UTF-8"
            ) from None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode(UTF8)
    except UnicodeDecodeError:
        return False
    return True
