"""Message templates: preview a rendering for a lead."""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from wamd_server.domain.errors import InvalidInput
from wamd_server.protocol import dto
from wamd_server.web.context import CTX
from wamd_server.web.inputs import json_body, user_of
from wamd_server.web.routing import RouteTable

routes = RouteTable()


@routes.post(
    "/api/templates/preview",
    summary="Render a message template for a lead (nothing is sent) and list its problems",
    tag="templates",
    body=dto.TemplatePreviewIn,
    response=dto.TemplatePreviewOut,
)
async def preview_template(request: web.Request) -> web.Response:
    body = await json_body(request, dto.TemplatePreviewIn)
    service = request.app[CTX].templates
    lead_id = None
    if body.lead_id is not None:
        try:
            lead_id = UUID(body.lead_id)
        except ValueError:
            raise InvalidInput(f"not an id: {body.lead_id!r}", {"field": "lead_id"}) from None
    sample = service.sample_lead(body.lead.name, body.lead.phone, body.lead.fields) if body.lead else None
    preview = await service.preview(
        user_of(request),
        body.template,
        lead_id=lead_id,
        lead=sample,
        language=body.language,
        at=body.at,
        seed=body.seed,
    )
    out = dto.TemplatePreviewOut(
        text=preview.text,
        warnings=[
            dto.TemplateIssueOut(code=i.code, severity=i.severity, message=i.message, position=i.position)
            for i in preview.issues
        ],
        language=preview.language,
        at=preview.at,
    )
    return web.json_response(out.model_dump(mode="json"))
