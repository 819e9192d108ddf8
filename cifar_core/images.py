"""The one image decoder: encoded bytes -> 32x32 RGB uint8, as every part of the project sees
an image (the image-folder data source, batch scoring, serving).

- **Formats**: only ``ALLOWED_FORMATS`` are opened (Pillow would otherwise hand an EPS file to
  Ghostscript, or try dozens of rarer decoders).
- **Pixel cap before decoding**: the header's width x height is checked against
  ``max_pixels`` before any pixel data is decoded (a small PNG can declare 40,000 x 40,000
  pixels); Pillow's own ``MAX_IMAGE_PIXELS`` guard is set to the same cap.
- **Modes**: 1/L/P/CMYK/YCbCr -> RGB with ``convert("RGB")``; alpha (RGBA, LA, PA) dropped,
  not composited; 16-bit grayscale scaled by 255/65535 (Pillow's convert would clip at 255);
  32-bit float refused (no agreed range).
- **Geometry**: EXIF orientation applied; any other size resized (not cropped) to 32x32 with
  bilinear filtering; large JPEGs are first decoded at a reduced DCT scale (never below
  32 px), as Pillow's ``thumbnail`` does.

Every failure is an ``ImageError`` whose ``kind`` is a short fixed phrase ("not an image",
"too large", "corrupt image", ...) that callers count and report.
"""

from __future__ import annotations

import io
import time
import warnings

import numpy as np

#: Side of the images the decoder produces: CIFAR-10's native size, what training stores.
DECODE_SIZE = 32
#: Refuse images whose header declares more pixels than this (50 MP = 150 MB as RGB).
DEFAULT_MAX_PIXELS = 50_000_000
#: Pillow format names the decoder opens (PNG and JPEG are what CIFAR-10 tools write).
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
EXIF_ORIENTATION = 0x0112
#: Bumped whenever decoding changes what pixels come out (part of the data cache's key).
DECODER_VERSION = 2
#: 16-bit value -> 8-bit: rint(v * 255 / 65535), the scaling the decoder has always used.
_SIXTEEN_TO_EIGHT = np.rint(np.arange(65536) * (255.0 / 65535.0)).astype(np.uint8)


class ImageError(Exception):
    """One image cannot be decoded; ``kind`` is a short fixed phrase counted in summaries."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """One encoded image -> (32, 32, 3) uint8 RGB. Raises ``ImageError``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty file", "0 bytes")
    # Pillow's own guard at our cap: open() raises DecompressionBombError above twice the cap
    # and warns above it; the explicit check below turns "above" into an error.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # the header only
    except UnidentifiedImageError:
        raise ImageError("not an image", "no allowed image format recognised "
                         f"({', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as error:
        raise ImageError("too large", f"{one_line(error)}: not decoded") from None
    except Exception as error:
        raise ImageError("corrupt image", one_line(error)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError("too large", f"{width}x{height} = {width * height} pixels exceeds "
                             f"the cap of {max_pixels}: not decoded")
        try:
            image.draft("RGB", (DECODE_SIZE, DECODE_SIZE))  # JPEG: DCT downscale, >= 32 px
            image.load()  # first: a failed load must surface here, not inside getexif()
            rgb = _to_rgb(image)
        except ImageError:
            raise
        except Exception as error:  # truncated data, bad checksums, decoder errors
            raise ImageError("corrupt image", one_line(error)) from None
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # a damaged EXIF block does not make the pixels unusable
            orientation = 1
        if rgb.size != (DECODE_SIZE, DECODE_SIZE):
            rgb = rgb.resize((DECODE_SIZE, DECODE_SIZE), Image.Resampling.BILINEAR)
        transpose = _orientation_transpose(orientation)
        if transpose is not None:
            # Transposing after the square resize equals transposing first: same pixels.
            rgb = rgb.transpose(transpose)
        return np.array(rgb, dtype=np.uint8)  # a copy: ``rgb`` may be ``image`` itself


def decode_rows(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """A batch of rows (``bytes``, ``status``, ``error``) -> ``image`` (N, 32, 32, 3) uint8 plus
    per-row ``decode_s``; a row that fails becomes ``status`` "error". Never raises (a Ray Data
    stage of batch scoring and the serving replicas' decode step)."""
    count = len(batch["path"])
    status = np.array(batch["status"], dtype=object)
    errors = np.array(batch["error"], dtype=object)
    images = np.zeros((count, DECODE_SIZE, DECODE_SIZE, 3), dtype=np.uint8)
    seconds = np.zeros(count, dtype=np.float64)
    for index in range(count):
        if status[index] == "error":
            continue
        start = time.perf_counter()
        try:
            images[index] = decode_image(batch["bytes"][index], max_pixels)
            status[index] = "ok"
        except ImageError as error:
            status[index], errors[index] = "error", str(error)
        except Exception as error:  # a decoder bug on one file must not end the job
            status[index], errors[index] = "error", f"corrupt image: {one_line(error)}"
        seconds[index] = time.perf_counter() - start
    output = {name: values for name, values in batch.items() if name != "bytes"}
    return {**output, "status": status, "error": errors, "image": images, "decode_s": seconds}


def _to_rgb(image):
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale: scale 0..65535 onto 0..255 (Pillow's convert would clip at 255).
        # Mode "I" (32-bit) is what older Pillows give 16-bit PNGs; it is treated as 16-bit.
        # A lookup table, not float arithmetic: 1 byte a pixel more, not 8 (a 49-MP image
        # peaked at 1.26 GB the float way), and the square resize before the gray -> RGB
        # copy (they commute: RGB here is the gray value three times).
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16, copy=False)
        gray = Image.fromarray(_SIXTEEN_TO_EIGHT[values], "L")
        if gray.size != (DECODE_SIZE, DECODE_SIZE):
            gray = gray.resize((DECODE_SIZE, DECODE_SIZE), Image.Resampling.BILINEAR)
        return gray.convert("RGB")
    if mode == "F":
        raise ImageError("unsupported image", "32-bit float pixels have no agreed range")
    # 16-bit RGB(A) PNGs already arrive as 8-bit RGB(A): Pillow keeps each value's high byte.
    return image if mode == "RGB" else image.convert("RGB")  # (no full-size copy of RGB)


def _orientation_transpose(orientation: int):
    """The transpose that undoes an EXIF orientation tag (None for 1, "normal")."""
    from PIL import Image

    t = Image.Transpose
    return {2: t.FLIP_LEFT_RIGHT, 3: t.ROTATE_180, 4: t.FLIP_TOP_BOTTOM, 5: t.TRANSPOSE,
            6: t.ROTATE_270, 7: t.TRANSVERSE, 8: t.ROTATE_90}.get(orientation)


def one_line(error: BaseException) -> str:
    """An exception as one short line, for error rows and messages."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 RGB image (sample export and test fixtures)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
