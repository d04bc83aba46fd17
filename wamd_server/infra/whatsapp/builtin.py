"""The built-in transports, offered through the same `wamd_transports` hook as third-party ones."""

from __future__ import annotations

from typing import Any

from wamd_server.plugin_api import hookimpl
from wamd_server.plugin_api.types import TransportContext, TransportSpec


def _sim(context: TransportContext) -> Any:
    from wamd_server.infra.whatsapp.sim import SimTransport
    from wamd_server.infra.whatsapp.sim_link import InProcessLinks, RemoteLinks

    config = context.config
    if config.sim_url:
        return SimTransport(RemoteLinks(config.sim_url), context.session_store)
    if context.sim_network is None:
        raise RuntimeError("the in-process simulated network was not started")
    return SimTransport(InProcessLinks(context.sim_network), context.session_store)


def _neonize(context: TransportContext) -> Any:
    # Imported only when chosen: loading neonize costs ~55 MB and starts Go threads.
    from wamd_server.infra.whatsapp.neonize import NeonizeTransport

    return NeonizeTransport.from_config(context.config)


@hookimpl
def wamd_transports() -> list[TransportSpec]:
    return [
        TransportSpec("sim", _sim, "simulated WhatsApp network (in-process, or a wamd-sim at WAMD_SIM_URL)"),
        TransportSpec("neonize", _neonize, "real WhatsApp through neonize (whatsmeow)"),
    ]
