"""Caption records on disk: the caption cache, the JSONL writer, and importers of caption files.

The cache is what makes re-running `edge-t2t caption` cheap: a caption is keyed by everything that
determines it (image bytes, model and mmproj bytes, prompt version, generation parameters), so a
hit can be served without loading the model, and any change to those inputs is a miss.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config
from ..errors import InputError, StoreError
from ..evaluation.dataset import INDEX_DEFAULT_SPLIT, caption_records, is_dataset, parse_dataset
from ..records import CaptionRecord, Variant

CACHE_FILENAME = "captions.sqlite"
_SCHEMA_VERSION = 1


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, so equal params give equal keys."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class CacheKey:
    image_sha256: str
    model_sha256: str
    mmproj_sha256: str
    prompt_version: str
    params: str  # canonical JSON of the generation parameters

    @classmethod
    def make(cls, image_sha256: str, model_sha256: str, mmproj_sha256: str, prompt_version: str,
             params: dict[str, Any]) -> CacheKey:  # fmt: skip
        return cls(image_sha256, model_sha256, mmproj_sha256, prompt_version, canonical_json(params))

    def as_tuple(self) -> tuple[str, str, str, str, str]:
        return (self.image_sha256, self.model_sha256, self.mmproj_sha256, self.prompt_version, self.params)


class CaptionCache:
    """SQLite cache of caption records. WAL mode and a busy timeout, so two `caption` runs (or an
    index reading while a caption run writes) share it; each put is its own transaction, so an
    interrupted run keeps every caption it finished."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else config.cache_dir() / CACHE_FILENAME
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; we open explicit transactions where needed.
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, never corrupt
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS captions (
                    image_sha256 TEXT NOT NULL, model_sha256 TEXT NOT NULL, mmproj_sha256 TEXT NOT NULL,
                    prompt_version TEXT NOT NULL, params TEXT NOT NULL,
                    record TEXT NOT NULL, created REAL NOT NULL,
                    PRIMARY KEY (image_sha256, model_sha256, mmproj_sha256, prompt_version, params)
                );
                CREATE TABLE IF NOT EXISTS file_hashes (
                    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL
                );
                """
            )
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),)
            )
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        except sqlite3.Error as exc:
            self._close_db()  # e.g. a file that is not a database: the connection opened, the schema failed
            raise StoreError(
                f"{self.path}: cannot open the caption cache ({exc}); delete it to start afresh, "
                "or pick another with --cache-dir / EDGE_T2T_CACHE_DIR"
            ) from None
        except BaseException:
            self._close_db()
            raise
        if found != str(_SCHEMA_VERSION):
            self._close_db()
            raise StoreError(
                f"{self.path}: caption cache schema version {found}, this edge-t2t reads {_SCHEMA_VERSION}; "
                "use the edge-t2t that wrote it, or pick another cache with --cache-dir / EDGE_T2T_CACHE_DIR"
            )

    def get(self, key: CacheKey) -> CaptionRecord | None:
        row = self._db.execute(
            "SELECT record FROM captions WHERE image_sha256=? AND model_sha256=? AND mmproj_sha256=? "
            "AND prompt_version=? AND params=?",
            key.as_tuple(),
        ).fetchone()
        if row is None:
            return None
        try:
            return CaptionRecord.from_dict(json.loads(row[0]))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged row is a miss; the next put replaces it

    def put(self, key: CacheKey, record: CaptionRecord) -> None:
        data = record.to_dict()
        data["cached"] = False
        with self._db:  # one transaction per record
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR REPLACE INTO captions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (*key.as_tuple(), canonical_json(data), time.time()),
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM captions").fetchone()[0]

    # hashing.HashMemo: the model files' hashes outlive the process, so a fully cached run
    # re-reads no GGUF (hashing.file_sha256(path, cache)).
    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self._db.execute(
            "SELECT sha256 FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?", (path, size, mtime_ns)
        ).fetchone()
        return row[0] if row else None

    def remember(self, path: str, size: int, mtime_ns: int, digest: str) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (path, size, mtime_ns, digest))

    def close(self) -> None:
        self._close_db()

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> CaptionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlWriter:
    """Writes records one JSON line each, flushed and fsynced per record.

    Lines go to `<out>.partial`; close() moves that onto `out` with os.replace. So an existing
    `out` is never half-overwritten, and an interrupted run still ends with every finished line in
    `out` (the CLI closes the writer on Ctrl-C too). After a hard kill, `<out>.partial` holds the
    finished lines.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.count = 0
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.partial, "w", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{self.out}: cannot write the output file ({exc.strerror or exc})") from None

    def write(self, record: CaptionRecord | dict[str, Any]) -> None:
        data = record.to_dict() if isinstance(record, CaptionRecord) else record
        self._fh.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.count += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.close()
        os.replace(self.partial, self.out)

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- importers

