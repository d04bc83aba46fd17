"""Crash test on Postgres: the worker is killed with SIGKILL in the middle of a 20,000-message campaign and
started again; afterwards every lead has received exactly one message (no lead holds two different message
ids) and none is missing."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN_EMAIL
from tests.e2e.processes import Process, start_stack, wamd_server
from tests.e2e.test_device_acceptance import Client
from tests.e2e.test_failover import wait_for_workers

DEVICES = int(os.environ.get("CRASH_DEVICES", "40"))
LEADS = int(os.environ.get("CRASH_LEADS", "20000"))
FAST = {"min_delay_s": 0, "max_delay_s": 0, "hourly_cap": 10_000, "daily_cap": 100_000, "typing": False}


class Cluster:
    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = env
        self.workers: list[Process] = []

    def start_worker(self) -> Process:
        n = len(self.workers)
        worker = Process(
            [*wamd_server(self.env, self.tmp_path).args, "worker", "--capacity", "1000"],
            self.env,
            self.tmp_path / f"worker-{n}.log",
        )
        worker.start()
        self.workers.append(worker)
        return worker


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str, redis_url: str) -> AsyncIterator[tuple[Cluster, Client]]:
    stack = await start_stack(tmp_path, pg_url, redis_url, "crash", WAMD_LEASE_TTL_S="3")
    env, sim, sim_url, api_port = stack.env, stack.sim, stack.sim_url, stack.api_port
    api = wamd_server(env, tmp_path, "api")
    api.start()
    await api.wait_http(f"http://127.0.0.1:{api_port}/api/health")
    nodes = Cluster(tmp_path, env)
    nodes.start_worker()
    await wait_for_workers(pg_url, 1)
    async with aiohttp.ClientSession() as http:
        client = Client(http, f"http://127.0.0.1:{api_port}", sim_url)
        login = {"email": ADMIN_EMAIL, "password": env["WAMD_ADMIN_PASSWORD"]}
        client.token = (await client.call("POST", "/api/auth/login", login))["token"]
        yield nodes, client
    for proc in [*nodes.workers, api, sim]:
        proc.stop()


async def report(client: Client, campaign_id: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.call("GET", f"/api/campaigns/{campaign_id}/report")
    return result


async def test_kill_9_in_the_middle_of_a_campaign_loses_and_doubles_nothing(
    cluster: tuple[Cluster, Client],
) -> None:
    nodes, client = cluster
    ws = await client.ws()
    device_ids = []
    for n in range(DEVICES):
        device_id = (await client.call("POST", "/api/devices", {"name": f"Sender {n}"}))["id"]
        await client.call("POST", f"/api/devices/{device_id}/pair", {"method": "qr"})
        qr = await ws.wait_event("device.qr", device_id, timeout=30)
        await client.sim("/scan", {"qr": qr["code"], "phone": f"6012340{n:04d}"})
        await ws.wait_event("device.status", device_id, lambda e: e["status"] == "online", timeout=30)
        await client.call("PATCH", f"/api/devices/{device_id}", FAST)
        device_ids.append(device_id)

    rows = ["name,phone,niche,device_id"]
    rows += [f"Lead {n},+6019{n:07d},crash,{device_ids[n % DEVICES]}" for n in range(LEADS)]
    form = aiohttp.FormData()
    form.add_field("file", "\n".join(rows).encode(), filename="leads.csv", content_type="text/csv")
    async with client.http.post(
        client.url + "/api/leads/import", data=form, headers={"Authorization": f"Bearer {client.token}"}
    ) as resp:
        imported = await resp.json()
        assert resp.status == 200, imported
    assert imported["created"] == LEADS and imported["failed"] == []

    campaign = await client.call("POST", "/api/campaigns", {"title": "Crash", "message": "Hi {name}", "niche": "crash"})
    deadline = time.monotonic() + 120
    while (progress := await report(client, campaign["id"]))["done_send"] < LEADS // 4:
        assert time.monotonic() < deadline, f"the campaign did not get going: {progress}"
        await asyncio.sleep(0.05)

    nodes.workers[0].stop(signal.SIGKILL)
    at_kill = await report(client, campaign["id"])
    assert at_kill["remaining_send"] > 0, "the kill came too late to test anything"
    nodes.start_worker()

    deadline = time.monotonic() + 300
    while (done := await report(client, campaign["id"]))["remaining_send"] > 0:
        assert time.monotonic() < deadline, f"not finished after the restart: {done}"
        await asyncio.sleep(0.2)
    assert (done["should_send"], done["done_send"], done["failed_send"]) == (LEADS, LEADS, 0)

    async with client.http.get(client.sim_url + "/api/sim/inbox-counts") as resp:
        counts = (await resp.json())["counts"]
    lead_phones = {f"6019{n:07d}" for n in range(LEADS)}
    received = {phone: n for phone, n in counts.items() if phone in lead_phones}
    assert set(received) == lead_phones, f"{len(lead_phones - set(received))} leads got nothing"
    doubled = {phone: n for phone, n in received.items() if n != 1}
    assert doubled == {}, f"{len(doubled)} leads hold more than one message id"
    await ws.close()
