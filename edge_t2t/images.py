"""Finding and loading images for the VLM.

Remote-sensing imagery arrives in many shapes: 8-bit JPEG tiles, 16-bit single-band TIFFs,
4-band (RGB + NIR) TIFFs, palette PNGs with transparent no-data, phone photos with EXIF rotation.
Everything here turns one file into an 8-bit RGB Pillow image of bounded size, plus the SHA-256
of the exact bytes that were decoded (the caption cache key), or raises ImageError with one line
naming the file.

Size policy: images above `max_megapixels` (default 4 MP) are downscaled for the VLM. 4 MP is
larger than what any mainstream VLM image encoder looks at (LLaVA 336 px, MiniCPM-V slices up to
~1.8 MP, Qwen2-VL is capped by llama.cpp's preprocessing), so nothing the model could see is lost,
while the decoded frame (12 MB) and its PNG hand-off stay small on an edge device. Images whose
*declared* size exceeds 4x that are refused before decoding: a 16 MP limit by default, which still
admits 4000x4000 aerial tiles and 12 MP photos, but stops decompression bombs (a few KB of PNG that
claim gigapixels). Raise --max-megapixels to admit larger images.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageError
from .hashing import sha256_bytes

if TYPE_CHECKING:  # Pillow is imported inside functions so `edge-t2t --help` starts fast
    from PIL.Image import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})
DEFAULT_MAX_MEGAPIXELS = 4.0
BOMB_FACTOR = 4  # refuse images whose declared size exceeds BOMB_FACTOR x max_megapixels
# What Pillow raises on a damaged or unsupported file, read from its sources (13.0: ImageFile.load
# and the PNG/JPEG/TIFF/WebP plugins raise OSError, UnidentifiedImageError (an OSError),
# SyntaxError, ValueError and EOFError, and unpack headers with struct, so struct.error and
# IndexError escape). 13,500 randomly damaged PNG/JPEG/TIFF/WebP/GIF/BMP files raised only OSError
# and DecompressionBombError, which callers name on their own where a size limit is set.
PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


def _report_to_stderr(path: Path, reason: str) -> None:
    print(f"edge-t2t: skipping {path}: {reason}", file=sys.stderr)


def find_images(
    paths: Iterable[str | os.PathLike],
    on_error: Callable[[Path, str], None] | None = None,
) -> Iterator[Path]:
    """Yield image files under `paths`, depth first, sorted by name within each directory.

    Files named explicitly are yielded whatever their extension (the user asked for them; the
    loader says if they are not images); files found in directories are filtered by extension,
    case-insensitively. Symbolic links are followed, but a directory reached twice (a link loop,
    or two links to one place) is walked once, and a file reached twice is yielded once.
    Missing paths and unreadable directories go to `on_error(path, reason)` and the walk goes on.
    """
    report = on_error or _report_to_stderr
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def file_once(path: Path) -> bool:
        try:
            st = path.stat()
        except OSError as exc:
            report(path, exc.strerror or str(exc))
            return False
        if not _utf8_name(path):
            # The store, the cache and every JSON output are UTF-8 text: a name that cannot be
            # written there is refused up front rather than failing halfway through a batch.
            report(path, "file name is not valid UTF-8: rename the file (e.g. with convmv) and run again")
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen_files:
            return False
        seen_files.add(key)
        return True

    def walk(directory: Path) -> Iterator[Path]:
        try:
            st = directory.stat()
        except OSError as exc:
            report(directory, exc.strerror or str(exc))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # link loop or a second link to the same directory
            return
        seen_dirs.add(key)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            report(directory, f"cannot list directory ({exc.strerror or exc})")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
                is_file = not is_dir and entry.is_file()
            except OSError as exc:
                report(path, exc.strerror or str(exc))
                continue
            if is_dir:
                yield from walk(path)
            elif is_file and path.suffix.lower() in IMAGE_EXTENSIONS and file_once(path):
                yield path

    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            yield from walk(path)
        elif path.is_file():
            if file_once(path):
                yield path
        elif path.exists():  # a FIFO, socket or device file
            report(path, "not a regular file")
        else:
            report(path, "no such file or directory")


def _utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
        return False
    return True


@dataclass(frozen=True)
class ImageBytes:
    """One image file's bytes, read once, and their sha256: the hash a record keeps is of the very
    bytes that were decoded and described. `path` names where they came from (for chips, the chip's
    name); nothing here touches the disk again."""

    path: Path
    data: bytes = field(repr=False)
    sha256: str

    @classmethod
    def of(cls, path: str | os.PathLike, data: bytes) -> ImageBytes:
        return cls(Path(path), data, sha256_bytes(data))

    @classmethod
    def read(cls, path: str | os.PathLike) -> ImageBytes:
        """One open and one read of the whole file; ImageError (naming the file) when it cannot be read."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _fail(path, f"cannot read file ({exc.strerror or exc})") from None
        return cls.of(path, data)


