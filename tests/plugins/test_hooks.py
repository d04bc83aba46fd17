"""Every hook of the plugin contract (`wamd_server/plugin_api/hookspecs.py`), exercised as a plugin author
would: through a real server where the core calls the hook, or through `PluginHost` where no core caller
exists yet. Failures in plugins are logged, counted and isolated."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import EVENT_TIMEOUT, TEST_SIM, Server, ServerFactory, eventually, server_env
from tests.server.test_campaigns import linked_devices, make_leads
from wamd_server.config import ConfigError, load_config
from wamd_server.domain.errors import InvalidInput
from wamd_server.domain.models import Device, DeviceStatus, InboundMessage
from wamd_server.infra.whatsapp.sim import SimTransport
from wamd_server.infra.whatsapp.sim_link import InProcessLinks
from wamd_server.plugin_api import hookimpl
from wamd_server.plugin_api.manager import ENTRY_POINT_GROUP, PluginHost
from wamd_server.plugin_api.types import CampaignTypeSpec, TransportContext, TransportSpec, WebRoute
from wamd_server.runtime import Runtime
from wamd_server.sim.network import SimNetwork
from wamd_server.web.routing import USER

CONTACT = "60199000010"


class Named:
    """Plugins are objects here; pluggy names an object by its `__name__`."""

    def __init__(self, name: str) -> None:
        self.__name__ = name


# --- wamd_transports -----------------------------------------------------------------------------------------


class Sim2Transports(Named):
    """Offers the simulated network under another name, built like the built-in `sim` transport."""

    def __init__(self) -> None:
        super().__init__("sim2-plugin")
        self.created: list[TransportContext] = []

    @hookimpl
    def wamd_transports(self) -> list[TransportSpec]:
        return [TransportSpec("sim2", self._create, "the in-process simulated network, from a plugin")]

    def _create(self, context: TransportContext) -> SimTransport:
        self.created.append(context)
        return SimTransport(InProcessLinks(context.sim_network), context.session_store)


@pytest.fixture
async def network() -> AsyncIterator[SimNetwork]:
    """A simulated network handed to a server; it outlives the server (request it before `make_server`)."""
    network = SimNetwork(TEST_SIM)
    yield network
    await network.close()


async def test_a_plugin_transport_is_selected_by_name(
    network: SimNetwork, make_server: ServerFactory, database_url: str
) -> None:
    plugin = Sim2Transports()
    server = await make_server(database_url, sim_network=network, plugins=[plugin], WAMD_TRANSPORT="sim2")
    assert len(plugin.created) == 1
    assert plugin.created[0].config.transport == "sim2"
    assert plugin.created[0].sim_network is network
    assert (await server.ok("GET", "/api/health"))["transport"] == "sim2"

    ws = await server.ws()
    device = await server.create_device("Via sim2")
    paired = await server.pair_by_qr(device["id"], "60123000401", ws)
    assert paired["jid"] == "60123000401:1@s.whatsapp.net"
    assert (await server.ok("GET", f"/api/devices/{device['id']}"))["status"] == "online"


async def test_an_unknown_transport_name_fails_start_listing_the_available_ones(tmp_path: Path) -> None:
    env = server_env(f"sqlite+aiosqlite:///{tmp_path / 'wamd.db'}", tmp_path, "admin-pass-123")
    runtime = Runtime(load_config({**env, "WAMD_TRANSPORT": "carrier-pigeon"}))
    runtime.plugins.register(Sim2Transports())
    try:
        with pytest.raises(ConfigError) as caught:
            await runtime.start()
    finally:
        await runtime.stop()
    message = str(caught.value)
    assert "\n" not in message
    assert "WAMD_TRANSPORT" in message and "carrier-pigeon" in message
    available = re.search(r"available: ([^)]*)", message)
    assert available, message
    assert available.group(1).split(", ") == ["neonize", "sim", "sim2"]


# --- wamd_web_routes -----------------------------------------------------------------------------------------


class Routes(Named):
    def __init__(self) -> None:
        super().__init__("routes-plugin")

    @hookimpl
    async def wamd_web_routes(self) -> list[object]:  # async: the core awaits it
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"hello": request[USER].email})

        async def admin_only(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def boom(request: web.Request) -> web.Response:
            raise RuntimeError("plugin handler bug with a secret inside")

        async def public(request: web.Request, *, greeting: str) -> web.Response:
            return web.json_response({"greeting": greeting})

        return [
            WebRoute("GET", "/api/plugin/hello", hello, summary="Say hello to the caller"),
            WebRoute("post", "/api/plugin/admin", admin_only, auth="admin", summary="Admins only"),
            WebRoute("GET", "/api/plugin/boom", boom),
            WebRoute("GET", "/api/plugin/public", functools.partial(public, greeting="hi"), auth="public"),
            WebRoute("GET", "/plugin/outside-api", hello),  # not under /api/: ignored
            WebRoute("FETCH", "/api/plugin/fetch", hello),  # not an HTTP method the core serves: ignored
            "not a route",  # ignored
        ]


async def test_plugin_routes_are_served_with_auth_and_documented(make_server: ServerFactory, database_url: str) -> None:
    server = await make_server(database_url, plugins=[Routes()])
    _, staff_token = await server.create_user("plugin-staff@example.com")

    assert await server.ok("GET", "/api/plugin/hello") == {"hello": "admin@example.com"}
    assert await server.ok("GET", "/api/plugin/hello", staff_token) == {"hello": "plugin-staff@example.com"}
    anonymous = await server.call("GET", "/api/plugin/hello")
    assert anonymous.status == 401 and anonymous.body["error"]["code"] == "unauthorized"
    bad = await server.call("GET", "/api/plugin/hello", "not-a-token")
    assert bad.status == 401

    assert await server.ok("POST", "/api/plugin/admin") == {"ok": True}
    forbidden = await server.call("POST", "/api/plugin/admin", staff_token)
    assert forbidden.status == 403 and forbidden.body["error"]["code"] == "forbidden"

    public = await server.call("GET", "/api/plugin/public")
    assert (public.status, public.body) == (200, {"greeting": "hi"})

    broken = await server.call("GET", "/api/plugin/boom", server.admin_token)
    assert broken.status == 500 and broken.body["error"]["code"] == "internal_error"
    assert "secret" not in str(broken.body)

    for ignored in ("/plugin/outside-api", "/api/plugin/fetch"):
        assert (await server.call("GET", ignored, server.admin_token)).status == 404

    paths = (await server.ok("GET", "/api/openapi.json"))["paths"]
    assert paths["/api/plugin/hello"]["get"]["summary"] == "Say hello to the caller"
    assert paths["/api/plugin/hello"]["get"]["tags"] == ["plugins"]
    assert "post" in paths["/api/plugin/admin"]
    assert "/api/plugin/public" in paths
    assert "/plugin/outside-api" not in paths and "/api/plugin/fetch" not in paths


# --- wamd_device_status_changed, wamd_message_received ---------------------------------------------------------


class Recorder(Named):
    """Async implementations that yield before recording: they only record if the core awaits them."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.statuses: list[tuple[Any, DeviceStatus, DeviceStatus, DeviceStatus]] = []
        self.messages: list[tuple[Device, InboundMessage]] = []
        self._changed = asyncio.Event()

    @hookimpl
    async def wamd_device_status_changed(self, device: Device, old: DeviceStatus, new: DeviceStatus) -> None:
        await asyncio.sleep(0)
        self.statuses.append((device.id, old, new, device.status))
        self._changed.set()

    @hookimpl
    async def wamd_message_received(self, device: Device, message: InboundMessage) -> None:
        await asyncio.sleep(0)
        self.messages.append((device, message))
        self._changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(EVENT_TIMEOUT):
            while not done():
                self._changed.clear()
                await self._changed.wait()


