"""Media (uploaded images), bytes and all, in the `media` table."""

from __future__ import annotations

import uuid
from datetime import datetime
from uuid import UUID

from sqlalchemy import insert, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from wamd_server.infra.db.tables import media
from wamd_server.services.media import Media, ProcessedImage


def media_from_row(row: RowMapping) -> Media:
    return Media(
        id=row["id"],
        user_id=row["user_id"],
        mime=row["mime"],
        size=row["size"],
        sha256=row["sha256"],
        width=row["width"],
        height=row["height"],
        created_at=row["created_at"],
        data=bytes(row["data"]),
    )


class SqlMediaRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, user_id: UUID | None, image: ProcessedImage, created_at: datetime) -> Media:
        item = Media(
            id=uuid.uuid4(),
            user_id=user_id,
            mime=image.mime,
            size=image.size,
            sha256=image.sha256,
            width=image.width,
            height=image.height,
            created_at=created_at,
            data=image.data,
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(media).values(
                    id=item.id,
                    user_id=item.user_id,
                    mime=item.mime,
                    size=item.size,
                    sha256=item.sha256,
                    width=item.width,
                    height=item.height,
                    data=item.data,
                    created_at=item.created_at,
                )
            )
        return item

    async def get(self, media_id: UUID) -> Media | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(media).where(media.c.id == media_id))).mappings().first()
        return media_from_row(row) if row else None

    async def find(self, user_id: UUID, sha256: str) -> Media | None:
        query = (
            select(media)
            .where(media.c.sha256 == sha256, media.c.user_id == user_id)
            .order_by(media.c.created_at, media.c.id)
            .limit(1)
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).mappings().first()
        return media_from_row(row) if row else None
