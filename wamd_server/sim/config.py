"""Tunable numbers of the simulated network. Defaults follow WhatsApp; tests shrink the timings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SimConfig:
    qr_first_s: float = 60.0  # lifetime of the first QR code of a pairing session
    qr_next_s: float = 20.0  # lifetime of each following code
    qr_codes: int = 6  # codes per pairing session, then `pair_timeout`
    max_linked: int = 4  # companion devices per account
    receipt_delay_s: float = 0.05  # between the server ack of a send and its `delivered` receipt
    offline_queue_max: int = 1000  # events kept per offline linked device; the oldest are dropped beyond
    inbox_max: int | None = None  # messages kept per phone inbox (None: all; tests count them exactly)
    expired_codes_kept: int = 10_000  # expired QR codes remembered, to answer "expired" rather than "unknown"

    @property
    def pairing_window_s(self) -> float:
        """How long a pairing session lives in all (about 160 s with the defaults)."""
        return self.qr_first_s + self.qr_next_s * max(self.qr_codes - 1, 0)