@dataclass
class LoadedImage:
    path: Path
    sha256: str  # of the file bytes that were decoded
    width: int  # original size, after EXIF orientation
    height: int
    image: Image  # 8-bit RGB, possibly downscaled to max_megapixels
    notes: list[str] = field(default_factory=list)  # what was done: "downscaled", "stretched 2-98%", ...


def _fail(path: Path, reason: str) -> ImageError:
    return ImageError(f"{path}: {reason}")


def _stretch_to_uint8(bands):
    """Per-band 2-98 percentile stretch to 0..255 (the usual quick-look for 16-bit imagery)."""
    import numpy as np

    out = np.empty(bands.shape, dtype=np.uint8)
    for i in range(bands.shape[-1]):
        band = bands[..., i].astype(np.float64)
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            out[..., i] = 0
            continue
        lo, hi = np.percentile(finite, [2.0, 98.0])
        if hi <= lo:  # flat band: map its single value to mid-grey rather than divide by zero
            out[..., i] = np.where(np.isfinite(band), 128 if hi > 0 else 0, 0)
            continue
        scaled = (np.nan_to_num(band, nan=lo) - lo) * (255.0 / (hi - lo))
        out[..., i] = np.clip(scaled, 0, 255).astype(np.uint8)
    return out


def _pick_bands(array, bands: tuple[int, int, int] | None, path: Path):
    """From an (h, w, c) or (h, w) array, the three bands to show as R, G, B."""
    import numpy as np

    if array.ndim == 2:
        array = array[..., None]
    count = array.shape[-1]
    if bands is None:
        picked = [0, 1, 2] if count >= 3 else [0, 0, 0]
    else:
        if any(b < 0 or b >= count for b in bands):
            raise _fail(path, f"--bands {','.join(str(b + 1) for b in bands)} asked for, but the image has {count} band(s)")
        picked = list(bands)
    return np.ascontiguousarray(array[..., picked])


def _to_rgb8(im, path: Path, bands: tuple[int, int, int] | None, background: str, notes: list[str]):
    """Any Pillow mode -> 8-bit RGB."""
    import numpy as np
    from PIL import Image as PILImage

    mode = im.mode
    if mode == "P":
        # Palette images may carry a transparent index; going through RGBA keeps it.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") and bands is None:
        rgba = im.convert("RGBA")
        base = PILImage.new("RGBA", rgba.size, background)
        notes.append(f"alpha composited on {background}")
        return PILImage.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB" and bands is None:
        return im
    if mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV") and bands is None:
        return im.convert("RGB")
    # Multi-band (RGBA with chosen bands) or high bit depth (I;16*, I, F): via numpy.
    try:
        array = np.asarray(im)
    except (KeyError, *PIL_ERRORS) as exc:  # a mode ImageMode does not know (KeyError), or its pixels fail
        raise _fail(path, f"unsupported pixel mode {mode} ({exc})") from None
    return _array_to_rgb(array, path, bands, notes)


