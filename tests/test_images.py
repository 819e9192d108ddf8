"""The one image decoder (cifar_core/images.py): modes, sizes, orientation, bad input, bombs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from cifar_core.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from tests.imaging import bomb_png, corrupt_png, encode, equivalent_pairs, sample_image

REPO = Path(__file__).resolve().parent.parent


def test_decode_scales_16_bit_and_matches_8_bit_equivalents():
    decoded = {name: decode_image(data) for name, data in equivalent_pairs().items()}
    for name in ("gray16", "rgb16", "palette"):
        np.testing.assert_array_equal(decoded[f"{name}.png"], decoded[f"{name}_rgb.png"])
    # Clipping (Pillow's convert on 16-bit grayscale) would make almost every pixel 255.
    assert decoded["gray16.png"].mean() < 200


def test_decode_modes_sizes_and_orientation():
    from PIL import Image

    rgb = sample_image()
    alpha = np.random.default_rng(0).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    rgba = np.dstack([rgb, alpha])
    np.testing.assert_array_equal(decode_image(encode(rgba)), rgb)  # alpha dropped
    gray = decode_image(encode(rgb[..., 0]))
    assert gray.shape == (32, 32, 3) and (gray[..., 0] == gray[..., 2]).all()
    wide = decode_image(encode(np.zeros((60, 200, 3), np.uint8) + 90, "JPEG"))
    assert wide.shape == (32, 32, 3) and abs(int(wide.mean()) - 90) <= 2
    # EXIF orientation 6 ("rotate 90 CW to view"): a left-half-white image is shown top-white.
    half = np.zeros((32, 32, 3), np.uint8)
    half[:, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encode(half, "JPEG", exif=exif, quality=100))
    assert upright[:16].mean() > 200 and upright[16:].mean() < 50


@pytest.mark.parametrize("data, kind", [
    (b"", "empty file"),
    (b"just some text\n", "not an image"),
    (encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))[:1500],
     "corrupt image"),
    (corrupt_png(), "corrupt image"),
    (bomb_png(20_000, 20_000), "too large"),
])
def test_decode_refuses_bad_input(data, kind):
    with pytest.raises(ImageError) as error:
        decode_image(data)
    assert error.value.kind == kind


def _peak_rss_decoding(path: Path, max_pixels: int) -> tuple[str, float]:
    """Decode in a fresh process; (outcome, peak resident memory in MiB)."""
    code = (
        "import re, sys\n"
        "from cifar_core.images import decode_image, ImageError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "try:\n"
        "    decode_image(data, int(sys.argv[2])); print('decoded')\n"
        "except ImageError as error:\n"
        "    print(error.kind)\n"
        # VmHWM: this process's peak resident memory (ru_maxrss would include the pre-exec
        # copy of the parent, pytest with TensorFlow loaded).
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) / 1024)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path), str(max_pixels)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    outcome, peak = result.stdout.split("\n")[:2]
    return outcome, float(peak)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(12_000, 12_000))  # 144 MP: ~0.6 GB to decode as RGB
    assert path.stat().st_size < 100_000
    outcome, peak_mib = _peak_rss_decoding(path, DEFAULT_MAX_PIXELS)
    assert outcome == "too large"
    assert peak_mib < 200, f"refusing the image used {peak_mib:.0f} MiB"
    # Control: with the cap lifted the same file really does cost the memory (the check
    # above can fail).
    outcome, peak_mib = _peak_rss_decoding(path, 10**9)
    assert outcome == "decoded" and peak_mib > 400


def test_formats_outside_the_list_are_never_opened():
    """EPS would go to Ghostscript; the decoder opens only ALLOWED_FORMATS."""
    from cifar_core.images import ALLOWED_FORMATS

    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n%%EOF\n")
    with pytest.raises(ImageError) as error:
        decode_image(eps)
    assert error.value.kind == "not an image" and "PNG" in str(error.value)
    assert "EPS" not in ALLOWED_FORMATS
    tiff = encode(sample_image(), "TIFF")  # a real image, just not a listed format
    with pytest.raises(ImageError, match="not an image"):
        decode_image(tiff)
