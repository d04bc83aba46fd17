"""Typed calls of the plugin hooks the services fire (failures are isolated by the plugin host)."""

from __future__ import annotations

from wamd_server.domain.models import Device, DeviceStatus, InboundMessage, OutboxItem
from wamd_server.plugin_api.manager import PluginHost
from wamd_server.services.plugin_outbox import PluginOutbox


class HookCaller:
    def __init__(self, host: PluginHost, outbox: PluginOutbox | None = None) -> None:
        self.host = host
        self.outbox = outbox  # what plugins send with (`services/plugin_outbox.py`), given to them as `ctx`

    async def device_status_changed(self, device: Device, old: DeviceStatus, new: DeviceStatus) -> None:
        await self.host.call("wamd_device_status_changed", device=device, old=old, new=new)

    async def message_received(self, device: Device, message: InboundMessage) -> None:
        await self.host.call("wamd_message_received", device=device, message=message, ctx=self.outbox)

    async def before_send(self, item: OutboxItem) -> str | None:
        """The veto reason of the first plugin that vetoes `item` (False or a reason string), else None."""
        if not self.host.implemented("wamd_before_send"):
            return None
        for answer in await self.host.call("wamd_before_send", item=item):
            if answer is False:
                return "vetoed"
            if isinstance(answer, str) and answer.strip():
                return answer.strip()
        return None