def _array_to_rgb(array, path: Path, bands: tuple[int, int, int] | None, notes: list[str]):
    """(h, w[, c]) array of any numeric dtype -> 8-bit RGB Pillow image."""
    import numpy as np
    from PIL import Image as PILImage

    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    rgb = _pick_bands(array, bands, path)
    if bands is not None:
        notes.append(f"bands {','.join(str(b + 1) for b in bands)}")
    elif array.ndim == 3 and array.shape[-1] > 3:
        notes.append(f"first 3 of {array.shape[-1]} bands")
    if rgb.dtype != np.uint8:
        rgb = _stretch_to_uint8(rgb)
        notes.append(f"{array.dtype} stretched 2-98% to 8-bit")
    return PILImage.fromarray(rgb, "RGB")


def _raw_tiff_bands(im, data: bytes):
    """All bands of an uncompressed, strip-organised, chunky multi-band TIFF as an (h, w, c) array.

    Pillow has no mode for more than 3 bands or for 16-bit colour: it reads a 4-band TIFF as RGB
    (dropping band 4) and 16-bit RGB as its high bytes (too dark to see for 12-bit sensor data).
    The common uncompressed case is simple enough to read directly; for anything else (compressed,
    tiled, planar) this returns None and Pillow's 8-bit RGB reading is used.
    """
    import numpy as np

    tags = im.tag_v2
    spp = int(tags.get(277, 1))
    bits = tags.get(258, (8,))
    bits = tuple(bits) if isinstance(bits, (tuple, list)) else (bits,)
    if spp < 2 or (spp <= 3 and max(bits) <= 8) or len(set(bits)) != 1:
        return None  # Pillow reads these fully
    if tags.get(259, 1) != 1 or tags.get(284, 1) != 1 or 273 not in tags or 322 in tags:
        return None
    fmt = tags.get(339, (1,))
    fmt = (tuple(fmt) if isinstance(fmt, (tuple, list)) else (fmt,))[0]
    kind = {1: "u", 2: "i", 3: "f"}.get(fmt)
    if kind is None or bits[0] not in (8, 16, 32, 64) or (kind == "f" and bits[0] < 32):
        return None
    dtype = np.dtype(f"{'<' if data[:2] == b'II' else '>'}{kind}{bits[0] // 8}")
    offsets, counts = tags[273], tags.get(279)
    offsets = offsets if isinstance(offsets, (tuple, list)) else (offsets,)
    counts = counts if isinstance(counts, (tuple, list)) else (counts,)
    width, height = im.size
    need = width * height * spp * dtype.itemsize
    raw = b"".join(data[o : o + c] for o, c in zip(offsets, counts, strict=False))
    if len(raw) < need:
        raise ValueError(f"truncated TIFF strips ({len(raw)} of {need} bytes)")
    return np.frombuffer(raw[:need], dtype=dtype).reshape(height, width, spp)


