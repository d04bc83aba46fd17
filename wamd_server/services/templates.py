"""Template previews for API callers: which lead to render for (only leads the caller may see), then
`templating.render` and `templating.validate`."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol
from uuid import UUID
from zoneinfo import ZoneInfo

from wamd_server.domain.errors import InvalidInput, NotFound
from wamd_server.domain.models import Lead, User
from wamd_server.domain.ports import Clock
from wamd_server.services.phones import normalise_phone
from wamd_server.services.templating import (
    DEFAULT_GREETINGS,
    Greetings,
    TemplateIssue,
    TemplateLead,
    render,
    validate,
)


class LeadSource(Protocol):
    async def get(self, lead_id: UUID, owner_id: UUID | None = None) -> Lead | None:
        """The lead, if it exists and (when `owner_id` is given) belongs to that user."""
        ...


@dataclass(frozen=True)
class SampleLead:
    """A lead given inline (not stored), e.g. to try a template before importing leads."""

    name: str = ""
    phone: str = ""  # E.164 digits
    fields: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Preview:
    text: str
    issues: list[TemplateIssue]
    language: str
    at: datetime


class TemplateService:
    def __init__(
        self,
        leads: LeadSource,
        clock: Clock,
        tz: ZoneInfo,
        *,
        greetings: Greetings = DEFAULT_GREETINGS,
        phone_region: str = "MY",
    ) -> None:
        self._leads = leads
        self._clock = clock
        self._tz = tz
        self._greetings = greetings
        self._region = phone_region

    async def visible_lead(self, user: User, lead_id: UUID) -> Lead:
        """Staff see their own leads, admins every lead; other leads do not exist for the caller."""
        lead = await self._leads.get(lead_id, None if user.is_admin else user.id)
        if lead is None:
            raise NotFound("lead not found")
        return lead

    def sample_lead(self, name: str = "", phone: str = "", fields: Mapping[str, str] | None = None) -> SampleLead:
        digits = normalise_phone(phone, self._region, field="lead.phone") if phone.strip() else ""
        return SampleLead(name=name, phone=digits, fields=dict(fields or {}))

    def language(self, language: str | None) -> str:
        if language is None:
            return self._greetings.default_language
        if language not in self._greetings.languages:
            known = ", ".join(sorted(self._greetings.languages))
            raise InvalidInput(f"unknown language {language!r} (use one of {known})", {"field": "language"})
        return language

    async def preview(
        self,
        user: User,
        template: str,
        *,
        lead_id: UUID | None = None,
        lead: SampleLead | None = None,
        language: str | None = None,
        at: datetime | None = None,
        seed: int | None = None,
    ) -> Preview:
        """Render `template` for a stored lead (`lead_id`), an inline one, or nobody (empty name and phone)."""
        if lead_id is not None and lead is not None:
            raise InvalidInput("give lead_id or lead, not both", {"field": "lead"})
        chosen_language = self.language(language)
        if at is not None and at.tzinfo is None:
            raise InvalidInput("at needs a time zone offset", {"field": "at"})
        when = at or self._clock.now()
        target: TemplateLead | None = await self.visible_lead(user, lead_id) if lead_id is not None else lead
        text = render(
            template,
            target,
            now=when,
            tz=self._tz,
            language=chosen_language,
            rng=random.Random(seed) if seed is not None else None,
            greetings=self._greetings,
        )
        known = list(target.fields) if target is not None else None
        return Preview(text, validate(template, known_fields=known), chosen_language, when)
