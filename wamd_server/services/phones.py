"""Phone numbers: parsed with libphonenumber, stored as E.164 digits without '+' (as in WhatsApp JIDs)."""

from __future__ import annotations

import phonenumbers

from wamd_server.domain.errors import InvalidInput


def normalise_phone(raw: str, default_region: str = "MY", *, field: str = "phone") -> str:
    """'012-345 6789' (MY) → '60123456789'. A number with a leading '+' or 00 ignores the default region."""
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else default_region)
    except phonenumbers.NumberParseException:
        raise InvalidInput(f"not a phone number: {raw!r}", {"field": field}) from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidInput(f"not a valid phone number: {raw!r}", {"field": field})
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).lstrip("+")