def load_image(
    source: str | os.PathLike | ImageBytes,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    bands: tuple[int, int, int] | None = None,
    background: str = "black",
    hard_limit_megapixels: float | None = None,
) -> LoadedImage:
    """Read, hash and decode one image into 8-bit RGB of at most `max_megapixels`.

    `source` is a path (read here, once) or an ImageBytes already read and hashed (decoded as is,
    with no further disk access).
    `bands` picks three 0-based bands of a multi-band image as R, G, B (default: the first three).
    Transparent pixels are composited on `background` (black suits no-data areas of imagery).
    Images declaring more than `hard_limit_megapixels` (default 4 x max_megapixels) are refused.
    Raises ImageError, with one line naming the file, for anything that is not a readable image.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps

    if max_megapixels <= 0:
        raise ImageError(f"--max-megapixels must be positive, got {max_megapixels}")
    max_pixels = int(max_megapixels * 1_000_000)
    hard_limit = int(hard_limit_megapixels * 1_000_000) if hard_limit_megapixels else max_pixels * BOMB_FACTOR
    # read once: hash and pixels come from the same bytes
    read = source if isinstance(source, ImageBytes) else ImageBytes.read(source)
    path, data, digest = read.path, read.data, read.sha256
    if not data:
        raise _fail(path, "empty file (0 bytes)")

    notes: list[str] = []
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we make both errors. The
    # limit is a process-wide global, so it is restored afterwards for other Pillow users.
    previous_limit, PILImage.MAX_IMAGE_PIXELS = PILImage.MAX_IMAGE_PIXELS, hard_limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            im = PILImage.open(io.BytesIO(data))
            width, height = im.size
            if width * height > hard_limit:
                raise _fail(
                    path,
                    f"declared size {width}x{height} ({width * height / 1e6:.1f} MP) exceeds the "
                    f"{hard_limit / 1e6:g} MP safety limit; raise --max-megapixels (now {max_megapixels:g}) "
                    "or tile the image",
                )
            raw = _raw_tiff_bands(im, data) if im.format == "TIFF" else None
            if width * height > max_pixels and im.format == "JPEG":
                # Reduce on load: libjpeg decodes at 1/2, 1/4 or 1/8 scale, far cheaper than full size.
                scale = (max_pixels / (width * height)) ** 0.5
                im.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            if raw is not None:
                rgb = _array_to_rgb(raw, path, bands, notes)
            else:
                im.load()
                orientation = im.getexif().get(0x0112, 1)
                if orientation != 1:
                    im = ImageOps.exif_transpose(im) or im
                    notes.append(f"EXIF orientation {orientation} applied")
                    if orientation in (5, 6, 7, 8):  # quarter turns: the viewer's width is the file's height
                        width, height = height, width
                rgb = _to_rgb8(im, path, bands, background, notes)
    except ImageError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise _fail(
            path,
            f"declared size exceeds the {hard_limit / 1e6:g} MP safety limit (decompression-bomb guard); "
            f"raise --max-megapixels (now {max_megapixels:g}) or tile the image",
        ) from None
    except PILImage.UnidentifiedImageError:
        hint = ""
        if path.suffix.lower() in (".tif", ".tiff"):
            hint = (
                " (Pillow cannot decode this TIFF: e.g. 16-bit multi-band or an unusual codec; convert it with "
                "`gdal_translate -ot Byte -scale -b 1 -b 2 -b 3 in.tif out.tif`)"
            )
        raise _fail(path, f"not a readable image{hint}") from None
    except MemoryError:
        raise _fail(path, "too large to decode in memory; lower --max-megapixels") from None
    except PIL_ERRORS as exc:  # a damaged file (and _raw_tiff_bands' ValueError for cut strips)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, f"cannot decode ({reason})") from None
    finally:
        PILImage.MAX_IMAGE_PIXELS = previous_limit

    if rgb.size[0] * rgb.size[1] > max_pixels:
        scale = (max_pixels / (rgb.size[0] * rgb.size[1])) ** 0.5
        target = (max(1, int(rgb.size[0] * scale)), max(1, int(rgb.size[1] * scale)))
        rgb = rgb.resize(target, PILImage.Resampling.LANCZOS, reducing_gap=3.0)
    if rgb.size != (width, height):
        notes.append(f"downscaled {width}x{height} -> {rgb.size[0]}x{rgb.size[1]}")
    return LoadedImage(path=path, sha256=digest, width=width, height=height, image=rgb, notes=notes)


def to_png_bytes(img: Image) -> bytes:
    """Lossless PNG for the VLM. Compression level 1: the bytes only cross process memory, so
    encoding speed matters more than size (level 6 is several times slower on large frames)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def thumbnail_data_uri(path_or_img: str | os.PathLike | Image, size: int = 160, quality: int = 80) -> str:
    """A `data:image/jpeg;base64,...` thumbnail (longest side `size`) for an HTML report."""
    from PIL import Image as PILImage

    if isinstance(path_or_img, PILImage.Image):
        img = path_or_img.convert("RGB") if path_or_img.mode != "RGB" else path_or_img.copy()
    else:
        img = load_image(
            path_or_img,
            max_megapixels=max(0.01, size * size * 4 / 1e6),  # decode small: JPEG draft does most of the work
            hard_limit_megapixels=DEFAULT_MAX_MEGAPIXELS * BOMB_FACTOR,
        ).image
    img.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