FORMATS = ("edge-t2t", "rsrt", "coco", "karpathy")


def _record_from_line(obj: Any, path: Path, where: str) -> tuple[str, CaptionRecord]:
    if not isinstance(obj, dict):
        raise InputError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
    if "image" not in obj or not isinstance(obj.get("variants"), list):
        raise InputError(f"{path}: {where}: a record needs 'image' and a 'variants' list")
    try:
        if "prompt_version" in obj and "model" in obj:  # what `edge-t2t caption` writes
            record = CaptionRecord.from_dict(obj)
            record.cached = False
            return "edge-t2t", record
        variants = []
        for v in obj["variants"]:
            if isinstance(v, str):
                variants.append(Variant(one_sentence=" ".join(v.split())))
            elif isinstance(v, dict):
                variants.append(Variant.from_dict(v))
            else:
                raise ValueError(f"a variant must be an object or a string, got {type(v).__name__}")
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{path}: {where}: {exc}") from None
    extra = {k: v for k, v in obj.items() if k not in ("image", "variants")}
    return "rsrt", CaptionRecord.imported(str(obj["image"]), variants, "rsrt", extra)


def _iter_jsonl(text: str, path: Path) -> Iterator[tuple[str, CaptionRecord]]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: line {lineno}: not valid JSON ({exc.msg}); expected one record per line") from None
        yield _record_from_line(obj, path, f"line {lineno}")


def detect_format(path: str | os.PathLike) -> str:
    return _load(Path(path), None)[0]


def load_captions(path: str | os.PathLike, split: str | None = None) -> list[CaptionRecord]:
    """Caption records from a file, format auto-detected:

    - edge-t2t JSONL (what `edge-t2t caption` writes): records kept as they are;
    - RSRT-style JSONL: `image` + `variants` of {one_sentence, feature(s), caption};
    - COCO caption JSON or Karpathy `dataset_*.json`: read by dataset.py under eval's rules, every
      split unless `split` names one; one record per captioned image, one variant per distinct caption.

    Imported records have model "imported:<format>", prompt_version "imported", test_model False.
    Raises InputError naming the file (and line) for anything malformed.
    """
    return _load(Path(path), split)[1]


def _load(path: Path, split: str | None) -> tuple[str, list[CaptionRecord]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: no such captions file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the captions file ({exc}); expected UTF-8 JSON or JSONL") from None
    if not text.strip():
        raise InputError(f"{path}: the captions file is empty")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL (or broken JSON: the line-by-line reader names the line)
    if is_dataset(whole):
        ann = parse_dataset(whole, path, split, default_split=INDEX_DEFAULT_SPLIT)
        records = caption_records(ann)
        if not records:
            raise InputError(f"{path}: no captions found; each image needs at least one non-empty caption")
        return ann.format, records
    if isinstance(whole, list):  # a JSON array of records
        pairs = [_record_from_line(obj, path, f"item {i}") for i, obj in enumerate(whole)]
    else:
        if text.lstrip().startswith("{") and "\n" not in text.strip() and whole is None:
            raise InputError(f"{path}: not valid JSON; expected COCO/Karpathy JSON or one JSON record per line")
        pairs = list(_iter_jsonl(text, path))
    if not pairs:
        raise InputError(f"{path}: no caption records found")
    fmt = pairs[0][0] if all(p[0] == pairs[0][0] for p in pairs) else "mixed"
    return fmt, [record for _, record in pairs]
