"""Identifiers in WhatsApp's formats."""

from __future__ import annotations

import secrets

USER_SERVER = "s.whatsapp.net"
GROUP_SERVER = "g.us"


def new_message_id() -> str:
    """A message id in the form WhatsApp web clients use (``3EB0`` + 18 upper-case hex digits)."""
    return "3EB0" + secrets.token_hex(9).upper()


def user_jid(phone: str) -> str:
    return f"{phone}@{USER_SERVER}"


def phone_of(jid: str) -> str:
    """Digits of a user JID: ``60123:4@s.whatsapp.net`` → ``60123``."""
    user = jid.split("@", 1)[0]
    return user.split(":", 1)[0].split(".", 1)[0]


def is_group(jid: str) -> bool:
    return jid.endswith("@" + GROUP_SERVER)
