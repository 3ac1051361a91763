"""Large scenes cut into chips the VLM can look at: windows, one contrast stretch per scene,
windowed reads, no-data shares.

A scene is any image bigger than the tiling threshold (default: the decompression-bomb size, so
every image the plain loader would refuse is tiled instead). GeoTIFFs, 16-bit and multi-band
files, and anything GDAL reads are opened with rasterio (the optional `geo` extra, imported
here only); a window is then read from disk without touching the rest of the file, so peak memory
depends on the chip size, not on the scene size. Without rasterio, plain JPEG/PNG/TIFF still tile
through Pillow, which decodes the file once, whole (so memory then grows with the scene); a
GeoTIFF without rasterio is refused with one line naming the extra.

The stretch of a 16-bit or multi-band scene (per-band 2-98 percentiles, as images.py does for a
single image) is computed once per scene, from an overview when the file has one and otherwise
from a grid of small windows, so neighbouring chips look alike to the model.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ImageError
from ..hashing import sha256_bytes

GEO_EXTRA_HINT = "install the geo extra: pip install 'edge-t2t[geo]' (rasterio)"
DEFAULT_CHIP = 512  # pixels, when no VLM tells us its input size
DEFAULT_OVERLAP = 0.125
MAX_NODATA_SHARE = 0.5  # chips with more no-data than this are skipped (and counted)
MIN_CHIP, MAX_CHIP = 224, 1024
_STRETCH_SAMPLE = 8  # a grid of 8 x 8 small windows when the file has no overview
_GEOTIFF_TAGS = (33550, 33922, 34264, 34735)  # pixel scale, tie points, transformation, geo keys
# GDAL's block cache defaults to 5% of RAM; a small cache keeps peak memory flat across scenes
# (1.8x more peak RSS at 6k² without it). GDAL ignores the environment variable under rasterio, so
# one rasterio.Env is entered at first use and kept for the process (never one per scene: Envs stack).
_GDAL_ENV = {"GDAL_CACHEMAX": 64, "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}
_ENV: list = []


@dataclass(frozen=True, order=True)
class Window:
    """A pixel window of a scene: column x, row y, width w, height h."""

    x: int
    y: int
    w: int
    h: int

    def name(self) -> str:
        return f"{self.x},{self.y},{self.w},{self.h}"

    @classmethod
    def parse(cls, text: str) -> Window:
        x, y, w, h = (int(v) for v in text.split(","))
        return cls(x, y, w, h)

    def overlaps(self, other: Window) -> bool:
        return self.x < other.x + other.w and other.x < self.x + self.w and self.y < other.y + other.h and other.y < self.y + self.h

    def union(self, other: Window) -> Window:
        x0, y0 = min(self.x, other.x), min(self.y, other.y)
        x1, y1 = max(self.x + self.w, other.x + other.w), max(self.y + self.h, other.y + other.h)
        return Window(x0, y0, x1 - x0, y1 - y0)


def chip_name(scene: str | os.PathLike, window: Window) -> str:
    """How a chip is named in the store, in caption files and in results: SCENE#x,y,w,h."""
    return f"{scene}#{window.name()}"


def split_chip_name(name: str) -> tuple[str, Window] | None:
    scene, sep, tail = name.rpartition("#")
    if not sep:
        return None
    try:
        return scene, Window.parse(tail)
    except ValueError:
        return None


def _starts(size: int, chip: int, step: int) -> list[int]:
    if size <= chip:
        return [0]
    starts = list(range(0, size - chip, step))
    starts.append(size - chip)  # the last row/column is clamped to the edge, never padded
    return sorted(set(starts))


def plan_windows(width: int, height: int, chip: int, overlap: float) -> list[Window]:
    """Row-major windows of `chip` pixels overlapping by `overlap` (a fraction of the chip)."""
    if chip < 16:
        raise ImageError(f"--chip must be at least 16 pixels, got {chip}")
    if not 0 <= overlap < 0.9:
        raise ImageError(f"--overlap is a fraction of the chip in [0, 0.9), got {overlap}")
    step = max(1, round(chip * (1 - overlap)))
    return [
        Window(x, y, min(chip, width), min(chip, height))
        for y in _starts(height, chip, step)
        for x in _starts(width, chip, step)
    ]