class Raiser(Named):
    def __init__(self) -> None:
        super().__init__("raiser")

    @hookimpl
    def wamd_device_status_changed(self, device: Device, old: DeviceStatus, new: DeviceStatus) -> None:
        raise RuntimeError("status hook bug")

    @hookimpl
    async def wamd_message_received(self, device: Device, message: InboundMessage) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("async message hook bug")


async def test_status_and_message_hooks_see_a_pairing_and_a_message_despite_a_broken_plugin(
    make_server: ServerFactory, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    recorder, raiser = Recorder(), Raiser()
    # pluggy calls the last registered first: the raiser runs before the recorder every time
    server = await make_server(database_url, plugins=[recorder, raiser])
    ws = await server.ws()
    device = await server.create_device("Hooked")
    device_id = uuid.UUID(device["id"])

    await server.pair_by_qr(device["id"], "60123000402", ws)  # goes online although a plugin raises
    await recorder.until(lambda: any(s[2] is DeviceStatus.ONLINE for s in recorder.statuses))
    assert [(old, new) for d, old, new, _ in recorder.statuses if d == device_id] == [
        (DeviceStatus.UNPAIRED, DeviceStatus.PAIRING),
        (DeviceStatus.PAIRING, DeviceStatus.CONNECTING),
        (DeviceStatus.CONNECTING, DeviceStatus.ONLINE),
    ]
    assert all(new is after for _, _, new, after in recorder.statuses)  # the device as it is after the change

    sent = await server.sim("POST", "/send", {"from_phone": CONTACT, "to_phone": "60123000402", "text": "hi hook"})
    await recorder.until(lambda: bool(recorder.messages))
    hooked_device, message = recorder.messages[0]
    assert hooked_device.id == device_id and hooked_device.phone == "60123000402"
    assert (message.wa_id, message.text, message.from_me, message.sender_phone) == (
        sent["wa_id"],
        "hi hook",
        False,
        CONTACT,
    )
    await ws.wait_event("message.new", device["id"])  # the message was stored and announced as usual

    assert server.runtime.plugins.failures == {"raiser": 4}
    failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "raiser" in r.getMessage()]
    assert any("wamd_device_status_changed" in m for m in failed)
    assert any("wamd_message_received" in m for m in failed)
    metrics = (await server.call("GET", "/metrics")).body
    assert re.search(r'^wamd_plugin_failures\{plugin="raiser"\} 4\.0$', metrics, re.MULTILINE), metrics


