"""Images the explorer shows: scikit-image samples by name and uploads, checked before decoding."""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict

from ..data.images import SAMPLE_IMAGES, load_image

#: largest upload accepted, in bytes (a 24-megapixel JPEG is far smaller)
MAX_UPLOAD_BYTES = 25 * 1024 * 1024
#: largest decoded image accepted, in pixels (decoding allocates 3 bytes per pixel and more)
MAX_PIXELS = 50_000_000

SAMPLE_PREFIX = "skimage:"
UPLOAD_PREFIX = "upload:"


class UnknownImage(LookupError):
    """An image id the explorer does not hold (never uploaded, or evicted)."""


def decode_upload(data: bytes):  # noqa: ANN201 - PIL.Image.Image
    """An RGB ``PIL.Image`` from the bytes of an uploaded file; ``ValueError`` saying what is wrong
    (empty, too large in bytes or pixels, not an image, damaged) otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("the upload is empty; choose an image file (PNG, JPEG, WebP, ...)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(
            f"the upload is {len(data) / 2**20:.1f} MiB; the explorer takes images up to "
            f"{MAX_UPLOAD_BYTES // 2**20} MiB (resize it first)"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError(
            "the upload is not an image the explorer can read; send a PNG, JPEG, WebP, GIF or BMP file"
        ) from None
    width, height = image.size  # from the header: checked before the pixels are decoded
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels); the explorer takes "
            f"up to {MAX_PIXELS / 1e6:.0f} megapixels (resize it first)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files
        raise ValueError(
            f"the image file is damaged or truncated ({err}); send a complete image file"
        ) from None
    return image.convert("RGB")


class ImageStore:
    """The images a session can pick: every bundled sample, and the latest ``max_uploads`` uploads.

    Ids are ``skimage:NAME`` for samples and ``upload:<hash of the bytes>`` for uploads, so the same
    file uploaded twice is one image. Not thread-safe: the caller holds a lock.
    """

    def __init__(self, max_uploads: int = 16) -> None:
        if max_uploads < 1:
            raise ValueError(f"max_uploads must be >= 1, got {max_uploads}")
        self.max_uploads = max_uploads
        self._uploads: OrderedDict[str, object] = OrderedDict()

    @staticmethod
    def sample_ids() -> list[str]:
        return [SAMPLE_PREFIX + name for name in SAMPLE_IMAGES]

    def add_upload(self, data: bytes) -> str:
        """Decode ``data`` (see :func:`decode_upload`), keep it, and return its id."""
        image_id = UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()[:16]
        if image_id in self._uploads:
            self._uploads.move_to_end(image_id)
            return image_id
        self._uploads[image_id] = decode_upload(data)
        while len(self._uploads) > self.max_uploads:
            self._uploads.popitem(last=False)
        return image_id

    def get(self, image_id: str):  # noqa: ANN201 - PIL.Image.Image
        """The RGB image with id ``image_id``; :class:`UnknownImage` when there is none."""
        if not isinstance(image_id, str):
            raise ValueError(f"an image id is a string such as 'skimage:astronaut', got {image_id!r}")
        if image_id.startswith(SAMPLE_PREFIX):
            if image_id[len(SAMPLE_PREFIX) :] not in SAMPLE_IMAGES:
                raise UnknownImage(
                    f"unknown sample image {image_id!r}; choose one of {', '.join(self.sample_ids())}"
                )
            return load_image(image_id)
        if image_id in self._uploads:
            self._uploads.move_to_end(image_id)
            return self._uploads[image_id]
        raise UnknownImage(
            f"unknown image {image_id!r}: upload it again (the explorer keeps the {self.max_uploads} "
            "latest uploads) or pick a sample"
        )
