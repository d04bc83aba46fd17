"""Media: image uploads for campaigns and chats, and their download."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from wamd_server.domain.errors import InvalidInput
from wamd_server.protocol import dto
from wamd_server.web.context import CTX
from wamd_server.web.inputs import PayloadTooLarge, path_id, user_of
from wamd_server.web.routing import RouteTable

routes = RouteTable()

CHUNK = 64 * 1024
# Media never changes under its id; it needs a token, so only the caller's own cache may keep it.
CACHE_CONTROL = "private, max-age=31536000, immutable"
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"uploads are limited to {limit // (1024 * 1024)} MiB (WAMD_MAX_BODY_MB)", {"limit": limit})


async def read_file_part(request: web.Request, limit: int) -> bytes:
    """The bytes of the multipart part `file`, counting every byte received against `limit` as it streams."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidInput("send the image as multipart/form-data with a part named 'file'", {"field": "file"})
    received = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):  # a nested multipart: not ours
                continue
            chunks: list[bytes] = []
            while chunk := await part.read_chunk(CHUNK):
                received += len(chunk)
                if received > limit:
                    raise too_large(limit)
                if part.name == "file":
                    chunks.append(chunk)
            if part.name == "file":
                return b"".join(chunks)
    except (ValueError, AssertionError) as exc:  # aiohttp's complaints about a malformed body
        raise InvalidInput(f"the multipart body is malformed: {exc}", {"field": "file"}) from None
    raise InvalidInput("the multipart body has no part named 'file'", {"field": "file"})


@routes.post(
    "/api/media",
    summary="Upload an image (multipart part `file`); large ones are re-encoded as JPEG",
    tag="media",
    body=dto.MediaUpload,
    response=dto.MediaOut,
    status=201,
    request_content_type="multipart/form-data",
)
async def upload_media(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    limit = ctx.config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    raw = await read_file_part(request, limit)
    item = await ctx.media.upload(user_of(request), raw)
    out = dto.MediaOut(
        id=str(item.id), mime=item.mime, size=item.size, width=item.width, height=item.height, sha256=item.sha256
    )
    return web.json_response(out.model_dump(mode="json"), status=201)


@routes.get(
    "/api/media/{id}",
    summary="The bytes of an uploaded image (ETag, cacheable by the caller)",
    tag="media",
    content_type="image/*",
)
async def get_media(request: web.Request) -> web.Response:
    item = await request.app[CTX].media.get(user_of(request), path_id(request, what="media"))
    headers = {
        "Cache-Control": CACHE_CONTROL,
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'inline; filename="{item.id}.{EXTENSIONS.get(item.mime, "bin")}"',
    }
    if any(tag.value in (item.sha256, "*") for tag in request.if_none_match or ()):
        response = web.Response(status=304, headers=headers)
    else:
        response = web.Response(body=item.data, content_type=item.mime, headers=headers)
    response.etag = item.sha256
    return response
