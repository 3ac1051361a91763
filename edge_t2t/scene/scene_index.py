"""Indexing large scenes: cut each into chips, describe every chip, embed, store with its place.

Called from `Indexer._run` for the files its plan set aside as scenes (larger than the tiling
threshold). A chip is described by the VLM (through the caption cache, one model load for the
whole run) or taken from a `--captions` file whose records are named SCENE#x,y,w,h (what
`edge-t2t caption` writes for a scene). Work is committed in batches of chips: after Ctrl-C the
scene stays 'partial' and the next run describes only the chips still missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..describe.captioning import CaptionSettings, CaptionSummary, InProcess
from ..embed.texts import plan_texts
from ..errors import ImageError, ModelError
from ..hashing import sha256_file
from ..images import BOMB_FACTOR, DEFAULT_MAX_MEGAPIXELS
from ..index.run_parts import Progress, provenance, record_hash, under
from ..index.store import NewText, Store
from ..records import CaptionRecord
from . import chipstore
from .geo import footprint
from .tiling import (
    DEFAULT_OVERLAP,
    MAX_NODATA_SHARE,
    ChipPlan,
    SceneFile,
    Window,
    chip_for_model,
    chip_name,
    chip_sha256,
    open_scene,
    plan_chips,
    scene_size,
    split_chip_name,
)  # fmt: skip

CHIP_BATCH = 16  # chips per commit
MAX_COMPRESSION = 1000  # declared RGB bytes per file byte above which a plain image is a bomb


@dataclass
class TilingOptions:
    """How `index`/`caption` cut large images (the --chip/--overlap/--tile-above flags)."""

    chip: int | None = None  # None: fitted to the VLM's input size (tiling.chip_for_model)
    overlap: float = DEFAULT_OVERLAP
    tile_above_mp: float | None = None  # None: the decompression-bomb size (what load_image refuses)
    max_nodata: float = MAX_NODATA_SHARE
    bands: tuple[int, int, int] | None = None

    def threshold_pixels(self) -> int:
        mp = self.tile_above_mp if self.tile_above_mp is not None else DEFAULT_MAX_MEGAPIXELS * BOMB_FACTOR
        return int(mp * 1_000_000)

    def is_scene(self, path: Path) -> bool:
        return self.is_scene_of_size(path, scene_size(path))

    def is_scene_of_size(self, path: Path, size: tuple[int, int] | None, file_bytes: int | None = None) -> bool:
        """Whether a file of `size` pixels (tiling.scene_size) is a scene; `file_bytes`, its length when
        already known (else it is stat'ed)."""
        if size is None or size[0] * size[1] <= self.threshold_pixels():
            return False
        # A few KB of PNG/JPEG claiming gigapixels is a decompression bomb, not a scene: it stays on
        # the plain path, where load_image refuses it by name. Real imagery compresses far less than
        # 1000:1; GeoTIFFs are exempt (sparse tiled files legitimately omit empty blocks).
        if path.suffix.lower() not in (".tif", ".tiff"):
            try:
                length = file_bytes if file_bytes is not None else path.stat().st_size
            except OSError:
                return False
            return size[0] * size[1] * 3 / max(1, length) <= MAX_COMPRESSION
        return True

    def chip_size(self, vlm_cfg) -> int:
        if self.chip:
            return int(self.chip)
        image_size = None
        if vlm_cfg is not None:
            from ..describe.gguf_check import inspect_gguf

            try:
                image_size = inspect_gguf(Path(vlm_cfg.mmproj)).image_size
            except (OSError, ModelError):
                image_size = None  # the VLM loader will say what is wrong with the file
        return chip_for_model(image_size)


def record_lookup(records: list[CaptionRecord]) -> dict[tuple[str, Window], CaptionRecord]:
    """Chip records by (scene file name, window) and (resolved scene path, window)."""
    out: dict[tuple[str, Window], CaptionRecord] = {}
    for rec in records:
        parts = split_chip_name(rec.image)
        if parts:
            scene, window = parts
            out.setdefault((str(Path(scene).resolve()), window), rec)
            out.setdefault((Path(scene).name, window), rec)
    return out


class ChipDescriber:
    """Chip pixels -> CaptionRecords with the configured VLM, through caption_sources (its cache,
    retries and quality checks), the model loaded once for the whole run: on the run's executor,
    else in this process, kept loaded from batch to batch."""

    def __init__(self, vlm_cfg, n_variants: int, caption: CaptionSettings):
        self.vlm_cfg = vlm_cfg
        self.n_variants = n_variants
        self._local = None if caption.executor is not None else InProcess(keep_loaded=True)
        # a chip is already the VLM's size
        self.caption = replace(caption, max_megapixels=None, executor=caption.executor or self._local)
        self.summary = CaptionSummary()  # every batch's counts, added up

    def describe(self, named_images: list[tuple[str, object]]) -> tuple[dict[str, CaptionRecord], dict[str, str], bool]:
        """(records by chip name, failures by chip name, interrupted). Each chip goes to the pipeline
        as the PNG bytes the model sees, named by the chip and hashed once (the cache keys the same
        pixels alike); its outcome comes back paired with that name."""
        from ..describe.captioning import Failure, caption_sources
        from ..images import ImageBytes, to_png_bytes

        records: dict[str, CaptionRecord] = {}
        failures: dict[str, str] = {}

        def keep(name: str, outcome: CaptionRecord | Failure) -> None:
            if isinstance(outcome, Failure):
                failures[name] = outcome.reason
            else:
                outcome.image = name
                records[name] = outcome

        items = [(name, ImageBytes.of(name, to_png_bytes(image))) for name, image in named_images]
        result = caption_sources(items, self.vlm_cfg, self.n_variants, self.caption, keep)
        self.summary.merge(result)
        return records, failures, result.interrupted

    def close(self) -> None:
        if self._local is not None:
            self._local.close()


@dataclass
class SceneCounts:
    scenes: int = 0
    chips_added: int = 0
    chips_skipped_nodata: int = 0

    def to_dict(self) -> dict:
        return {"scenes": self.scenes, "chips_added": self.chips_added, "chips_skipped_nodata": self.chips_skipped_nodata}


def _batches(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def index_scenes(indexer, store: Store, ix, files: list[Path], roots: list[Path],
                 records: list[CaptionRecord], summary, mode: str) -> None:  # fmt: skip
    """Tile, describe, embed and store each scene in `files`; drop stored scenes under `roots`
    that are gone. Counts go into the indexer's `summary` (failures one line each). Rows go to
    SQLite only; `ix.checkpoint` (an IndexDir) brings the vector snapshot up to date from them by
    key and from the deletion log, at most every 60 s and at the end of the run. `indexer` is the
    running index.indexer.Indexer, used through its public run interface only (see Indexer)."""
    opts: TilingOptions = indexer.tiling
    counts: SceneCounts = summary.scenes
    lookup = record_lookup(records)
    stored = chipstore.scene_rows(store)
    seen = {str(f) for f in files}
    gone = [row for path, row in stored.items() if path not in seen and under(path, roots)]
    if gone:
        with store.transaction():
            for row in gone:
                chipstore.remove_scene(store, row.id)
        indexer.checkpoint(ix, summary, force=False)
        summary.removed += len(gone)
    chip = opts.chip_size(indexer.vlm_cfg)
    describer = ChipDescriber(indexer.vlm_cfg, indexer.n_variants, indexer.caption) if indexer.vlm_cfg else None
    try:
        for f in files:
            try:
                _index_scene(indexer, store, ix, f, stored.get(str(f)), chip, opts, lookup, describer,
                             summary, mode)  # fmt: skip
            except ImageError as exc:
                summary.failed += 1
                summary.failures.append((str(f), str(exc).removeprefix(f"{f}: ")))
    finally:
        if describer is not None:
            describer.close()
    counts.scenes += len(files)


def _index_scene(indexer, store, ix, f: Path, old, chip: int, opts: TilingOptions, lookup, describer,
                 summary, mode) -> None:  # fmt: skip
    st = f.stat()
    same_plan = old is not None and old.chip == chip and abs(old.overlap - opts.overlap) < 1e-9
    if same_plan and old.status == "ok" and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
        summary.skipped += 1
        return
    t = time.perf_counter()
    sha = sha256_file(f)
    if same_plan and old.status == "ok" and old.sha256 == sha:
        with store.transaction():
            chipstore.update_scene_file(store, old.id, path=str(f), size=st.st_size, mtime_ns=st.st_mtime_ns)
        summary.skipped += 1
        return
    with open_scene(f, opts.bands) as scene:
        plans = plan_chips(scene, chip, opts.overlap, opts.max_nodata)
        summary.stage_seconds["scan"] += time.perf_counter() - t
        with store.transaction():
            stale: list[int] = []
            if old is not None and not (same_plan and old.sha256 == sha):
                stale = list(chipstore.chip_windows(store, old.id).values())  # another plan or content
            chipstore.remove_chips(store, stale)
            scene_id = chipstore.put_scene(store, str(f), size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha,
                                           scene=scene, chip=chip, overlap=opts.overlap)  # fmt: skip
        done = chipstore.chip_windows(store, scene_id)
        todo = [p for p in plans if not p.skipped and p.window not in done]
        if todo and describer is None and not any(key[0] in (str(f), f.name) for key in lookup):
            raise ImageError(
                f"{f}: its {len(todo)} chips need descriptions: pass --vlm MODEL.gguf --mmproj MMPROJ.gguf, or "
                f"--captions FILE with records named like {chip_name(f, todo[0].window)} (edge-t2t caption writes them)"
            )
        skipped = sum(p.skipped for p in plans)
        summary.scenes.chips_skipped_nodata += skipped
        failed = 0
        with Progress(indexer.progress and bool(todo)) as bar:
            bar.add("chips", len(todo))
            for batch in _batches(todo, CHIP_BATCH):
                failed += _chip_batch(indexer, store, ix, scene, scene_id, batch, lookup, describer, summary, mode)
                bar.advance("chips", len(batch))
                if indexer.stop_requested:
                    raise KeyboardInterrupt
        with store.transaction():
            chipstore.finish_scene(store, scene_id, total=len(plans), skipped=skipped, complete=failed == 0)
        indexer.checkpoint(ix, summary, force=False)
    summary.added += 1


def _chip_batch(indexer, store, ix, scene: SceneFile, scene_id: int, batch: list[ChipPlan], lookup,
                describer, summary, mode) -> int:  # fmt: skip
    """Describe, embed and commit one batch of chips; return how many failed."""
    t = time.perf_counter()
    images = {p.window: scene.read_chip(p.window) for p in batch}
    names = {p.window: chip_name(scene.path, p.window) for p in batch}
    found: dict[Window, CaptionRecord] = {}
    errors: dict[Window, str] = {}
    for p in batch:
        rec = lookup.get((str(scene.path), p.window)) or lookup.get((scene.path.name, p.window))
        if rec is not None:
            found[p.window] = rec
    missing = [p.window for p in batch if p.window not in found]
    from_vlm = set()
    if missing and describer is not None:
        recs, fails, interrupted = describer.describe([(names[w], images[w]) for w in missing])
        for w in missing:
            if names[w] in recs:
                found[w] = recs[names[w]]
                from_vlm.add(w)
            elif names[w] in fails:
                errors[w] = fails[names[w]]
        if interrupted:
            indexer.stop_requested = True
    elif missing:
        for w in missing:
            errors[w] = "not described in the --captions file (name it SCENE#x,y,w,h) and no --vlm given"
    summary.stage_seconds["caption"] += time.perf_counter() - t

    t = time.perf_counter()
    texts = [t for w, rec in found.items() for t in plan_texts(w, rec.variants, mode)]
    vecs = indexer.load_embedder().embed([x.text for x in texts]) if texts else None
    summary.stage_seconds["embed"] += time.perf_counter() - t

    t = time.perf_counter()
    added = []
    nodata = {p.window: p.nodata for p in batch}
    with store.transaction():
        for w, rec in found.items():
            rows = [(i, x) for i, x in enumerate(texts) if x.owner == w]
            if not rows:
                errors[w] = "its descriptions are empty"
                continue
            store.remove_path(names[w])
            image_id = store.put_image(
                names[w], sha256=chip_sha256(images[w]), width=w.w, height=w.h,
                source="vlm" if w in from_vlm else "captions", provenance=provenance(rec), desc_hash=record_hash(rec),
            )  # fmt: skip
            keys = store.add_texts(image_id, [NewText(x.ordinal, x.field, x.variant, x.text, vecs[i]) for i, x in rows])
            store.note_texts_per_image(len(keys))
            chipstore.add_chip(store, image_id, scene_id, w, nodata[w], footprint(w, scene.crs, scene.transform))
            added.append(image_id)
            summary.texts_added += len(keys)
    summary.stage_seconds["store"] += time.perf_counter() - t
    indexer.checkpoint(ix, summary, force=False)
    summary.scenes.chips_added += len(added)
    for w, why in errors.items():
        summary.failures.append((names[w], why))
    summary.failed += len(errors)
    return len(errors)


def chip_records_for(path: str | os.PathLike, opts: TilingOptions, vlm_cfg, n_variants: int, caption: CaptionSettings,
                     on_record: Callable[[CaptionRecord], None]) -> tuple[CaptionSummary, int]:  # fmt: skip
    """`edge-t2t caption` on a scene: one record per described chip, named SCENE#x,y,w,h, to `on_record`.
    Returns (the scene's CaptionSummary: its chips' counts, failures by chip name, and the seconds
    from opening the scene to its last chip; chips skipped as no-data)."""
    started = time.perf_counter()
    path = Path(path)
    chip = opts.chip_size(vlm_cfg)
    describer = ChipDescriber(vlm_cfg, n_variants, caption)
    skipped = 0
    try:
        with open_scene(path, opts.bands) as scene:
            plans = plan_chips(scene, chip, opts.overlap, opts.max_nodata)
            todo = [p for p in plans if not p.skipped]
            skipped = len(plans) - len(todo)
            for batch in _batches(todo, CHIP_BATCH):
                named = [(chip_name(path, p.window), scene.read_chip(p.window)) for p in batch]
                recs, _, interrupted = describer.describe(named)
                for name, _chip in named:
                    if name in recs:
                        w = Window.parse(name.rpartition("#")[2])
                        recs[name].extra.update({"scene": str(path), "window": [w.x, w.y, w.w, w.h]})
                        on_record(recs[name])
                if interrupted:
                    break
    finally:
        describer.close()
    describer.summary.seconds = time.perf_counter() - started
    return describer.summary, skipped