def chip_for_model(image_size: int | None) -> int:
    """The default chip: the VLM's own input size (clamped to a sane range), else DEFAULT_CHIP."""
    if not image_size:
        return DEFAULT_CHIP
    return int(min(MAX_CHIP, max(MIN_CHIP, image_size)))


# ---------------------------------------------------------------------------------------------
# Opening scenes


def _rasterio():
    try:
        import rasterio
    except ImportError:
        return None
    if not _ENV:
        env = rasterio.Env(**_GDAL_ENV)
        env.__enter__()
        _ENV.append(env)
    return rasterio


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged scene raises: Pillow's errors (images.PIL_ERRORS) and, with the geo
    extra, rasterio's RasterioError. Tried on truncated, bit-flipped, empty and garbage GeoTIFFs:
    rasterio 1.4 wraps GDAL's CPLE_* errors into RasterioIOError on open, read and MemoryFile alike."""
    from ..images import PIL_ERRORS

    rio = _rasterio()
    return (*PIL_ERRORS, rio.errors.RasterioError) if rio is not None else PIL_ERRORS


def _has_geotiff_tags(path: Path) -> bool:
    from PIL import Image

    from ..images import PIL_ERRORS

    try:
        with Image.open(path) as im:
            tags = getattr(im, "tag_v2", None)
            return bool(tags) and any(t in tags for t in _GEOTIFF_TAGS)
    except (*PIL_ERRORS, Image.DecompressionBombError):  # not a GeoTIFF Pillow can read
        return False


def scene_size(path: str | os.PathLike, data: bytes | None = None) -> tuple[int, int] | None:
    """(width, height) from the header only, or None when it cannot be told. Pillow first (a header
    read, fast: every file an index run looks at passes here), then rasterio for what Pillow cannot open.
    `data`: the file's bytes, already read (the indexer's one read), so the file is not opened again."""
    from PIL import Image

    from ..images import PIL_ERRORS

    path = Path(path)
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a size question, not a decode
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            return im.size
    except PIL_ERRORS:  # Pillow cannot open it: ask rasterio
        pass
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    rio = _rasterio()
    if rio is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if data is not None:
                with rio.MemoryFile(data) as mem, mem.open() as ds:
                    return ds.width, ds.height
            with rio.open(path) as ds:
                return ds.width, ds.height
    # RasterioIOError (GDAL's errors, wrapped); ValueError from MemoryFile.open on empty bytes ("'driver'
    # is required", it takes them for a new file): the size cannot be told
    except (OSError, ValueError, rio.errors.RasterioError):
        return None


