"""`wamd-server --demo`: a throw-away server on SQLite and the in-process simulated network, with a demo
admin and three linked devices that contacts write to now and then, so the API and WebSocket show life."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from wamd_server.config import Config
from wamd_server.domain.models import DevicePatch, Role, User
from wamd_server.domain.ports import BusEvent
from wamd_server.protocol import events as ev
from wamd_server.runtime import Runtime
from wamd_server.services.campaigns import CampaignDraft
from wamd_server.services.leads import LeadInput
from wamd_server.web.context import CTX

log = logging.getLogger(__name__)

DEMO_EMAIL = "demo@wamd.local"
DEVICES = (("Sales 1", "60123000001"), ("Sales 2", "60123000002"), ("Support", "60123000003"))
CONTACTS = (
    ("60198000001", "Aisyah"),
    ("60198000002", "Ben"),
    ("60198000003", "Chong Wei"),
    ("60198000004", "Devi"),
    ("60198000005", "Farid"),
)
LINES = (
    "Hi, is this still available?",
    "Berapa harga untuk pakej premium?",
    "Can you send me the brochure?",
    "Terima kasih! Saya akan fikirkan dulu.",
    "What time do you open tomorrow?",
    "Boleh saya dapatkan sebut harga?",
    "Thanks, received.",
)
CHATTER_EVERY_S = (3.0, 8.0)


def demo_config(base: Config, data_dir: Path) -> Config:
    """Everything local and disposable: SQLite in `data_dir`, the simulated network in-process, no Redis."""
    return base.with_overrides(
        database_url=f"sqlite+aiosqlite:///{data_dir / 'demo.db'}",
        data_dir=data_dir,
        redis_url=None,
        transport="sim",
        sim_url=None,
        wa_store=str(data_dir / "whatsmeow.db"),
        demo=True,
    )


@dataclass
class DemoSeed:
    email: str
    password: str
    device_ids: list[UUID]
    leads: int = 0
    campaign: str = ""


DEMO_PACING = DevicePatch(min_delay_s=3, max_delay_s=8, hourly_cap=200, daily_cap=1000, typing=True)
LEAD_NAMES = ("Aminah", "Boon Keat", "Chandra", "Daniel", "Elena", "Faizal", "Grace", "Hafiz", "Indra", "Jia Hui")


async def seed(runtime: Runtime, *, timeout_s: float = 20.0) -> DemoSeed:
    """Create the demo admin and link the demo devices by scanning their QR codes on simulated phones."""
    assert runtime.router and runtime.sim_network and runtime.bus and runtime.device_repo
    password = secrets.token_urlsafe(12)
    admin = await runtime.users.create(DEMO_EMAIL, password, Role.ADMIN, "Demo admin")
    waiter = _EventWaiter()
    unsubscribe = runtime.bus.subscribe(waiter.feed)
    try:
        device_ids = []
        for name, phone in DEVICES:
            device = await runtime.device_repo.add(name, admin.id, None)
            device_ids.append(device.id)
            qr = waiter.expect(ev.DEVICE_QR, device.id)
            online = waiter.expect(ev.DEVICE_STATUS, device.id, lambda e: e.data["status"] == "online")
            await runtime.router.pair_qr(device.id)
            code = (await asyncio.wait_for(qr, timeout_s)).data["code"]
            await runtime.sim_network.scan(code, phone)
            await asyncio.wait_for(online, timeout_s)
    finally:
        unsubscribe()
    for device_id in device_ids:
        await runtime.device_repo.patch(device_id, DEMO_PACING)
    leads, campaign = await _leads_and_campaign(runtime, admin, device_ids)
    return DemoSeed(DEMO_EMAIL, password, device_ids, leads, campaign)


async def _leads_and_campaign(runtime: Runtime, admin: User, device_ids: list[UUID]) -> tuple[int, str]:
    """Leads owned by the demo devices and a campaign to them, paced like a person (a few seconds apart)."""
    assert runtime.app is not None
    ctx = runtime.app[CTX]
    for n, name in enumerate(LEAD_NAMES):
        lead = LeadInput(
            phone=f"+60198100{n:03d}",
            name=name,
            niche="property",
            triggers=["demo"],
            device_id=device_ids[n % len(device_ids)],
        )
        await ctx.leads.create(admin, lead)
    title = "Welcome offer"
    await ctx.campaigns.create(
        admin,
        CampaignDraft(
            type="broadcast",
            title=title,
            message="{Hi|Hello} {name}, {greeting}! Our new units are open for viewing this week. "
            "Reply STOP to opt out.",
            scheduled_at=ctx.clock.now(),
            niche="property",
            options={"language": "en"},
        ),
    )
    return len(LEAD_NAMES), title


async def chatter(runtime: Runtime) -> None:
    """Simulated contacts write to the demo devices every few seconds."""
    assert runtime.sim_network is not None
    while True:
        await asyncio.sleep(random.uniform(*CHATTER_EVERY_S))
        contact, name = random.choice(CONTACTS)
        _, account = random.choice(DEVICES)
        try:
            await runtime.sim_network.contact_send(contact, account, random.choice(LINES), push_name=name)
        except Exception:
            log.exception("demo chatter failed")


class _EventWaiter:
    """Futures resolved by the first bus event of a type and device that passes a test."""

    def __init__(self) -> None:
        self._waiting: list[tuple[str, UUID, Callable[[BusEvent], bool], asyncio.Future[BusEvent]]] = []

    def expect(
        self, event_type: str, device_id: UUID, test: Callable[[BusEvent], bool] = lambda e: True
    ) -> asyncio.Future[BusEvent]:
        future: asyncio.Future[BusEvent] = asyncio.get_running_loop().create_future()
        self._waiting.append((event_type, device_id, test, future))
        return future

    async def feed(self, event: BusEvent) -> None:
        for item in tuple(self._waiting):
            event_type, device_id, test, future = item
            if event.type == event_type and event.device_id == device_id and test(event):
                self._waiting.remove(item)
                if not future.done():
                    future.set_result(event)


async def run_demo(runtime: Runtime, announce: Callable[[str], None], stop: Awaitable[None]) -> None:
    await runtime.start()
    chatter_task: asyncio.Task[None] | None = None
    try:
        demo = await seed(runtime)
        announce(
            f"wamd demo is running at {runtime.url}\n"
            f"  log in:    {demo.email} / {demo.password}\n"
            f"  API:       {runtime.url}/api/openapi.json   (health: {runtime.url}/api/health)\n"
            f"  simulated: {len(demo.device_ids)} linked devices; contacts write to them every few seconds\n"
            f"  campaign:  '{demo.campaign}' is sending to {demo.leads} leads, a few seconds apart\n"
            "Press Ctrl+C to stop (the demo's data is thrown away)."
        )
        chatter_task = asyncio.create_task(chatter(runtime))
        await stop
    finally:
        if chatter_task is not None:
            chatter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chatter_task
        await runtime.stop()
