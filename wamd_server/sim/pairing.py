"""Pairing sessions: rotating, expiring QR codes and phone codes, until a phone confirms one or time is up."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from wamd_server.sim.config import SimConfig
from wamd_server.sim.errors import SimConflict, SimNotFound

if TYPE_CHECKING:
    from wamd_server.sim.link import Link

log = logging.getLogger(__name__)

# whatsmeow's alphabet for linking codes: no 0, O, I or U, so a code read aloud is unambiguous.
_PAIR_CODE_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTVWXYZ"


def _b64(n: int) -> str:
    return base64.b64encode(secrets.token_bytes(n)).decode()


def new_pair_code() -> str:
    chars = "".join(secrets.choice(_PAIR_CODE_ALPHABET) for _ in range(8))
    return f"{chars[:4]}-{chars[4:]}"


def normalize_pair_code(code: str) -> str:
    return code.strip().replace("-", "").replace(" ", "").upper()


class Pairing:
    """One device's attempt to link: shows QR codes (mode "qr") and/or waits for a phone code."""

    __slots__ = (
        "_static",
        "code_phone",
        "codes_shown",
        "expires_at",
        "link",
        "pair_code",
        "qr",
        "shows_qr",
        "sid",
        "timer",
    )

    def __init__(self, link: Link, sid: str, shows_qr: bool) -> None:
        self.link = link
        self.sid = sid
        self.shows_qr = shows_qr
        self.codes_shown = 0
        self.qr: str | None = None
        self.expires_at: datetime | None = None
        self.pair_code: str | None = None  # normalized (no dash)
        self.code_phone: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        # The key parts of a QR stay the same for a session; only the server reference rotates.
        self._static = f"{_b64(32)},{_b64(32)},{_b64(32)}"

    def next_qr(self) -> str:
        return f"2@{_b64(33)},{self._static}"


class PairingRegistry:
    """Every running pairing session, indexed by current QR code, phone code and device session id."""

    def __init__(self, config: SimConfig) -> None:
        self._config = config
        self._by_qr: dict[str, Pairing] = {}
        self._by_code: dict[str, Pairing] = {}
        self._by_sid: dict[str, Pairing] = {}  # the latest session per sid, for GET /api/sim/qr/{sid}
        self._all: set[Pairing] = set()
        self._expired: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._all)

    # --- starting -------------------------------------------------------------------------------------

    def start_qr(self, link: Link, sid: str) -> Pairing:
        self.stop_sid(link, sid)
        pairing = self._register(link, sid, shows_qr=True)
        self._show_next_qr(pairing)
        return pairing

    def start_code(self, link: Link, sid: str, phone: str) -> str:
        """Attach a phone code to the sid's running QR session, or start a code-only one (no QR events)."""
        pairing = link.pairings.get(sid)
        if pairing is None:
            pairing = self._register(link, sid, shows_qr=False)
            pairing.timer = asyncio.get_running_loop().call_later(
                self._config.pairing_window_s, self._time_out, pairing
            )
        if pairing.pair_code is not None:
            self._by_code.pop(pairing.pair_code, None)
        code = new_pair_code()
        pairing.pair_code = normalize_pair_code(code)
        pairing.code_phone = phone
        self._by_code[pairing.pair_code] = pairing
        return code

    def _register(self, link: Link, sid: str, shows_qr: bool) -> Pairing:
        pairing = Pairing(link, sid, shows_qr)
        link.pairings[sid] = pairing
        self._by_sid[sid] = pairing
        self._all.add(pairing)
        return pairing

    # --- rotation -------------------------------------------------------------------------------------

    def _show_next_qr(self, pairing: Pairing) -> None:
        if pairing.qr is not None:
            self._forget_qr(pairing.qr)
        if pairing.codes_shown >= self._config.qr_codes:
            self._time_out(pairing)
            return
        ttl = self._config.qr_first_s if pairing.codes_shown == 0 else self._config.qr_next_s
        pairing.codes_shown += 1
        pairing.qr = pairing.next_qr()
        pairing.expires_at = datetime.now(UTC) + timedelta(seconds=ttl)
        self._by_qr[pairing.qr] = pairing
        pairing.timer = asyncio.get_running_loop().call_later(ttl, self._show_next_qr, pairing)
        pairing.link.push(
            {"ev": "qr", "sid": pairing.sid, "code": pairing.qr, "expires_at": pairing.expires_at.isoformat()}
        )

    def _time_out(self, pairing: Pairing) -> None:
        log.debug("pairing of %s timed out", pairing.sid)
        self.stop(pairing)
        pairing.link.push({"ev": "pair_timeout", "sid": pairing.sid})

    def _forget_qr(self, qr: str) -> None:
        self._by_qr.pop(qr, None)
        self._expired[qr] = None
        while len(self._expired) > self._config.expired_codes_kept:
            self._expired.popitem(last=False)

    # --- lookup ---------------------------------------------------------------------------------------

    def find_qr(self, qr: str) -> Pairing:
        qr = qr.strip()
        pairing = self._by_qr.get(qr)
        if pairing is not None:
            return pairing
        if qr in self._expired:
            raise SimConflict("this QR code has expired; scan the current one", code="qr_expired")
        raise SimNotFound("unknown QR code (not shown by any running pairing session)", code="unknown_qr")

    def find_code(self, code: str, phone: str) -> Pairing:
        pairing = self._by_code.get(normalize_pair_code(code))
        if pairing is None:
            raise SimNotFound("unknown or expired pairing code", code="unknown_code")
        if pairing.code_phone != phone:
            raise SimConflict(
                f"this code was requested for phone {pairing.code_phone}, not {phone}", code="wrong_phone"
            )
        return pairing

    def current_qr(self, sid: str) -> tuple[str, datetime]:
        pairing = self._by_sid.get(sid)
        if pairing is None or pairing.qr is None or pairing.expires_at is None:
            raise SimNotFound(f"no QR pairing session is running for {sid!r}", code="no_pairing")
        return pairing.qr, pairing.expires_at

    # --- stopping -------------------------------------------------------------------------------------

    def stop(self, pairing: Pairing) -> None:
        """End a session without telling its link (the caller decides what to tell)."""
        if pairing.timer is not None:
            pairing.timer.cancel()
            pairing.timer = None
        if pairing.qr is not None:
            self._forget_qr(pairing.qr)
            pairing.qr = None
        if pairing.pair_code is not None:
            self._by_code.pop(pairing.pair_code, None)
            pairing.pair_code = None
        if pairing.link.pairings.get(pairing.sid) is pairing:
            del pairing.link.pairings[pairing.sid]
        if self._by_sid.get(pairing.sid) is pairing:
            del self._by_sid[pairing.sid]
        self._all.discard(pairing)

    def stop_sid(self, link: Link, sid: str) -> None:
        pairing = link.pairings.get(sid)
        if pairing is not None:
            self.stop(pairing)

    def all(self) -> list[Pairing]:
        return list(self._all)

    def clear(self) -> None:
        for pairing in self.all():
            self.stop(pairing)
        self._expired.clear()