class AutoReply(Named):
    """Answers "price" with a link, once per contact (the key), without the device's gap (as typed by hand)."""

    def __init__(self) -> None:
        super().__init__("auto-reply")
        self.answers: list[bool | str] = []

    @hookimpl
    async def wamd_message_received(self, device: Device, message: InboundMessage, ctx: Any) -> None:
        if message.from_me or not message.sender_phone:
            return
        if "price" in message.text.lower():
            text = "Prices: https://x.example/p?a=1&b=2"
            key = f"price:{message.sender_phone}"
            self.answers.append(await ctx.send(device.id, message.sender_phone, text, key, paced=False))
        elif message.text == "bad":
            try:
                await ctx.send(device.id, "not a phone", "x", "bad")
            except InvalidInput as exc:
                self.answers.append(str(exc))


async def test_a_plugin_sends_through_the_outbox_once_per_key(make_server: ServerFactory, database_url: str) -> None:
    plugin = AutoReply()
    server = await make_server(database_url, plugins=[plugin])
    ws = await server.ws()
    device = await server.create_device("Replies")
    await server.pair_by_qr(device["id"], "60123000403", ws)
    for text in ("price?", "PRICE please", "bad"):
        await server.sim("POST", "/send", {"from_phone": CONTACT, "to_phone": "60123000403", "text": text})

    async def answered() -> bool:
        return len(plugin.answers) == 3

    await eventually(answered)
    # The second question has the same key: nothing more was queued. Bad input is a clear error.
    assert plugin.answers == [True, False, "not a phone number: 'not a phone'"]
    chat = f"/api/devices/{device['id']}/chats/{CONTACT}@s.whatsapp.net/messages"

    async def replied() -> bool:
        return any(m["from_me"] for m in (await server.ok("GET", chat))["items"])

    await eventually(replied)
    inbox = (await server.sim("GET", f"/inbox/{CONTACT}"))["items"]
    assert [m["text"] for m in inbox] == ["Prices: https://x.example/p?a=1&b=2"]
    assert [m["text"] for m in (await server.ok("GET", chat))["items"] if m["from_me"]] == [inbox[0]["text"]]


