"""`broadcast`: every lead matching the campaign's niche, target status and devices gets the message once.

A lead with an owner device is sent to from that device (sticky sending); leads without an owner are spread
over the campaign's devices by the lead distribution (a `wamd_distribute_leads` plugin, else round robin).
"""

from __future__ import annotations

from typing import Any

from wamd_server.plugin_api import hookimpl
from wamd_server.plugin_api.types import CampaignTypeSpec

OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "language": {
            "type": "string",
            "description": "language of {greeting}: ms (default), en, or one added by WAMD_GREETINGS",
        },
        "distribution": {
            "type": "string",
            "enum": ["round_robin", "ai"],
            "description": "how leads without an owner device are spread: round robin (default) or the AI "
            "distribution plugin (per_device_limit, history_days, reply_weight)",
        },
        "per_device_limit": {"type": "integer", "minimum": 1},
        "history_days": {"type": "integer", "minimum": 1, "maximum": 365},
        "reply_weight": {"type": "number", "minimum": 0},
    },
    "additionalProperties": True,
}


async def plan(campaign: Any, ctx: Any) -> int:
    devices = await ctx.devices()
    allowed = {d.id for d in devices}
    queued = 0
    after = None
    while True:
        leads = await ctx.leads(after)
        if not leads:
            return queued
        after = leads[-1].id
        owned = [lead for lead in leads if lead.device_id is not None and lead.device_id in allowed]
        unowned = [lead for lead in leads if lead.device_id is None]
        assignment = await ctx.distribute(unowned, devices)
        planned = [ctx.planned(lead, lead.device_id) for lead in owned]
        planned += [ctx.planned(lead, assignment[lead.id]) for lead in unowned if lead.id in assignment]
        queued += await ctx.enqueue(planned)


@hookimpl
def wamd_campaign_types() -> list[CampaignTypeSpec]:
    return [
        CampaignTypeSpec(
            name="broadcast",
            title="Broadcast",
            description="One message to every lead matching a niche and target status, paced per device.",
            options_schema=OPTIONS_SCHEMA,
            plan=plan,
        )
    ]
