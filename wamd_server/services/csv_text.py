"""The text encoding of an uploaded lead CSV, decided as its rows arrive.

UTF-8 is the default. Excel on Windows saves "CSV (Comma delimited)" in the system's code page: Windows-1252 in
English and Malay locales, where a name like "José" arrives as bytes that are not UTF-8. ASCII reads the same in
both, so a file is read as UTF-8 until a row is not valid UTF-8: if no earlier row held anything beyond ASCII,
the file is Windows-1252 from there on (the earlier rows read the same either way); a file that already held
UTF-8 text is not, and that row fails. A UTF-8 byte order mark, or the import's `encoding` option, settles the
question at the start.
"""

from __future__ import annotations

UTF8 = "utf-8"
WINDOWS_1252 = "windows-1252"
# What the `encoding` option accepts (case-insensitive); "auto" and an empty value mean: decide from the file.
_NAMES = {"utf-8": UTF8, "utf8": UTF8, "windows-1252": WINDOWS_1252, "cp1252": WINDOWS_1252}
OPTION_VALUES = ("auto", UTF8, WINDOWS_1252)


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
        self._settled = encoding is not None
        self._saw_utf8 = False  # a record beyond ASCII decoded as UTF-8: the file is UTF-8

    def settle_utf8(self) -> None:
        """The file starts with a UTF-8 byte order mark."""
        if not self._settled:
            self.encoding, self._settled = UTF8, True

    def decode(self, data: bytes) -> str:
        """The record as text; ValueError with a sentence for the user when it is not text in the file's
        encoding."""
        if self.encoding == UTF8:
            try:
                text = data.decode(UTF8)
            except UnicodeDecodeError:
                if self._settled or self._saw_utf8:
                    why = "earlier rows are UTF-8" if self._saw_utf8 else "the file is read as UTF-8"
                    raise ValueError(f"the row is not valid UTF-8 text ({why}); save the file as CSV UTF-8") from None
                self.encoding, self._settled = WINDOWS_1252, True
            else:
                self._saw_utf8 = self._saw_utf8 or not data.isascii()
                return text
        try:
            return data.decode(WINDOWS_1252)
        except UnicodeDecodeError:
            raise ValueError(
                "the row is not Windows-1252 text (as the file is read); save the file as CSV UTF-8"
            ) from None
