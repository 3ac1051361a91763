"""Image discovery and loading: formats, bit depths, bands, alpha, EXIF, bombs and broken files.

All test images are generated here with Pillow/numpy; none are committed."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_t2t.errors import ImageError
from edge_t2t.images import find_images, load_image, thumbnail_data_uri, to_png_bytes


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _gradient_rgb(w: int = 64, h: int = 48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1), "RGB")


def _write_tiff(path: Path, array: np.ndarray) -> Path:
    """Minimal baseline TIFF (little-endian, uncompressed, one strip, chunky); extra bands unspecified."""
    a = np.ascontiguousarray(array)
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    bits = a.dtype.itemsize * 8
    data = a.astype(a.dtype.newbyteorder("<")).tobytes()
    entries = []
    extra_off = 8 + len(data)
    blobs = b""
    def add(tag, typ, values):
        nonlocal blobs
        fmt = {3: "H", 4: "I"}[typ]
        payload = struct.pack("<" + fmt * len(values), *values)
        if len(payload) <= 4:
            entries.append(struct.pack("<HHI", tag, typ, len(values)) + payload.ljust(4, b"\0"))
        else:
            off = extra_off + len(blobs)
            blobs += payload
            entries.append(struct.pack("<HHII", tag, typ, len(values), off))
    for tag, typ, values in [
        (256, 4, [w]), (257, 4, [h]), (258, 3, [bits] * c), (259, 3, [1]), (262, 3, [2 if c >= 3 else 1]),
        (273, 4, [8]), (277, 3, [c]), (278, 4, [h]), (279, 4, [len(data)]), (284, 3, [1]),
    ]:
        add(tag, typ, values)
    if c > 3 or c == 2:
        add(338, 3, [0] * (c - (3 if c >= 3 else 1)))
    if a.dtype.kind == "f":
        add(339, 3, [3] * c)
    ifd_off = extra_off + len(blobs)
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    with open(path, "wb") as fh:
        fh.write(b"II*\0" + struct.pack("<I", ifd_off) + data + blobs + ifd)
    return path


# ---------------------------------------------------------------- find_images


def test_find_images_sorted_filtered_recursive(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    for name in ["b/z.PNG", "b/y.jpg", "a/x.TIF", "a/notes.txt", "w.webp", "v.jpeg", "a/u.tiff"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])]
    assert found == ["a/u.tiff", "a/x.TIF", "b/y.jpg", "b/z.PNG", "v.jpeg", "w.webp"]


def test_find_images_survives_symlink_loop_and_reports_missing(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "img.png").write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "d" / "loop")  # d/loop -> root -> d -> loop ...
    os.symlink(tmp_path / "d" / "img.png", tmp_path / "alias.png")  # the same file twice
    errors: list[tuple[Path, str]] = []
    found = list(find_images([tmp_path, tmp_path / "missing.jpg"], on_error=lambda p, r: errors.append((p, r))))
    assert len(found) == 1
    assert found[0].name in ("img.png", "alias.png")
    assert [p.name for p, _ in errors] == ["missing.jpg"]


def test_find_images_reports_unreadable_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(b"x")
    (tmp_path / "ok.png").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path):  # chmod 0 does not stop root, so refuse the listing the way the OS would
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("edge_t2t.images.os.scandir", scandir)
    errors: list = []
    found = list(find_images([tmp_path], on_error=lambda p, r: errors.append((p, r))))
    assert [p.name for p in found] == ["ok.png"]
    assert len(errors) == 1 and errors[0][0] == locked and "Permission denied" in errors[0][1]


def test_find_images_keeps_explicit_file_with_any_extension(tmp_path: Path) -> None:
    f = tmp_path / "scene.dat"
    f.write_bytes(b"x")
    assert list(find_images([f])) == [f]


# ---------------------------------------------------------------- load_image


def test_load_real_sample_hash_matches_file_bytes(rsicd_samples: Path) -> None:
    path = rsicd_samples / "airport_17.jpg"
    loaded = load_image(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    declared = Image.open(path).size
    assert (loaded.width, loaded.height) == declared
    assert loaded.image.mode == "RGB" and loaded.image.size == declared  # small: not downscaled
    assert loaded.notes == []


def test_png_bytes_round_trip(tmp_path: Path) -> None:
    img = _gradient_rgb()
    back = Image.open(io.BytesIO(to_png_bytes(img)))
    assert back.format == "PNG"
    assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))


def test_16bit_single_band_tiff_is_stretched_to_8bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1000, 3000, size=(40, 50), dtype=np.uint16)
    data[0, 0] = 65000  # a hot pixel: the 2-98% stretch must ignore it
    path = _save(Image.fromarray(data), tmp_path / "dem.tif")  # Pillow writes I;16
    loaded = load_image(path)
    arr = np.asarray(loaded.image)
    assert loaded.image.mode == "RGB" and arr.shape == (40, 50, 3)
    assert arr.min() == 0 and arr.max() == 255
    assert np.array_equal(arr[..., 0], arr[..., 1])  # single band shown as grey
    # Without the percentile stretch, 1000..3000 of 65535 would all map to under 12.
    assert np.median(arr) > 60
    assert any("stretched" in n for n in loaded.notes)


def test_four_band_8bit_tiff_first_three_or_chosen_bands(tmp_path: Path) -> None:
    bands = np.zeros((20, 30, 4), np.uint8)
    for i, value in enumerate((10, 20, 30, 200)):
        bands[..., i] = value
    path = _write_tiff(tmp_path / "rgbn.tif", bands)  # R, G, B, NIR (ExtraSamples unspecified)
    first = load_image(path)
    assert tuple(np.asarray(first.image)[0, 0]) == (10, 20, 30)
    assert "first 3 of 4 bands" in first.notes
    picked = load_image(path, bands=(3, 2, 1))  # false-colour NIR, B, G
    assert tuple(np.asarray(picked.image)[0, 0]) == (200, 30, 20)
    with pytest.raises(ImageError, match="4 band"):
        load_image(path, bands=(4, 2, 1))


def test_four_band_16bit_tiff_is_stretched_per_band(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    bands = np.stack([rng.integers(lo, lo + 500, size=(32, 32)) for lo in (100, 2000, 4000, 9000)], -1)
    path = _write_tiff(tmp_path / "s2.tif", bands.astype(np.uint16))
    loaded = load_image(path, bands=(3, 0, 1))
    arr = np.asarray(loaded.image)
    assert arr.shape == (32, 32, 3)
    for i in range(3):  # each band spans the full 8-bit range after its own stretch
        assert arr[..., i].min() == 0 and arr[..., i].max() == 255
    # Pixel order survives: the brightest NIR pixel is white in the red channel.
    assert arr[..., 0].flat[int(np.argmax(bands[..., 3]))] == 255


def test_palette_png_with_transparency_composited(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (8, 0, 16, 16))  # right half green, left half index 0 = transparent red
    img.info["transparency"] = 0
    path = _save(img, tmp_path / "pal.png", transparency=0)
    arr = np.asarray(load_image(path).image)
    assert tuple(arr[0, 0]) == (0, 0, 0)  # transparent -> black background
    assert tuple(arr[0, 15]) == (0, 255, 0)
    white = np.asarray(load_image(path, background="white").image)
    assert tuple(white[0, 0]) == (255, 255, 255)


def test_rgba_png_alpha_composited(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, 4:, 3] = 255
    path = _save(Image.fromarray(arr, "RGBA"), tmp_path / "rgba.png")
    out = np.asarray(load_image(path).image)
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 7]) == (200, 0, 0)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 30), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 30, 30))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(path)
    assert loaded.image.size == (30, 60)
    assert (loaded.width, loaded.height) == (30, 60)
    arr = np.asarray(loaded.image).astype(int)
    assert arr[5, 15, 0] > 200 and arr[5, 15, 2] < 60  # red ends up on top after a CW turn
    assert arr[55, 15, 2] > 200


def test_large_image_is_downscaled(tmp_path: Path) -> None:
    path = _save(_gradient_rgb(800, 600), tmp_path / "big.png")  # 0.48 MP
    loaded = load_image(path, max_megapixels=0.2)
    w, h = loaded.image.size
    assert w * h <= 200_000 and w * h > 150_000
    assert abs(w / h - 800 / 600) < 0.02
    assert (loaded.width, loaded.height) == (800, 600)
    assert any("downscaled" in n for n in loaded.notes)


def test_large_jpeg_reduced_on_load(tmp_path: Path) -> None:
    path = _save(_gradient_rgb(1000, 800), tmp_path / "big.jpg", quality=90)
    loaded = load_image(path, max_megapixels=0.25)  # 0.8 MP is under the 1 MP hard limit
    w, h = loaded.image.size
    assert w * h <= 250_000 and (loaded.width, loaded.height) == (1000, 800)


def test_declared_size_beyond_bomb_limit_is_refused(tmp_path: Path) -> None:
    # 2000x2000 = 4 MP against 0.5 MP allowed -> hard limit 2 MP: refused before decoding.
    path = _save(Image.new("L", (2000, 2000)), tmp_path / "bomb.png", optimize=True)
    assert path.stat().st_size < 50_000  # tiny file, huge declared size
    with pytest.raises(ImageError) as info:
        load_image(path, max_megapixels=0.5)
    msg = str(info.value)
    assert str(path) in msg and "--max-megapixels" in msg and "\n" not in msg
    # Far beyond the limit, Pillow's own DecompressionBombError becomes the same ImageError.
    with pytest.raises(ImageError, match="safety limit"):
        load_image(path, max_megapixels=0.1)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jpg", b""),
        ("text.jpg", b"this is not an image, just text named .jpg\n"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ],
)
def test_broken_files_raise_one_line_image_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_truncated_images_raise_image_error(tmp_path: Path, fmt: str, suffix: str) -> None:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=str(path)):
        load_image(path)


def test_webp_loads(tmp_path: Path) -> None:
    path = _save(_gradient_rgb(), tmp_path / "x.webp", lossless=True)
    assert load_image(path).image.size == (64, 48)


def test_thumbnail_data_uri(rsicd_samples: Path) -> None:
    uri = thumbnail_data_uri(rsicd_samples / "square_102.jpg", size=64)
    assert uri.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(thumb.size) == 64
    from_img = thumbnail_data_uri(_gradient_rgb(200, 100), size=50)
    assert Image.open(io.BytesIO(base64.b64decode(from_img.split(",", 1)[1]))).size == (50, 25)