async def test_a_plugin_s_unpaced_reply_goes_before_a_broadcast_s_waiting_messages(
    make_server: ServerFactory, database_url: str
) -> None:
    plugin = AutoReply()
    server = await make_server(database_url, plugins=[plugin])
    [device] = await linked_devices(server, 1)
    leads = await make_leads(server, 4, [device])
    body = {"title": "Slow", "message": "Offer for {name}", "min_delay_s": 3, "max_delay_s": 3}
    campaign = await server.ok("POST", "/api/campaigns", json=body)

    async def campaign_times() -> list[str]:
        times = []
        for lead in leads:
            times += [m["at"] for m in (await server.sim("GET", f"/inbox/{lead['phone'].lstrip('+')}"))["items"]]
        return sorted(times)

    async def broadcast_started() -> bool:
        return len(await campaign_times()) >= 1

    await eventually(broadcast_started)
    await server.sim("POST", "/send", {"from_phone": CONTACT, "to_phone": device["phone"], "text": "price?"})

    async def broadcast_done() -> bool:
        report = await server.ok("GET", f"/api/campaigns/{campaign['id']}/report")
        return bool(report["done_send"] == 4)

    await eventually(broadcast_done, timeout=30)
    [reply] = (await server.sim("GET", f"/inbox/{CONTACT}"))["items"]
    sent = await campaign_times()
    assert len(sent) == 4
    # Next after the message the device was waiting out its gap for (at most), not behind the whole broadcast.
    assert sum(at < reply["at"] for at in sent) <= 2, (reply, sent)


# --- hooks with no core caller yet, through PluginHost --------------------------------------------------------


class Campaigns(Named):
    def __init__(self, name: str, specs: Any) -> None:
        super().__init__(name)
        self.specs = specs

    @hookimpl
    def wamd_campaign_types(self) -> Any:
        return self.specs


class AsyncCampaigns(Named):
    @hookimpl
    async def wamd_campaign_types(self) -> list[CampaignTypeSpec]:
        return [CampaignTypeSpec("drip", "Drip", options_schema={"type": "object"})]


class BrokenCampaigns(Named):
    @hookimpl
    def wamd_campaign_types(self) -> list[CampaignTypeSpec]:
        raise ValueError("cannot list")


async def test_campaign_types_of_all_plugins_are_collected() -> None:
    host = PluginHost()
    broadcast = CampaignTypeSpec("broadcast", "Broadcast", "one message to many leads")
    host.register(Campaigns("first", [broadcast]))
    host.register(BrokenCampaigns("broken"))
    host.register(AsyncCampaigns("async"))
    host.register(Campaigns("single", CampaignTypeSpec("poll", "Poll")))
    host.register(Campaigns("none", None))
    types = await host.call_flat("wamd_campaign_types")
    assert sorted(t.name for t in types) == ["broadcast", "drip", "poll"]
    assert all(isinstance(t, CampaignTypeSpec) for t in types)
    assert host.failures == {"broken": 1}


class Distributor(Named):
    def __init__(self, name: str, answer: Any, calls: list[str]) -> None:
        super().__init__(name)
        self.answer = answer
        self.calls = calls

    @hookimpl
    def wamd_distribute_leads(self, campaign: Any, leads: Any, devices: Any) -> Any:
        self.calls.append(self.__name__)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class LeadsOnlyDistributor(Named):
    """An implementation may take fewer arguments than the spec names."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__("leads-only")
        self.calls = calls

    @hookimpl
    async def wamd_distribute_leads(self, leads: Any) -> Any:
        self.calls.append(self.__name__)
        return {lead: "device-b" for lead in leads}


async def test_distribute_leads_first_non_none_answer_wins() -> None:
    host = PluginHost()
    assert host.pm.hook.wamd_distribute_leads.spec.opts["firstresult"] is True
    calls: list[str] = []
    leads, devices = ["lead-1", "lead-2"], ["device-a", "device-b"]
    # registered last = asked first
    host.register(Distributor("never-asked", {"lead-1": "device-a"}, calls))
    host.register(LeadsOnlyDistributor(calls))
    host.register(Distributor("broken", RuntimeError("model offline"), calls))
    host.register(Distributor("defers", None, calls))

    answer = await host.call_first("wamd_distribute_leads", campaign={"id": "c"}, leads=leads, devices=devices)
    assert answer == {"lead-1": "device-b", "lead-2": "device-b"}
    assert calls == ["defers", "broken", "leads-only"]
    assert host.failures == {"broken": 1}

    nobody = PluginHost()
    nobody.register(Distributor("defers", None, []))
    assert await nobody.call_first("wamd_distribute_leads", campaign=None, leads=leads, devices=devices) is None


@dataclass
class Item:
    to: str
    text: str


class Signature(Named):
    @hookimpl
    def wamd_before_send(self, item: Item) -> None:
        item.text += "\n-- Sent with wamd"


class OptOut(Named):
    @hookimpl
    def wamd_before_send(self, item: Item) -> str | None:
        return "the recipient opted out" if item.to == "60100000000" else None


class SpamFilter(Named):
    @hookimpl
    async def wamd_before_send(self, item: Item) -> bool | None:
        return False if "WIN MONEY" in item.text else None


class BrokenFilter(Named):
    @hookimpl
    def wamd_before_send(self, item: Item) -> None:
        raise KeyError("bug")


async def test_before_send_edits_in_place_and_vetoes() -> None:
    host = PluginHost()
    for plugin in (Signature("signature"), OptOut("opt-out"), SpamFilter("spam"), BrokenFilter("broken")):
        host.register(plugin)

    fine = Item("60123456789", "Hello")
    assert await host.call("wamd_before_send", item=fine) == []  # no veto, and the broken filter does not veto
    assert fine.text == "Hello\n-- Sent with wamd"

    opted_out = Item("60100000000", "Hello")
    assert await host.call("wamd_before_send", item=opted_out) == ["the recipient opted out"]

    spam = Item("60123456789", "WIN MONEY now")
    assert await host.call("wamd_before_send", item=spam) == [False]
    assert host.failures == {"broken": 3}


# --- entry points ----------------------------------------------------------------------------------------------


GOOD_PLUGIN = """
from aiohttp import web

