"""Media: image uploads, checked and normalised with Pillow, stored in the database, shown to whom may see them.

What an upload becomes (`process_image`):
- Only images Pillow decodes from an allow-list of formats (JPEG, PNG, WebP, GIF, BMP, TIFF) are taken; anything
  else is `UnsupportedMediaType` (HTTP 415). A damaged or truncated image is `InvalidInput` (400).
- Decompression bombs: the pixel count is read from the header before decoding; more than
  `ImageLimits.max_pixels` (40 megapixels) is refused (400) without decoding.
- A JPEG or PNG that is already small (longest side ≤ 1000 px, ≤ 350 KB) and upright (no EXIF rotation) is kept
  byte for byte. Everything else (large images, WebP, GIF, BMP, TIFF, rotated photos) is re-encoded as JPEG:
  EXIF rotation applied, transparency flattened onto white, longest side at most 1000 px, quality lowered (then
  the size) until it is at most 350 KB. Re-encoding drops metadata (EXIF, GPS). This is what the seed system's
  browser did before uploading; here the server does it, so every client gets the same result.
- Each user's identical images (same stored bytes) are stored once: uploading again returns the same id.

Visibility: the uploader and admins; for everyone else the media does not exist (404).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from uuid import UUID

from PIL import Image, ImageOps, UnidentifiedImageError

from wamd_server.domain.errors import DomainError, InvalidInput, NotFound
from wamd_server.domain.models import User
from wamd_server.domain.ports import Clock

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MIME_BY_FORMAT = {"JPEG": "image/jpeg", "PNG": "image/png"}
EXIF_ORIENTATION = 0x0112


class UnsupportedMediaType(DomainError):
    code = "unsupported_media_type"


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000  # refused before decoding above this (decompression bombs)
    max_side: int = 1000  # longest side of what is stored, in pixels
    max_bytes: int = 350 * 1024  # size of what is stored
    keep_formats: frozenset[str] = frozenset(MIME_BY_FORMAT)  # small images in these formats are kept as they are


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes
    mime: str
    width: int
    height: int
    sha256: str
    reencoded: bool

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Media:
    id: UUID
    user_id: UUID | None  # the uploader (None once that user is deleted)
    mime: str
    size: int
    sha256: str
    width: int | None
    height: int | None
    created_at: datetime
    data: bytes


class MediaRepository(Protocol):
    async def add(self, user_id: UUID | None, image: ProcessedImage, created_at: datetime) -> Media: ...

    async def get(self, media_id: UUID) -> Media | None: ...

    async def find(self, user_id: UUID, sha256: str) -> Media | None:
        """The user's media with these exact bytes, if any."""
        ...


def process_image(raw: bytes, limits: ImageLimits = ImageLimits()) -> ProcessedImage:
    """Check an uploaded file and return what to store (see the module's docstring). CPU-bound."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidInput(
                    f"the image has too many pixels ({width} x {height}; at most {limits.max_pixels:,})",
                    {"field": "file"},
                )
            image.load()
            fmt = image.format or ""
            return _normalised(image, fmt, raw, limits)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(
            f"the image has too many pixels (at most {limits.max_pixels:,})", {"field": "file"}
        ) from None
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            "the file is not an image (send a JPEG, PNG, WebP, GIF, BMP or TIFF)", {"field": "file"}
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise InvalidInput("the image is damaged or incomplete and cannot be decoded", {"field": "file"}) from None


def _normalised(image: Image.Image, fmt: str, raw: bytes, limits: ImageLimits) -> ProcessedImage:
    width, height = image.size
    upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1
    if (
        fmt in limits.keep_formats
        and upright
        and max(width, height) <= limits.max_side
        and len(raw) <= limits.max_bytes
    ):
        return ProcessedImage(raw, MIME_BY_FORMAT[fmt], width, height, hashlib.sha256(raw).hexdigest(), False)

    rgb = _flattened(ImageOps.exif_transpose(image))
    rgb.thumbnail((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    data = b""
    for quality in (85, 78, 70, 62, 54, 46, 38):
        data = _jpeg(rgb, quality)
        if len(data) <= limits.max_bytes:
            break
    while len(data) > limits.max_bytes and max(rgb.size) > 64:  # pathological noise: smaller still
        rgb = rgb.resize((max(1, rgb.width * 3 // 4), max(1, rgb.height * 3 // 4)), Image.Resampling.LANCZOS)
        data = _jpeg(rgb, 60)
    return ProcessedImage(data, "image/jpeg", rgb.width, rgb.height, hashlib.sha256(data).hexdigest(), True)


def _flattened(image: Image.Image) -> Image.Image:
    """RGB; transparency composed onto white (JPEG has no alpha)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=True, progressive=True)
    return out.getvalue()


class MediaService:
    def __init__(self, repo: MediaRepository, clock: Clock, limits: ImageLimits | None = None) -> None:
        self._repo = repo
        self._clock = clock
        self._limits = limits or ImageLimits()

    async def upload(self, user: User, raw: bytes) -> Media:
        """Check and normalise an image (in a thread: decoding is CPU work) and store it for `user`."""
        if not raw:
            raise InvalidInput("the file is empty", {"field": "file"})
        image = await asyncio.to_thread(process_image, raw, self._limits)
        existing = await self._repo.find(user.id, image.sha256)
        if existing is not None:
            return existing
        return await self._repo.add(user.id, image, self._clock.now())

    async def get(self, user: User, media_id: UUID) -> Media:
        """Media the user may see: their own uploads; admins see all. Anything else is not found."""
        media = await self._repo.get(media_id)
        if media is None or not (user.is_admin or media.user_id == user.id):
            raise NotFound("media not found")
        return media
