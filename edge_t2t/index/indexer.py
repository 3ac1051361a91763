"""`edge-t2t index`: scan images, describe the new ones (VLM through the caption cache, or an
imported captions file), embed each variant, and add them to the store and the vector index.

Incremental by design. A file whose size and mtime match the store is skipped without hashing;
otherwise its sha256 decides: same content -> only the file facts are updated; content already
indexed under a path that disappeared -> a move, its descriptions follow it; content indexed
elsewhere -> a copy, its descriptions and vectors are reused. Stored files under the scanned
folders that no longer exist are removed with their vectors.

Each changed file is opened and read once: the walk only stats, then one batch of files at a time
is read, hashed, sorted (touched, moved, copied, new) and its new images described from the very
bytes that were hashed (images.ImageBytes through captioning.caption_sources), then the bytes go.
Without a VLM nothing is described: every file is read in one pass and no bytes are kept.

Work is committed in batches (one SQLite transaction each), so an interrupted run keeps every
finished batch and the next run resumes from there. The vector snapshot is brought up to date
with SQLite and saved at the end of the run and at most every 60 s during it (indexdir.py); a
search in between scores the texts committed since the last save exactly.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..describe.captioning import CaptionSettings
from ..embed.texts import PlannedText, plan_texts
from ..errors import GPUError, ImageError, InputError, StoreError
from ..images import ImageBytes
from ..modes import DEFAULT_TEXT_MODE, DTYPES, TEXT_MODES
from ..records import CaptionRecord
from .indexdir import IndexDir
from .run_parts import Progress, interrupt_deferred, provenance, record_hash, under
from .store import STORE_FILE, NewText, Store

DEFAULT_DTYPE = "i8"
STAGES = ("scan", "caption", "embed", "store", "index_save")
# Files up to this size are read whole once and their header probed from memory; a larger one may be
# a multi-GB scene, so its header is probed from disk first (a second open, for such files only).
READ_WHOLE_MAX_BYTES = 64 << 20


@dataclass
class IndexSummary:
    index_dir: str
    added: int = 0
    skipped: int = 0
    moved: int = 0
    reused: int = 0  # copies of content already indexed elsewhere
    removed: int = 0
    failed: int = 0
    texts_added: int = 0
    interrupted: bool = False
    rebuilt_vectors: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    scenes: object = None  # issue 13: scene_index.SceneCounts, set by Indexer.run

    def counts(self) -> dict:
        return {k: getattr(self, k) for k in ("added", "skipped", "moved", "reused", "removed", "failed", "texts_added")}

    def to_dict(self) -> dict:
        return {
            "index": self.index_dir,
            **self.counts(),
            "interrupted": self.interrupted,
            "rebuilt_vectors": self.rebuilt_vectors,
            "failures": [{"image": p, "error": e} for p, e in self.failures],
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            **({"scenes": self.scenes.to_dict()} if self.scenes and self.scenes.scenes else {}),  # issue 13
        }


@dataclass
class _Pending:
    path: str  # what the store keys the image by
    file: Path | None  # the file on this machine, if any
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str = ""
    width: int | None = None  # from the header of the bytes read (no second open)
    height: int | None = None
    image: ImageBytes | None = None  # the bytes read and hashed, kept only until they are described
    record: CaptionRecord | None = None
    error: str = ""
    from_vlm: bool = False
    dropped: bool = False  # not reached before Ctrl-C: left for the next run


@dataclass
class _Listing:
    """What the walk and the store tell before any file is read: the changed files (stat only) and
    the stored rows whose files are gone (for move detection, known before any hashing)."""

    stored: dict
    changed: list[_Pending]
    gone: dict
    gone_by_sha: dict  # shrinks as moves are found
    moved_ids: set[int] = field(default_factory=set)

    def unmoved(self) -> list[int]:
        """The gone rows no changed file turned out to be a move of (call once every chunk is planned)."""
        return [row.id for row in self.gone.values() if row.id not in self.moved_ids]


@dataclass
class _ChunkPlan:
    pending: list[_Pending] = field(default_factory=list)  # new content: to describe, embed and store
    touched: list[tuple[int, _Pending]] = field(default_factory=list)  # same content, new file facts
    moves: list[tuple[object, _Pending]] = field(default_factory=list)
    copies: list[tuple[object, _Pending]] = field(default_factory=list)
    removals: list[int] = field(default_factory=list)


def _out_of_space(exc: BaseException) -> bool:
    """A write failed because the disk (or the file-size limit) is full."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


