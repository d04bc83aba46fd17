"""Fixtures for the simulated network and its client transport (in-process and over a real WebSocket)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.sim.sim_helpers import (
    TRANSPORT_OPTIONS,
    DictSessionStore,
    EventRecorder,
    TransportHarness,
    fast_config,
)
from wamd_server.infra.whatsapp.sim import SimTransport
from wamd_server.sim.network import SimNetwork
from wamd_server.sim.server import create_sim_app


@pytest.fixture
async def network() -> AsyncIterator[SimNetwork]:
    net = SimNetwork(fast_config())
    yield net
    await net.close()


@pytest.fixture
async def sim_server(network: SimNetwork) -> AsyncIterator[TestServer]:
    server = TestServer(create_sim_app(network))
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
def store() -> DictSessionStore:
    return DictSessionStore()


@pytest.fixture(params=["in_process", "remote"])
async def harness(
    request: pytest.FixtureRequest, network: SimNetwork, store: DictSessionStore
) -> AsyncIterator[TransportHarness]:
    server: TestServer | None = None
    if request.param == "in_process":
        transport = SimTransport.in_process(network, store, **TRANSPORT_OPTIONS)
    else:
        server = TestServer(create_sim_app(network))
        await server.start_server()
        transport = SimTransport.remote(str(server.make_url("/")), store, **TRANSPORT_OPTIONS)
    events = EventRecorder()
    await transport.start(events)
    yield TransportHarness(transport, events, store)
    await transport.close()
    if server is not None:
        await server.close()


@pytest.fixture
async def client(sim_server: TestServer) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(sim_server) as http:
        yield http
