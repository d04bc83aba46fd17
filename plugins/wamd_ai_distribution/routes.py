"""The plugin's HTTP route: a campaign's distribution report.

Like every plugin route it gets the caller at ``request[USER]`` (see :class:`~wamd_server.plugin_api.types.WebRoute`);
the campaign and the stored report come through the API context, so the core's visibility rule applies: the
campaign's owner and admins see the report, anyone else gets 404 as for the campaign itself.
"""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from wamd_server.domain.errors import NotFound
from wamd_server.plugin_api.types import WebRoute
from wamd_server.web.context import CTX
from wamd_server.web.routing import USER

REPORT_PATH = "/api/plugins/ai-distribution/campaigns/{id}/report"


def report_route(plugin: str) -> WebRoute:
    """`GET` the report `plugin` saved for a campaign."""

    async def ai_distribution_report(request: web.Request) -> web.Response:
        api = request.app[CTX]
        try:
            campaign_id = UUID(request.match_info["id"])
        except ValueError:
            raise NotFound("campaign not found") from None
        campaign = await api.campaigns.get(request[USER], campaign_id)  # NotFound unless owner or admin
        reports = api.distribution_reports
        report = await reports.distribution_report(campaign.id, plugin) if reports is not None else None
        if report is None:
            raise NotFound(
                'this campaign has no AI distribution report: it does not set options.distribution to "ai", '
                "or it has not been launched yet"
            )
        return web.json_response(report)

    return WebRoute(
        "GET",
        REPORT_PATH,
        ai_distribution_report,
        summary="Why each device got its share of a campaign's leads (AI lead distribution)",
    )