def _no_vlm_error(count: int, example) -> StoreError:
    return StoreError(
        f"{count} image(s) need descriptions and no VLM is configured: install one with "
        f"`edge-t2t models add MODEL.gguf MMPROJ.gguf` (docs/models.md), or pass --vlm MODEL.gguf "
        f"--mmproj MMPROJ.gguf (or --captions FILE); e.g. {example}"
    )


class Indexer:
    """One `index` run over one index directory. Call run(); it holds the index lock throughout.

    Scenes are indexed within the run by scene/scene_index.index_scenes, through this public run
    interface: the settings (tiling, vlm_cfg, n_variants, caption, progress), load_embedder() (the
    run's embedder, loaded on first use), checkpoint(ix, summary, force) (catch the vector snapshot
    up and save it, timed as index_save) and stop_requested (set when Ctrl-C stopped describing:
    the run ends after the current batch). What both share below them is in run_parts.py.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        *,
        embedder=None,
        precision: str = "int8",
        dtype: str | None = None,
        text_mode: str | None = None,
        batch_size: int = 32,
        wait: bool = False,
        progress: bool = False,
        vlm_cfg=None,
        n_variants: int = 5,
        caption: CaptionSettings | None = None,
        tiling=None,
        exact_copy: bool | None = None,
    ):
        self.dir = Path(index_dir)
        self.embedder = embedder
        self.precision = precision
        self.dtype = dtype
        self.text_mode = text_mode
        self.exact_copy = exact_copy  # None: the index's (a new one keeps it, see vindex.py)
        self.batch_size = max(1, batch_size)
        self.wait = wait
        self.progress = progress
        self.vlm_cfg = vlm_cfg
        self.n_variants = n_variants
        self.caption = caption or CaptionSettings()
        self.stop_requested = False
        self.gpu_error: GPUError | None = None  # the device gave out: raised once the batch is committed
        # issue 13: images above the tiling threshold are scenes, cut into chips (scene_index.py)
        from ..scene.scene_index import TilingOptions

        self.tiling = tiling or TilingOptions()
        self._scene_files: list[Path] = []

    # -- set-up -------------------------------------------------------------------------------
    def load_embedder(self):
        if self.embedder is None:
            from ..embed.embedder import Embedder

            self.embedder = Embedder(precision=self.precision)
        return self.embedder

    def _settle_meta(self, store: Store) -> tuple[int, str, str]:
        emb = self.load_embedder()
        meta = store.meta()
        if "embedder_identity" not in meta:
            dtype = self.dtype or DEFAULT_DTYPE
            mode = self.text_mode or DEFAULT_TEXT_MODE
            if dtype not in DTYPES:
                raise StoreError(f"unknown --dtype {dtype!r}: use one of {', '.join(DTYPES)}")
            if mode not in TEXT_MODES:
                raise StoreError(f"unknown --text-mode {mode!r}: use one of {', '.join(TEXT_MODES)}")
            with store.transaction():
                store.set_meta("embedder_identity", emb.identity)
                store.set_meta("embedder_manifest", getattr(emb, "manifest", {}))
                store.set_meta("dim", int(emb.dim))
                store.set_meta("dtype", dtype)
                store.set_meta("text_mode", mode)
                store.set_meta("exact_copy", self.exact_copy is not False)
                # The precision the stored vectors were embedded at: what `verify --repair` embeds
                # with if the vector snapshot is lost (it is not part of the embedder's identity).
                store.set_meta("embedder_precision", getattr(emb, "precision", self.precision))
                store.set_meta("created_at", time.time())
            return int(emb.dim), dtype, mode
        store.check_identity(emb.identity)
        for key, wanted, flag in (("dtype", self.dtype, "--dtype"), ("text_mode", self.text_mode, "--text-mode")):
            if wanted and wanted != meta[key]:
                raise StoreError(
                    f"{self.dir} was created with {flag} {meta[key]}, not {wanted}: drop {flag}, "
                    f"or index into a new --index directory"
                )
        if self.exact_copy is not None and self.exact_copy != meta.get("exact_copy", True):
            have = "with" if meta.get("exact_copy", True) else "without"
            raise StoreError(f"{self.dir} was created {have} the exact copy of its vectors: drop --no-exact-copy, "
                             "or index into a new --index directory")
        return int(meta["dim"]), meta["dtype"], meta["text_mode"]

    # -- planning -----------------------------------------------------------------------------
    def _list_files(self, store: Store, paths: list[Path], summary: IndexSummary) -> _Listing:
        """Walk `paths` and stat each file; nothing is read yet. A file whose size and mtime match
        the store is skipped here, never opened."""
        from ..images import find_images

        roots = [p.expanduser().resolve() for p in paths]
        stored = store.images()
        seen: set[str] = set()
        changed: list[_Pending] = []

        def missing(path: Path, why: str) -> None:
            summary.failed += 1
            summary.failures.append((str(path), why))

        for f in find_images(roots, on_error=missing):
            f = f.resolve()
            key = str(f)
            try:
                st = f.stat()
            except OSError as exc:  # deleted (or made unreadable) since the walk found it
                missing(f, "no such file (it disappeared during the scan)" if isinstance(exc, FileNotFoundError)
                        else f"cannot read file ({exc.strerror or exc})")
                continue
            if not stat.S_ISREG(st.st_mode):
                missing(f, "not a regular file")
                continue
            seen.add(key)
            old = stored.get(key)
            if old and old.status == "ok" and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                summary.skipped += 1
                continue
            changed.append(_Pending(key, f, st.st_size, st.st_mtime_ns))
        gone = {p: row for p, row in stored.items() if p not in seen and under(p, roots)}
        gone_by_sha = {row.sha256: row for row in gone.values() if row.status == "ok" and row.sha256}
        return _Listing(stored, changed, gone, gone_by_sha)

    def _read(self, p: _Pending, keep_bytes: bool) -> bool:
        """Read p's file: one open, one read of its bytes, hashed and header-probed in memory. Returns
        False when the file is a scene (left for scene_index, which tiles it from disk). The bytes stay
        on p only when `keep_bytes` (they will be described): what was hashed is what is described."""
        from ..scene.tiling import scene_size

        # issue 13: a scene is tiled and indexed by scene_index after the plain images
        if p.size and p.size > READ_WHOLE_MAX_BYTES and self.tiling.is_scene(p.file):
            return False
        try:
            image = ImageBytes.read(p.file)
        except ImageError as exc:
            p.error = str(exc).removeprefix(f"{p.file}: ")
            return True
        size = scene_size(p.file, image.data)
        if len(image.data) <= READ_WHOLE_MAX_BYTES and self.tiling.is_scene_of_size(p.file, size, len(image.data)):
            return False
        p.sha256 = image.sha256
        p.width, p.height = size or (None, None)
        p.image = image if keep_bytes else None
        return True

    def _plan_chunk(self, store: Store, chunk: list[_Pending], listing: _Listing, by_name: dict, by_sha: dict,
                    keep_bytes: bool) -> _ChunkPlan:  # fmt: skip
        """Read and hash the files of one chunk and sort them: touched, moved, copied, or new."""
        plan = _ChunkPlan()
        stored, gone = listing.stored, listing.gone
        for p in chunk:
            if not self._read(p, keep_bytes):
                self._scene_files.append(p.file)
                continue
            if p.error:
                plan.pending.append(p)
                continue
            old = stored.get(p.path)
            if old and old.status == "ok" and old.sha256 == p.sha256:
                plan.touched.append((old.id, p))  # touched, content unchanged
            elif p.sha256 in listing.gone_by_sha:
                row = listing.gone_by_sha.pop(p.sha256)
                listing.moved_ids.add(row.id)
                plan.moves.append((row, p))
            elif (src := store.ok_image_with_sha(p.sha256, exclude_ids=[r.id for r in gone.values()])) is not None:
                plan.copies.append((src, p))
            else:
                p.record = by_name.get(p.path) or by_sha.get(p.sha256)
                plan.pending.append(p)
                if p.record is None:
                    continue  # to be described: its bytes stay until then
            p.image = None  # its descriptions exist already: the bytes are not needed
        # A moved or copied content can land on a path that held other content (e.g. two files
        # swapped): that path's old record makes way (removed after copies have read their sources).
        plan.removals = [stored[p.path].id for _, p in plan.moves + plan.copies if p.path in stored]
        return plan

    def _plan_records(self, store: Store, records: list[CaptionRecord], summary: IndexSummary) -> list[_Pending]:
        """Captions-only import: names are kept as given; re-import only when the text changed. Only
        the names in the file are looked up, so adding 200 records to a large index reads 200 rows."""
        stored = store.images_named([rec.image for rec in records])
        pending = []
        seen = set()
        for rec in records:
            if rec.image in seen:
                continue
            seen.add(rec.image)
            old = stored.get(rec.image)
            if old and old.status == "ok" and old.desc_hash == record_hash(rec):
                summary.skipped += 1
                continue
            pending.append(_Pending(rec.image, None, sha256=rec.sha256, record=rec))
        return pending

    # -- the run ------------------------------------------------------------------------------
    def run(self, paths: Iterable[str | os.PathLike] = (), captions_file: str | os.PathLike | None = None) -> IndexSummary:
        paths = [Path(p) for p in paths]
        summary = IndexSummary(index_dir=str(self.dir))
        from ..scene.scene_index import SceneCounts  # issue 13

        summary.scenes = SceneCounts()
        records: list[CaptionRecord] = []
        if captions_file is not None:
            from ..describe.captions import load_captions

            records = load_captions(captions_file)
        if not paths and captions_file is None:
            raise InputError("nothing to index: give image folders/files, or --captions FILE")
        if self.vlm_cfg is None and captions_file is None and not (self.dir / STORE_FILE).exists():
            # A new index and nothing to describe its images with: refuse now, before the index is created,
            # rather than leave an empty one behind (an index that exists may still gain moves and copies).
            # What the run reports one by one stays its own: files that are no image, scenes (index_scenes).
            from ..images import find_images
            from ..scene.tiling import scene_size

            files = find_images([p.expanduser().resolve() for p in paths], on_error=lambda path, why: None)
            sized = ((f, scene_size(f)) for f in files)
            plain = [f for f, size in sized if size is not None and not self.tiling.is_scene_of_size(f, size)]
            if plain:
                raise _no_vlm_error(len(plain), plain[0])
        with IndexDir.open_writer(self.dir, wait=self.wait) as ix:
            store = ix.store
            run_id = store.start_run({"paths": [str(p) for p in paths], "captions": str(captions_file or "")})
            status = "failed"
            try:
                self._run(ix, paths, records, summary)
                status = "ok" if not summary.failed else "partial"
            except GPUError:
                if ix.writer is not None:  # the committed batches reach the vector snapshot now
                    self.checkpoint(ix, summary, force=True)
                raise
            except KeyboardInterrupt:
                summary.interrupted = True
                status = "interrupted"
                if ix.writer is not None:
                    try:  # save what the finished batches added (else the next run does it)
                        self.checkpoint(ix, summary, force=True)
                    except KeyboardInterrupt:
                        pass
            except (OSError, sqlite3.OperationalError) as exc:
                if not _out_of_space(exc):
                    raise
                # Every batch committed before this one is intact (one transaction per batch, vector
                # files replaced atomically); the failed batch rolled back and is redone next run.
                raise StoreError(
                    f"could not write the index in {self.dir}: {exc} (disk full?). Free space and run "
                    f"the same command again; the {summary.added} images committed so far are kept"
                ) from None
            finally:
                try:
                    store.finish_run(run_id, status, summary.counts(),
                                     {k: round(v, 3) for k, v in summary.stage_seconds.items()})
                except sqlite3.OperationalError:
                    pass  # a full disk can refuse even this row; the run history is not the record
        return summary

    def _run(self, ix: IndexDir, paths: list[Path], records: list[CaptionRecord], summary: IndexSummary) -> None:
        store = ix.store
        t = time.perf_counter()
        dim, dtype, mode = self._settle_meta(store)
        summary.stage_seconds["scan"] += time.perf_counter() - t
        t = time.perf_counter()
        # Loads the saved snapshot and catches it up: O(change). Texts whose vectors are nowhere on
        # disk (the snapshot was deleted) are embedded again.
        writer = ix.open_vectors(dim, dtype, embed=lambda texts: self._embedder().embed(list(texts)))
        summary.rebuilt_vectors = ix.rebuilt and len(writer) > 0
        summary.stage_seconds["index_save"] += time.perf_counter() - t
        t = time.perf_counter()
        base = [p.expanduser().resolve() for p in paths if p.is_dir()] or [Path.cwd()]
        by_name: dict[str, CaptionRecord] = {}
        by_sha: dict[str, CaptionRecord] = {}
        for rec in records:
            for root in base:  # names in the captions file resolve under the given folders
                by_name.setdefault(str((root / rec.image).resolve()), rec)
            if rec.sha256:
                by_sha.setdefault(rec.sha256, rec)
        listing = self._list_files(store, paths, summary) if paths else _Listing({}, [], {}, {})
        summary.stage_seconds["scan"] += time.perf_counter() - t

        # Files are read, hashed and sorted one chunk at a time, and each chunk's new images are
        # described from the bytes just read, then dropped: memory holds one chunk's bytes, never the
        # archive's. Without a VLM nothing is described, so one chunk holds every file (one read each,
        # no bytes kept) and a missing VLM is reported before any batch.
        changed = listing.changed
        keep_bytes = self.vlm_cfg is not None
        chunk_size = self.batch_size if keep_bytes else max(1, len(changed))
        show = self.progress and bool(changed or (records and not paths))
        with Progress(show) as bar:
            if not paths:
                pending = self._plan_records(store, records, summary)
                bar.add("embed", len(pending))
                self._describe_embed_store(ix, pending, records, mode, summary, bar)
            else:
                if keep_bytes:
                    bar.add("caption", len(changed))
                bar.add("embed", len(changed))
                for start in range(0, len(changed), chunk_size):
                    t = time.perf_counter()
                    chunk = changed[start : start + chunk_size]
                    plan = self._plan_chunk(store, chunk, listing, by_name, by_sha, keep_bytes)
                    summary.stage_seconds["scan"] += time.perf_counter() - t
                    if start + chunk_size >= len(changed):  # every move is known now: the other gone rows go
                        plan.removals += listing.unmoved()
                    self._bookkeep(ix, plan, summary)
                    settled = len(chunk) - len(plan.pending)  # touched, moved, copied, or scenes
                    bar.shrink("embed", settled)
                    bar.shrink("caption", settled + sum(p.record is not None or bool(p.error) for p in plan.pending))
                    self._describe_embed_store(ix, plan.pending, records, mode, summary, bar)
                if not changed:  # nothing to read, but files may have been deleted
                    self._bookkeep(ix, _ChunkPlan(removals=listing.unmoved()), summary)
        if paths:  # issue 13: scenes found by the plan (and scenes gone from under `paths`)
            from ..scene.scene_index import index_scenes

            index_scenes(self, store, ix, self._scene_files, [p.expanduser().resolve() for p in paths],
                         records, summary, mode)  # fmt: skip
        self.checkpoint(ix, summary, force=True)

    def _bookkeep(self, ix: IndexDir, plan: _ChunkPlan, summary: IndexSummary) -> None:
        """Bookkeeping that needs no model: one transaction (a copy's vectors reach the snapshot at
        the next checkpoint, read back by key)."""
        if not (plan.touched or plan.moves or plan.copies or plan.removals):
            return
        store = ix.store
        t = time.perf_counter()
        with interrupt_deferred(), store.transaction():
            for image_id, p in plan.touched:
                store.update_image_file(image_id, path=p.path, size=p.size, mtime_ns=p.mtime_ns)
            copied = []
            for src, p in plan.copies:
                rows = store.read_texts(src.id)
                copied.append((src, p, rows, ix.vectors_for([r.key for r in rows]), store.description_of(src.id)))
            store.remove_images(plan.removals)
            for row, p in plan.moves:
                store.update_image_file(row.id, path=p.path, size=p.size, mtime_ns=p.mtime_ns)
            for src, p, rows, vecs, (desc_id, desc_hash) in copied:
                new_id = store.put_image(p.path, size=p.size, mtime_ns=p.mtime_ns, sha256=p.sha256, width=p.width,
                                         height=p.height, source=src.source, desc_hash=desc_hash,
                                         description_id=desc_id)  # fmt: skip
                keys = store.insert_texts(new_id, rows, vecs)
                store.note_texts_per_image(len(keys))
            summary.skipped += len(plan.touched)
            summary.moved += len(plan.moves)
            summary.reused += len(plan.copies)
            summary.removed += len(plan.removals)
        summary.stage_seconds["store"] += time.perf_counter() - t

    def _describe_embed_store(self, ix: IndexDir, pending: list[_Pending], records: list[CaptionRecord], mode: str,
                              summary: IndexSummary, bar: Progress) -> None:  # fmt: skip
        need_vlm = [p for p in pending if p.record is None and not p.error]
        if need_vlm and records and self.vlm_cfg is None:
            for p in need_vlm:
                p.error = "not described in the --captions file"
        elif need_vlm and self.vlm_cfg is None:
            raise _no_vlm_error(len(need_vlm), need_vlm[0].path)
        for start in range(0, len(pending), self.batch_size):
            self._batch(ix.store, pending[start : start + self.batch_size], mode, summary, bar)
            self.checkpoint(ix, summary, force=False)

    @staticmethod
    def checkpoint(ix: IndexDir, summary: IndexSummary, force: bool = False) -> None:
        t = time.perf_counter()
        ix.checkpoint(force=force)
        summary.stage_seconds["index_save"] += time.perf_counter() - t

    def _caption(self, batch: list[_Pending], summary: IndexSummary, bar: Progress) -> None:
        todo = [p for p in batch if p.record is None and not p.error]
        if not todo or self.vlm_cfg is None:
            return
        from ..describe import captioning

        def on_result(p: _Pending, outcome: CaptionRecord | captioning.Failure) -> None:
            if isinstance(outcome, captioning.Failure):
                p.error = outcome.reason
            else:
                p.record, p.from_vlm = outcome, True
            bar.advance("caption")

        stopped = False
        try:
            result = captioning.caption_sources([(p, p.image) for p in todo], self.vlm_cfg, self.n_variants,
                                                self.caption, on_result)  # fmt: skip
            stopped = result.interrupted
        except GPUError as exc:  # out of GPU memory and the like: every further image would fail too
            self.gpu_error, stopped = exc, True
        finally:
            for p in todo:
                p.image = None  # described (or not): the bytes are dropped with the batch
        for p in todo:
            if p.record is None and not p.error:
                if stopped:
                    p.dropped = True  # its caption run was stopped (Ctrl-C, the GPU); commit the others first
                else:
                    p.error = "the VLM returned no description"
                    bar.advance("caption")
        if stopped:
            self.stop_requested = True

    def _batch(self, store: Store, batch: list[_Pending], mode: str, summary: IndexSummary, bar) -> None:
        t = time.perf_counter()
        self._caption(batch, summary, bar)
        batch = [p for p in batch if not p.dropped]
        summary.stage_seconds["caption"] += time.perf_counter() - t

        t = time.perf_counter()
        texts: list[PlannedText] = []
        for p in batch:
            if p.record is not None and not p.error:
                items = plan_texts(p, p.record.variants, mode)
                if not items:
                    p.error = "its descriptions are empty"
                texts += items
        vecs = self.load_embedder().embed([x.text for x in texts]) if texts else None
        summary.stage_seconds["embed"] += time.perf_counter() - t

        t = time.perf_counter()
        texts_added = 0
        with interrupt_deferred(), store.transaction():
            for p in batch:
                store.remove_path(p.path)  # changed content at a known path
                w, h = p.width, p.height
                if p.error:
                    store.put_image(p.path, size=p.size, mtime_ns=p.mtime_ns, sha256=p.sha256, width=w, height=h,
                                    status="failed", error=p.error)
                    continue
                rec = p.record
                # The VLM described the very bytes we hashed (p.image), so p.sha256 is theirs. If the
                # file changed after that read, the size/mtime taken before it are stale and make the
                # next run look at the file again.
                sha = p.sha256 or rec.sha256
                image_id = store.put_image(
                    p.path, size=p.size, mtime_ns=p.mtime_ns, sha256=sha, width=w, height=h,
                    source="vlm" if p.from_vlm else "captions",
                    provenance=provenance(rec), desc_hash=record_hash(rec),
                )
                rows = [(i, x) for i, x in enumerate(texts) if x.owner is p]
                keys = store.add_texts(image_id, [NewText(x.ordinal, x.field, x.variant, x.text, vecs[i]) for i, x in rows])
                store.note_texts_per_image(len(keys))
                texts_added += len(keys)
            # Counted inside the deferral: a Ctrl-C landing right after COMMIT used to skip this
            # and report "kept 0" for a batch that was kept.
            summary.texts_added += texts_added
            for p in batch:
                if p.error:
                    summary.failed += 1
                    summary.failures.append((p.path, p.error))
                else:
                    summary.added += 1
        summary.stage_seconds["store"] += time.perf_counter() - t
        bar.advance("embed", len(batch))
        if self.stop_requested:
            raise self.gpu_error or KeyboardInterrupt
