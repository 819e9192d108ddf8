"""Image files made by the tests (never cut from CIFAR-10): encoders, odd formats, bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from tests.conftest import make_images


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (grayscale (H, W, 1) or RGB (H, W, 3)) from TensorFlow's encoder."""
    import tensorflow as tf

    return tf.io.encode_png(array.astype(np.uint16)).numpy()


def corrupt_png() -> bytes:
    """A PNG with a valid header whose compressed pixel data has 64 bytes zeroed."""
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = bytearray(encode(noise))
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    return bytes(data)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: a few kB on disk, width*height pixels once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))


def sample_image(index: int = 3) -> np.ndarray:
    images, _ = make_images(1, seed=5)
    return images[index]


def equivalent_pairs() -> dict[str, bytes]:
    """Palette and 16-bit images next to their 8-bit RGB equivalents."""
    from PIL import Image

    rgb = sample_image()
    gray = rgb.mean(axis=-1).round().astype(np.uint8)
    palette = Image.fromarray(rgb).quantize(64)
    return {
        "gray16.png": png16(gray[..., None].astype(np.uint16) * 257),
        "gray16_rgb.png": encode(np.stack([gray] * 3, axis=-1)),
        "rgb16.png": png16(rgb.astype(np.uint16) * 257),
        "rgb16_rgb.png": encode(rgb),
        "palette.png": encode(palette),
        "palette_rgb.png": encode(palette.convert("RGB")),
    }


def png16_zeros(width: int, height: int) -> bytes:
    """A valid 16-bit grayscale PNG of zeros: ~100 kB on disk for 7,000 x 7,000 pixels, which
    Pillow holds as 2 bytes a pixel (98 MB) once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * width)  # filter byte + two bytes a pixel
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))