@dataclass
class Stretch:
    """Per-band (lo, hi) mapping to 0..255; None bands are passed through (already 8-bit)."""

    bands: list[int]  # 1-based band numbers shown as R, G, B
    lo_hi: list[tuple[float, float]] | None  # None: 8-bit data, no stretch
    source: str = ""  # "overview", "sample" or "none"

    def apply(self, data: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """(c, h, w) raw bands -> (h, w, 3) uint8; invalid pixels black."""
        if self.lo_hi is None:
            out = data.astype(np.uint8, copy=False)
        else:
            out = np.empty(data.shape, np.uint8)
            for i, (lo, hi) in enumerate(self.lo_hi):
                band = data[i].astype(np.float32)
                if hi <= lo:
                    out[i] = np.where(band >= hi, 128 if hi > 0 else 0, 0)
                else:
                    out[i] = np.clip((band - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
        if out.shape[0] == 1:
            out = np.repeat(out, 3, axis=0)
        out = np.moveaxis(out, 0, -1)
        if valid is not None:
            out[~valid] = 0
        return np.ascontiguousarray(out)

    def to_dict(self) -> dict:
        return {"bands": self.bands, "lo_hi": self.lo_hi, "source": self.source}


@dataclass
class SceneFile:
    """An open scene: size, bands, georeferencing, and windowed reads of chips."""

    path: Path
    width: int
    height: int
    count: int
    dtype: str
    crs: str | None = None  # WKT, None when the file has no CRS
    transform: tuple[float, ...] | None = None  # affine a, b, c, d, e, f (x = a*col + b*row + c)
    notes: list[str] = field(default_factory=list)
    _ds: object = None  # rasterio dataset, or None
    _pil: object = None  # Pillow image (fallback reader), or None
    stretch: Stretch | None = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    @property
    def rotated(self) -> bool:
        return bool(self.transform) and (self.transform[1] != 0 or self.transform[3] != 0)

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None
        if self._pil is not None:
            self._pil.close()
            self._pil = None

    def __enter__(self) -> SceneFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------------
    def _read(self, window: Window, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(bands (c, h, w) for the stretch's bands, valid mask (h, w)); ImageError (one line) when
        the file cannot give them, e.g. a truncated GeoTIFF."""
        try:
            return self._read_raw(window, out_shape)
        except _read_errors() as exc:
            raise ImageError(f"{self.path}: cannot read window {window.name()} ({_first_line(exc)})") from None

    def _read_raw(self, window: Window, out_shape: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        bands = self.stretch.bands if self.stretch else [1, 2, 3][: min(3, self.count)]
        if self._ds is not None:
            from rasterio.windows import Window as RioWindow

            rw = RioWindow(window.x, window.y, window.w, window.h)
            shape = (len(bands), *out_shape) if out_shape else None
            data = self._ds.read(bands, window=rw, out_shape=shape)
            mask = self._ds.read_masks(1, window=rw, out_shape=out_shape) > 0
            return data, mask
        box = (window.x, window.y, window.x + window.w, window.y + window.h)
        im = self._pil.crop(box)
        if out_shape:
            im = im.resize((out_shape[1], out_shape[0]))
        arr = np.asarray(im)
        if arr.ndim == 2:
            arr = arr[..., None]
        mask = arr[..., -1] > 0 if im.mode in ("RGBA", "LA") else np.ones(arr.shape[:2], bool)
        arr = np.moveaxis(arr, -1, 0)
        picked = [b - 1 for b in bands if b - 1 < arr.shape[0]]
        return arr[picked], mask

    def nodata_share(self, window: Window) -> float:
        """Share of no-data pixels in a window (0 when the file declares no no-data, mask or alpha)."""
        if self._pil is not None and self._pil.mode not in ("RGBA", "LA"):
            return 0.0
        if self._ds is not None:
            # The full-resolution mask of the window: GDAL's decimated mask reads resample and are
            # ~15x slower than decoding the window's blocks (bench/results/scene_tiling.md).
            from rasterio.windows import Window as RioWindow

            try:
                mask = self._ds.read_masks(1, window=RioWindow(window.x, window.y, window.w, window.h))
            except _read_errors() as exc:
                raise ImageError(f"{self.path}: cannot read window {window.name()} ({_first_line(exc)})") from None
            return float(np.mean(mask == 0))
        return float(np.mean(~self._read(window)[1]))

    def read_chip(self, window: Window):
        """The window as an 8-bit RGB Pillow image, stretched with the scene's stretch."""
        from PIL import Image

        data, valid = self._read(window)
        return Image.fromarray(self.stretch.apply(data, valid), "RGB")

    def overview(self, max_side: int = 256):
        """A small RGB picture of the whole scene (for reports), read decimated."""
        from PIL import Image

        scale = max(self.width, self.height) / max_side
        shape = (max(1, round(self.height / scale)), max(1, round(self.width / scale)))
        data, valid = self._read(Window(0, 0, self.width, self.height), shape)
        return Image.fromarray(self.stretch.apply(data, valid), "RGB")


def open_scene(path: str | os.PathLike, bands: tuple[int, int, int] | None = None) -> SceneFile:
    """Open a scene for windowed reads and compute its stretch once. Raises ImageError (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    rio = _rasterio()
    if rio is None:
        if path.suffix.lower() in (".tif", ".tiff") and _has_geotiff_tags(path):
            raise ImageError(f"{path}: a GeoTIFF needs rasterio to be tiled: {GEO_EXTRA_HINT}")
        scene = _open_pillow(path)
    else:
        scene = _open_rasterio(rio, path)
    try:
        scene.stretch = _scene_stretch(scene, bands)
    except ImageError:
        scene.close()
        raise
    except _read_errors() as exc:  # e.g. no valid pixel to sample (ValueError from numpy)
        scene.close()
        raise ImageError(f"{path}: cannot read pixels ({_first_line(exc)})") from None
    except BaseException:
        scene.close()
        raise
    return scene


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _open_rasterio(rio, path: Path) -> SceneFile:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning: handled below, with a note
            ds = rio.open(path)
    except _read_errors() as exc:
        raise ImageError(f"{path}: not a readable raster ({_first_line(exc)})") from None
    notes = []
    crs = ds.crs.to_wkt() if ds.crs else None
    t = ds.transform
    transform = (t.a, t.b, t.c, t.d, t.e, t.f)
    if transform == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0):
        transform = None
    if crs is None:
        notes.append("no CRS: pixel windows only, no map footprints")
    elif transform is None:
        notes.append("no geotransform: pixel windows only, no map footprints")
        crs = None
    if transform and (t.b or t.d):
        notes.append("rotated geotransform: footprints follow the rotation")
    return SceneFile(path, ds.width, ds.height, ds.count, str(ds.dtypes[0]), crs, transform, notes, _ds=ds)


def _open_pillow(path: Path) -> SceneFile:
    from PIL import Image

    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # we tile on purpose
    try:
        im = Image.open(path)
        im.load()  # Pillow cannot read windows: the whole frame, once per scene
    except (*_read_errors(), MemoryError) as exc:
        raise ImageError(f"{path}: not a readable image ({_first_line(exc)}); for GeoTIFFs {GEO_EXTRA_HINT}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I;16B", "I", "F"):
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    count = len(im.getbands())
    notes = ["without the geo extra the scene is decoded whole (memory grows with its size)"]
    dtype = "uint8" if im.mode in ("RGB", "RGBA", "L", "LA") else "uint16"
    return SceneFile(path, im.width, im.height, count, dtype, None, None, notes, _pil=im)


def _scene_stretch(scene: SceneFile, bands: tuple[int, int, int] | None) -> Stretch:
    """Pick the bands to show and, for data that is not 8-bit, one stretch for the whole scene."""
    count = scene.count if scene._pil is None else len([b for b in scene._pil.getbands() if b != "A"])
    if bands is not None:
        if any(b < 0 or b >= count for b in bands):
            raise ImageError(f"{scene.path}: --bands asked for band {max(bands) + 1}, but the scene has {count}")
        picked = [b + 1 for b in bands]
    else:
        picked = [1, 2, 3] if count >= 3 else [1]
    if count > 3 and bands is None:
        scene.notes.append(f"first 3 of {count} bands")
    if scene.dtype == "uint8":
        return Stretch(picked, None, "none")
    scene.stretch = Stretch(picked, None)  # so _read picks these bands
    source = "sample"
    if scene._ds is not None and scene._ds.overviews(1):
        side = 1024
        scale = max(scene.width, scene.height) / side
        shape = (max(1, round(scene.height / scale)), max(1, round(scene.width / scale)))
        data, valid = scene._read(Window(0, 0, scene.width, scene.height), shape)
        samples = [data[:, valid]]
        source = "overview"
    else:
        samples = []
        side = 128
        for y in np.linspace(0, max(0, scene.height - side), _STRETCH_SAMPLE).astype(int):
            for x in np.linspace(0, max(0, scene.width - side), _STRETCH_SAMPLE).astype(int):
                w = Window(int(x), int(y), min(side, scene.width), min(side, scene.height))
                data, valid = scene._read(w)
                samples.append(data[:, valid])
    values = np.concatenate(samples, axis=1).astype(np.float64)
    lo_hi = []
    for band in values:
        finite = band[np.isfinite(band)]
        lo, hi = np.percentile(finite, [2.0, 98.0]) if finite.size else (0.0, 0.0)
        lo_hi.append((float(lo), float(hi)))
    scene.notes.append(f"{scene.dtype} stretched 2-98% once per scene (from {'an overview' if source == 'overview' else 'a sample'})")
    return Stretch(picked, lo_hi, source)


# ---------------------------------------------------------------------------------------------
# Planning a scene's chips


@dataclass
class ChipPlan:
    window: Window
    nodata: float  # share of no-data pixels, 0..1
    skipped: bool  # mostly no-data: not described


def plan_chips(scene: SceneFile, chip: int, overlap: float, max_nodata: float = MAX_NODATA_SHARE) -> list[ChipPlan]:
    out = []
    for w in plan_windows(scene.width, scene.height, chip, overlap):
        share = scene.nodata_share(w)
        out.append(ChipPlan(w, share, share > max_nodata))
    return out


def chip_sha256(image) -> str:
    """Identity of a chip's pixels (what the caption cache would key it by)."""
    return sha256_bytes(image.tobytes())