from wamd_server.plugin_api import hookimpl
from wamd_server.plugin_api.types import CampaignTypeSpec, WebRoute

LOADED = True


@hookimpl
def wamd_campaign_types():
    return [CampaignTypeSpec("from-entry-point", "From an entry point")]


async def _ping(request):
    return web.json_response({"pong": "entry point"})


@hookimpl
def wamd_web_routes():
    return [WebRoute("GET", "/api/entry-point/ping", _ping, auth="public", summary="Entry-point plugin ping")]
"""


@dataclass
class Installed:
    good: str
    bad: str


@pytest.fixture
def installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Installed]:
    """A distribution on sys.path with three `wamd.server` entry points: one good, one whose import raises,
    one naming a module that does not exist."""
    tag = uuid.uuid4().hex[:8]
    good, bad = f"wamd_ep_good_{tag}", f"wamd_ep_bad_{tag}"
    site = tmp_path / "site"
    dist = site / f"wamd_ep_test_{tag}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: wamd-ep-test-{tag}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{ENTRY_POINT_GROUP}]
            ep_good_{tag} = {good}
            ep_bad_{tag} = {bad}
            ep_missing_{tag} = wamd_ep_missing_{tag}

            [some.other.group]
            ignored_{tag} = {bad}
            """)
    )
    (site / f"{good}.py").write_text(GOOD_PLUGIN)
    (site / f"{bad}.py").write_text("raise RuntimeError('this plugin is broken at import')\n")
    monkeypatch.syspath_prepend(str(site))
    yield Installed(f"ep_good_{tag}", f"ep_bad_{tag}")
    for module in (good, bad):
        sys.modules.pop(module, None)


async def test_entry_points_are_loaded_and_broken_ones_skipped(
    installed_plugins: Installed, caplog: pytest.LogCaptureFixture
) -> None:
    host = PluginHost()
    loaded = host.load_entry_points()
    # The project's own plugins (such as the broadcast campaign type) load through the same group.
    assert installed_plugins.good in loaded and "broadcast" in loaded
    assert installed_plugins.bad not in loaded
    assert installed_plugins.good in host.names()
    assert installed_plugins.bad not in host.names()
    assert "from-entry-point" in [t.name for t in await host.call_flat("wamd_campaign_types")]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(installed_plugins.bad in m and "failed to load" in m for m in errors), errors
    assert any("ep_missing" in m for m in errors), errors
    assert host.load_entry_points() == []  # already registered: not twice


async def test_a_server_loads_entry_point_plugins_at_start(
    installed_plugins: Installed, make_server: ServerFactory, database_url: str
) -> None:
    server: Server = await make_server(database_url)
    assert installed_plugins.good in server.runtime.plugins.names()
    ping = await server.call("GET", "/api/entry-point/ping")
    assert (ping.status, ping.body) == (200, {"pong": "entry point"})
    paths = (await server.ok("GET", "/api/openapi.json"))["paths"]
    assert paths["/api/entry-point/ping"]["get"]["summary"] == "Entry-point plugin ping"
