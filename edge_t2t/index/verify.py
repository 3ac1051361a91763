"""`edge-t2t verify`: is an index directory sound, and if its vector files are not, rebuild them.

What is checked, in order (each check fills one entry of `VerifyReport.checks`):

- sqlite: `PRAGMA integrity_check` and `PRAGMA foreign_key_check` of store.sqlite.
- schema: the schema version (PRAGMA user_version) equals store.SCHEMA_VERSION, and the tables exist.
- variants: every embedded text has exactly one vector of the stored dimension, finite and
  L2-normalised (a torn or foreign blob fails that); every 'ok' image has texts, every 'failed'
  image has none.
- vectors: the vector snapshot (manifest.json and the files it names) against SQLite: dimension,
  dtype and store, file lengths, every key the snapshot should hold and no key it should not, the
  image of each key, the exact vectors and the graphs' vectors themselves.
- models: the embedder files recorded in the store's manifest still have their sha256, and so do
  the VLM GGUFs (model and mmproj) that the descriptions table records for the indexed images
  (schema v2; imported captions record none).
- lock and runs: a leftover index.lock, a run that never finished (a kill).

Problems vs warnings. The vector snapshot is a cache derived from SQLite, saved as numbered
generations whose manifest is replaced last (vindex.py). An index run saves it at most every 60 s
and a kill skips the save, so a snapshot that lags SQLite (newer texts past its last key, texts
deleted since, as the deletion log says) is expected: searches read the newer rows by key, the next
`index` run catches up, so it is a *warning* ("stale", fix: --repair). What no crash can produce
is a problem: a corrupt SQLite file, a wrong schema, a bad vector blob, a snapshot file that is
missing, short or unreadable (each is fsync'd before the manifest names it), a snapshot of another
dimension, dtype or index, a key at or below the snapshot's last key that it lacks, a key SQLite
neither holds nor logged as deleted, a key whose vector or image differs from SQLite's (keys are
never reused), or a model file whose sha256 changed. A missing model file is a warning: the index
stays searchable as long as the embedder is present somewhere.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import config
from ..errors import StoreError
from ..hashing import sha256_file
from .quantise import exact_dtype

_TABLES = ("meta", "descriptions", "images", "variants", "runs")
_MAX_LISTED = 10  # keys/rows named per problem line; the count is always given
_NORM_TOLERANCE = 1e-3
# exact.npy holds float16 for f16/i8 indexes: its round-off stays well under this per component.
_EXACT_TOLERANCE = 2e-3
# An i8 graph keeps about 2 decimal digits; its stored vector must still point the same way.
_GRAPH_MIN_COSINE = 0.98


@dataclass
class VerifyReport:
    index_dir: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "index": self.index_dir,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "checks": self.checks,
            "repaired": self.repaired,
        }


def _listed(items) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


# -- SQLite ---------------------------------------------------------------------------------------
def _connect(path: Path) -> sqlite3.Connection:
    # A plain read-write connection, never migrated: verify must report an old schema, not fix it.
    # (A read-only URI connection cannot open a WAL database whose -shm file is missing.)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def _check_sqlite(conn: sqlite3.Connection, rep: VerifyReport, where: Path) -> bool:
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except sqlite3.DatabaseError as exc:
        rep.problems.append(f"{where}: not a readable SQLite database ({exc}); delete the index directory and re-index")
        rep.checks["sqlite"] = {"ok": False, "error": str(exc)}
        return False
    ok = rows == ["ok"]
    if not ok:
        for line in rows[:_MAX_LISTED]:
            rep.problems.append(f"{where}: integrity_check: {line}")
        if len(rows) > _MAX_LISTED:
            rep.problems.append(f"{where}: integrity_check: +{len(rows) - _MAX_LISTED} more lines")
    rep.checks["sqlite"] = {"ok": ok, "integrity_check": rows[:_MAX_LISTED]}
    return ok


def _check_schema(conn: sqlite3.Connection, rep: VerifyReport, where: Path) -> bool:
    from .store import SCHEMA_VERSION

    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t for t in _TABLES if t not in tables]
    rep.checks["schema"] = {"version": version, "expected": SCHEMA_VERSION, "missing_tables": missing}
    ok = True
    if version != SCHEMA_VERSION:
        how = "run `edge-t2t index` with this edge-t2t to migrate it" if version < SCHEMA_VERSION else "upgrade edge-t2t"
        rep.problems.append(f"{where}: schema version {version}, this edge-t2t expects {SCHEMA_VERSION}; {how}")
        ok = False
    if missing:
        rep.problems.append(f"{where}: missing tables {', '.join(missing)}; delete the index directory and re-index")
        ok = False
    return ok


def _check_foreign_keys(conn: sqlite3.Connection, rep: VerifyReport, where: Path) -> None:
    rows = conn.execute("PRAGMA foreign_key_check").fetchall()
    rep.checks["sqlite"]["foreign_key_violations"] = len(rows)
    if rows:
        by_table: dict[str, list[int]] = {}
        for table, rowid, _parent, _fk in rows:
            by_table.setdefault(table, []).append(rowid)
        for table, rowids in by_table.items():
            rep.problems.append(
                f"{where}: {len(rowids)} row(s) of {table} point at missing parents (rowids {_listed(rowids)}); "
                "re-index the affected images"
            )


def _meta(conn: sqlite3.Connection) -> dict:
    out = {}
    for key, value in conn.execute("SELECT key, value FROM meta"):
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _check_variants(conn, meta: dict, rep: VerifyReport, where: Path):
    """Check each text's vector blob; return (keys, image_ids, vectors) of the SQLite side."""
    dim = int(meta.get("dim") or 0)
    rows = conn.execute("SELECT id, image_id, vector FROM variants ORDER BY id").fetchall()
    info: dict = {"texts": len(rows), "dim": dim}
    rep.checks["variants"] = info
    if rows and not dim:
        rep.problems.append(f"{where}: {len(rows)} texts are stored but meta has no 'dim'; re-index into a new directory")
        return None
    bad_size = [r[0] for r in rows if r[2] is None or len(r[2]) != dim * 4]
    if bad_size:
        rep.problems.append(
            f"{where}: {len(bad_size)} text(s) lack a {dim}-dim float32 vector (variant keys {_listed(bad_size)}); "
            "re-index the affected images"
        )
    good = [r for r in rows if r[2] is not None and len(r[2]) == dim * 4]
    keys = np.fromiter((r[0] for r in good), dtype=np.int64, count=len(good))
    image_ids = np.fromiter((r[1] for r in good), dtype=np.int64, count=len(good))
    vecs = (
        np.frombuffer(b"".join(r[2] for r in good), dtype=np.float32).reshape(len(good), dim)
        if good
        else np.zeros((0, dim), np.float32)
    )
    finite = np.isfinite(vecs).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vecs, 0), axis=1)
    bad_norm = keys[~finite | (np.abs(norms - 1.0) > _NORM_TOLERANCE)]
    if len(bad_norm):
        rep.problems.append(
            f"{where}: {len(bad_norm)} vector(s) are not finite unit vectors (variant keys {_listed(bad_norm.tolist())}); "
            "re-index the affected images"
        )
    info.update(bad_size=len(bad_size), bad_norm=int(len(bad_norm)))

    q = conn.execute
    ok_without = [r[0] for r in q(
        "SELECT path FROM images i WHERE status = 'ok' AND NOT EXISTS (SELECT 1 FROM variants v WHERE v.image_id = i.id)"
    )]
    failed_with = [r[0] for r in q(
        "SELECT DISTINCT i.path FROM images i JOIN variants v ON v.image_id = i.id WHERE i.status = 'failed'"
    )]
    info.update(ok_images_without_texts=len(ok_without), failed_images_with_texts=len(failed_with))
    if ok_without:
        rep.problems.append(
            f"{where}: {len(ok_without)} image(s) marked ok have no texts, so they can never be found: {_listed(ok_without)}; "
            "touch them and run `edge-t2t index` again"
        )
    if failed_with:
        rep.problems.append(f"{where}: {len(failed_with)} failed image(s) still have texts: {_listed(failed_with)}")
    return keys, image_ids, vecs


def _check_fts(conn: sqlite3.Connection, rep: VerifyReport, where: Path) -> None:
    """Whether the full-text index (variants_fts, schema v4) matches the variant texts. FTS5's
    integrity-check is an INSERT, so it needs the write lock: with an `index` run writing, the
    check is skipped (a short wait) rather than blocking."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'variants_fts'").fetchone():
        rep.checks["fts"] = {"ok": False, "error": "missing"}
        rep.problems.append(f"{where}: the full-text index is missing; run `edge-t2t verify --repair`")
        return
    conn.execute("PRAGMA busy_timeout=2000")
    try:
        conn.execute("INSERT INTO variants_fts(variants_fts, rank) VALUES ('integrity-check', 1)")
        rep.checks["fts"] = {"ok": True}
    except sqlite3.OperationalError as exc:  # locked by a writer: not a fault of the index
        rep.checks["fts"] = {"ok": None, "skipped": str(exc)}
    except sqlite3.DatabaseError as exc:
        rep.checks["fts"] = {"ok": False, "error": str(exc)}
        rep.problems.append(
            f"{where}: the full-text index (lexical search) does not match the stored texts ({exc}); "
            "run `edge-t2t verify --repair` to rebuild it"
        )
    finally:
        conn.execute("PRAGMA busy_timeout=30000")


def _repair_fts(index_dir: Path) -> None:
    """Rebuild the full-text index from the variant texts, under the index lock."""
    from .store import IndexLock, Store

    with IndexLock(index_dir), Store(index_dir) as store, store.transaction() as conn:
        conn.execute("INSERT INTO variants_fts(variants_fts) VALUES ('rebuild')")


# -- vector files ---------------------------------------------------------------------------------
def _snapshot_files_problems(index_dir: Path, m: dict, dim: int, dtype: str, store_id: str) -> list[str]:
    """What makes a snapshot unusable: every file it names is fsync'd before the manifest is
    written, so a missing or short file is damage, not a crash."""
    from . import vindex

    out = []
    if int(m.get("dim", 0)) != dim:
        out.append(f"{index_dir / vindex.MANIFEST_FILE}: {m.get('dim')}-dim vectors, the store says {dim}")
    if dtype and m.get("dtype") != dtype:
        out.append(f"{index_dir / vindex.MANIFEST_FILE}: dtype {m.get('dtype')}, the store says {dtype}")
    if store_id and m.get("store_id") != store_id:
        out.append(f"{index_dir / vindex.MANIFEST_FILE}: the vector snapshot belongs to another index (copied in?)")
    if out:
        return out
    n = int(m["n_rows"])
    widths = {m["rows"]: 16, m["exact"]: dim * np.dtype(exact_dtype(dtype or m["dtype"])).itemsize}
    for name in vindex.manifest_files(m):
        path = index_dir / name
        if not path.is_file():
            out.append(f"{path}: named by {vindex.MANIFEST_FILE} but missing")
        elif name in widths and path.stat().st_size < n * widths[name]:
            out.append(f"{path}: {path.stat().st_size} bytes, shorter than the {n} rows {vindex.MANIFEST_FILE} names")
    return out


def _check_vectors(index_dir: Path, meta: dict, sql, m: dict | None, deletions: np.ndarray, rep: VerifyReport) -> str:
    """Compare the vector snapshot with SQLite; return 'match', 'stale', 'missing', 'empty' or 'corrupt'.

    `deletions`: keys deleted from SQLite after the snapshot was saved (the deletion log past the
    manifest's deletions_seen); the snapshot may still hold those."""
    from . import vindex

    keys, image_ids, vecs = sql
    dim = int(meta.get("dim") or 0)
    dtype = str(meta.get("dtype") or "")
    info: dict = {"sqlite_count": int(len(keys)), "dim": dim, "dtype": dtype}
    rep.checks["vectors"] = info
    manifest_path = index_dir / vindex.MANIFEST_FILE
    if m is None:
        if manifest_path.exists():
            info["state"] = "corrupt"
            rep.problems.append(f"{manifest_path}: unreadable; rebuild the vector snapshot with `edge-t2t verify --repair`")
            return "corrupt"
        if len(keys) == 0:
            info["state"] = "empty"
            return "empty"
        info["state"] = "missing"
        rep.warnings.append(
            f"{index_dir}: no vector snapshot ({len(keys)} texts in SQLite); searches score SQLite exactly until "
            "the next `edge-t2t index` run or `edge-t2t verify --repair` builds it"
        )
        return "missing"
    info.update(generation=int(m["generation"]), recorded_generation=meta.get("vector_generation"))
    corrupt = _snapshot_files_problems(index_dir, m, dim, dtype, str(meta.get("store_id") or ""))
    if int(meta.get("vector_generation") or 0) > int(m["generation"]):
        corrupt.append(f"{manifest_path}: generation {m['generation']} is older than the {meta['vector_generation']} "
                       "that store.sqlite recorded (files restored from a backup?)")
    snap = None
    if not corrupt:
        try:
            snap = vindex.Snapshot(index_dir, m)
        except vindex.SNAPSHOT_READ_ERRORS as exc:
            corrupt.append(f"{index_dir}: a snapshot file is unreadable ({exc})")
    if corrupt:
        info["state"] = "corrupt"
        for line in corrupt:
            rep.problems.append(f"{line}; rebuild it from SQLite with `edge-t2t verify --repair`")
        return "corrupt"

    file_keys = np.asarray(snap.rows[:, 0])
    live = snap.live_mask()
    problems = []
    if len(file_keys) > 1 and not (np.diff(file_keys) > 0).all():
        problems.append(f"{index_dir / m['rows']}: keys are not in increasing order")
    graph_counts = [len(g) for g in snap.graphs]
    info.update(snapshot_rows=int(len(file_keys)), snapshot_live=int(live.sum()), dead=int(len(snap.dead)),
                graph_counts=graph_counts, max_key=snap.max_key)
    live_keys = file_keys[live]
    covered = keys[keys <= snap.max_key]  # SQLite texts the snapshot must hold
    missing = np.setdiff1d(covered, live_keys)
    extra = np.setdiff1d(np.setdiff1d(live_keys, keys), deletions)
    if len(missing):
        problems.append(f"{index_dir / m['rows']}: {len(missing)} SQLite key(s) at or below the snapshot's last key "
                        f"{snap.max_key} are not in it (keys {_listed(missing.tolist())})")
    if len(extra):
        problems.append(f"{index_dir / m['rows']}: {len(extra)} key(s) that SQLite neither holds nor logged as deleted "
                        f"(keys {_listed(extra.tolist())})")
    # Same key, different content: impossible after a crash, because keys are never reused.
    both = np.flatnonzero(live & np.isin(file_keys, keys))
    sql_row = np.searchsorted(keys, file_keys[both])
    wrong_image = file_keys[both][np.asarray(snap.rows[both, 1]) != image_ids[sql_row]]
    wrong_vec = np.zeros(0, np.int64)
    if len(both):
        diff = np.abs(np.asarray(snap.exact[both], dtype=np.float32) - vecs[sql_row]).max(axis=1)
        wrong_vec = file_keys[both][diff > _EXACT_TOLERANCE]
    wrong_graph = []
    for g in snap.graphs:
        if not len(g):
            continue
        gkeys = np.sort(np.asarray(g.keys, dtype=np.int64))
        common = np.intersect1d(gkeys, file_keys[both])
        if len(common):
            got = np.asarray(g.get(common.astype(np.uint64), dtype=np.float32), dtype=np.float32).reshape(len(common), -1)
            want = vecs[np.searchsorted(keys, common)]
            cos = (got * want).sum(axis=1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
            wrong_graph += common[cos < _GRAPH_MIN_COSINE].tolist()
    in_graphs = np.concatenate([np.asarray(g.keys, dtype=np.int64) for g in snap.graphs if len(g)] or [np.zeros(0, np.int64)])
    unreachable = np.setdiff1d(live_keys, in_graphs)
    if len(unreachable):
        problems.append(f"{index_dir}: {len(unreachable)} snapshot key(s) are in no graph (keys {_listed(unreachable.tolist())})")
    for name, bad, what in ((m["rows"], wrong_image, "image"), (m["exact"], wrong_vec, "vector"),
                            ("graph", np.asarray(wrong_graph, np.int64), "vector")):
        if len(bad):
            problems.append(f"{index_dir / name}: {len(bad)} key(s) have another {what} than SQLite "
                            f"(keys {_listed(bad.tolist())})")
    if problems:
        info["state"] = "corrupt"
        for line in problems:
            rep.problems.append(f"{line}; rebuild with `edge-t2t verify --repair`")
        return "corrupt"
    newer = int((keys > snap.max_key).sum())
    pending = int(np.isin(live_keys, deletions).sum())
    info.update(newer_than_snapshot=newer, deleted_since_snapshot=pending)
    if newer or pending:
        info["state"] = "stale"
        rep.warnings.append(
            f"{index_dir}: the vector snapshot (generation {snap.generation}) lags SQLite by {newer} new and {pending} "
            "deleted text(s), as an index run leaves it between saves or after a kill; searches already see them, "
            "and the next `edge-t2t index` (or `edge-t2t verify --repair`) saves them"
        )
        return "stale"
    info["state"] = "match"
    return "match"


# -- models ---------------------------------------------------------------------------------------
def _check_models(conn, meta: dict, rep: VerifyReport) -> None:
    models: dict = {}
    rep.checks["models"] = models
    manifest = meta.get("embedder_manifest") or {}
    files = manifest.get("files") or {}
    # The store records the embedder's manifest (file names + sha256), not where it lived; the
    # directory a search would use now is the one that matters.
    emb_dir = Path(meta["embedder_dir"]) if meta.get("embedder_dir") else config.embedder_dir()
    emb: dict = {"dir": str(emb_dir), "dir_recorded": "embedder_dir" in meta, "files": {}}
    models["embedder"] = emb
    if not files:
        emb["status"] = "not_recorded"
        if meta.get("embedder_identity"):
            rep.warnings.append("the store records no embedder file hashes (meta 'embedder_manifest'); model files not checked")
    for name, want in files.items():
        path = emb_dir / name
        if not path.is_file():
            emb["files"][name] = "missing"
            rep.warnings.append(f"{path}: embedder file recorded in the store is missing; run `edge-t2t models build-embedder`")
            continue
        got = sha256_file(path)
        emb["files"][name] = "ok" if got == want else "changed"
        if got != want:
            rep.problems.append(
                f"{path}: sha256 {got[:12]} differs from the {want[:12]} recorded in the store; "
                "rebuild it with `edge-t2t models build-embedder --force`, or re-index with the new embedder"
            )
    identity = meta.get("embedder_identity") or {}
    current = config.embedder_dir() / "manifest.json"
    if identity and current.is_file():
        try:
            src_sha = json.loads(current.read_text(encoding="utf-8")).get("source_weights_sha256")
        except (OSError, ValueError):
            src_sha = None
        emb["current_weights_match"] = src_sha == identity.get("weights_sha256")
        if src_sha and src_sha != identity.get("weights_sha256"):
            rep.problems.append(
                f"{current}: built from weights {src_sha[:12]}, the index from {str(identity.get('weights_sha256'))[:12]}; "
                "searches will be refused: rebuild the embedder from the original weights or re-index"
            )

    cols = {r[1] for r in conn.execute("PRAGMA table_info(descriptions)")}
    vlm: dict = {"columns": sorted(cols)}
    models["vlm"] = vlm
    if {"backend", "device"} <= cols:  # schema v7: where the descriptions were made (CPU or which GPU)
        vlm["made_on"] = [
            {"backend": b, "device": d, "images": n} for b, d, n in conn.execute(
                "SELECT d.backend, d.device, COUNT(i.id) FROM descriptions d JOIN images i ON i.description_id = d.id "
                "GROUP BY d.backend, d.device ORDER BY d.backend IS NULL, d.backend, d.device")
        ]  # fmt: skip
    pairs = [("model", "model_sha256", "model_path"), ("mmproj", "mmproj_sha256", "mmproj_path")]
    recorded = [(n, s, p) for n, s, p in pairs if s in cols and p in cols]
    if not recorded:  # a store older than schema v2 (the schema check reports that too)
        vlm["status"] = "not_recorded"
        vlm["missing"] = [c for _, s, p in pairs for c in (s, p) if c not in cols]
        n_rows = conn.execute("SELECT COUNT(*) FROM descriptions WHERE test_model = 0 OR test_model = 1").fetchone()[0]
        vlm["descriptions"] = n_rows
        return
    # Only description sets some image still uses: a set whose images were all removed says
    # nothing about the index.
    used = "EXISTS (SELECT 1 FROM images i WHERE i.description_id = d.id)"
    vlm["descriptions"] = conn.execute(f"SELECT COUNT(*) FROM descriptions d WHERE {used}").fetchone()[0]
    vlm["files"] = {}
    hashes: dict[str, str] = {}  # each file read once, even when several sets name it
    for name, sha_col, path_col in recorded:
        rows = conn.execute(
            f"SELECT DISTINCT {path_col}, {sha_col} FROM descriptions d WHERE {used} "
            f"AND {path_col} IS NOT NULL AND {path_col} != '' AND {sha_col} IS NOT NULL AND {sha_col} != '' "
            f"ORDER BY {path_col}"
        ).fetchall()
        for path_s, want in rows:
            path = Path(path_s)
            if not path.is_file():
                if vlm["files"].get(path_s) != "missing":
                    rep.warnings.append(
                        f"{path}: VLM {name} file recorded in the store is missing; the index stays searchable, "
                        "but describing new images needs it (restore it, or pass --vlm/--mmproj to `edge-t2t index`)"
                    )
                vlm["files"][path_s] = "missing"
                continue
            if path_s not in hashes:
                hashes[path_s] = sha256_file(path)
            got = hashes[path_s]
            if got != want:
                rep.problems.append(
                    f"{path}: VLM {name} file's sha256 {got[:12]} differs from the {want[:12]} recorded for the "
                    "indexed descriptions, so new images would be described by another model than the indexed "
                    "ones: restore the original file, or re-index into a new --index directory with this one"
                )
            if vlm["files"].get(path_s) != "changed":
                vlm["files"][path_s] = "ok" if got == want else "changed"
    vlm["status"] = "checked" if vlm["files"] else "not_recorded"
    vlm["without_files"] = conn.execute(
        f"SELECT COUNT(*) FROM descriptions d WHERE {used} AND (model_path IS NULL OR model_sha256 IS NULL)"
    ).fetchone()[0]


# -- lock and runs --------------------------------------------------------------------------------
def _check_lock_and_runs(index_dir: Path, conn, rep: VerifyReport) -> None:
    from .store import IndexLock

    # A kill between a temp write and its os.replace leaves `<file>.tmp`: harmless, never read.
    leftovers = sorted(p.name for p in index_dir.glob("*.tmp"))
    rep.checks["temp_files"] = leftovers
    if leftovers:
        rep.warnings.append(f"{index_dir}: leftover temp file(s) of a killed save: {_listed(leftovers)} (harmless; --repair removes them)")
    lock = IndexLock(index_dir)
    info: dict = {"present": lock.path.exists()}
    rep.checks["lock"] = info
    if info["present"]:
        pid = lock.holder()
        info.update(pid=pid, alive=lock.is_locked())
        if info["alive"]:
            rep.warnings.append(f"{lock.path}: an index run (pid {pid}) is writing; this report is of its last commit")
        else:
            rep.warnings.append(f"{lock.path}: left by process {pid or '?'}, which is gone (it holds no lock; harmless)")
    row = conn.execute("SELECT id, status FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    rep.checks["last_run"] = {"id": row[0], "status": row[1]} if row else None
    if row and row[1] == "running" and not info.get("alive"):
        rep.warnings.append(
            f"run {row[0]} never finished (killed?); its committed batches are kept and the next index run resumes"
        )


# -- entry point ----------------------------------------------------------------------------------
def verify_index(index_dir: str | os.PathLike, *, repair: bool = False, check_models: bool = True) -> VerifyReport:
    """Check an index directory; with repair=True rebuild its vector files from SQLite (atomically)
    when they are stale or corrupt and SQLite itself is sound. Raises StoreError if there is no index."""
    from .store import STORE_FILE

    index_dir = Path(index_dir)
    store_path = index_dir / STORE_FILE
    if not store_path.is_file():
        raise StoreError(
            f"no index at {index_dir} ({STORE_FILE} missing): pass --index PATH (or EDGE_T2T_INDEX) "
            f"of a directory made by `edge-t2t index`"
        )
    rep = VerifyReport(index_dir=str(index_dir))
    state = _verify_once(index_dir, rep, check_models)
    if repair and rep.checks.get("fts", {}).get("ok") is False and rep.checks.get("sqlite", {}).get("ok"):
        _repair_fts(index_dir)
        rep.repaired = True
        after = VerifyReport(index_dir=str(index_dir), repaired=True)
        state = _verify_once(index_dir, after, check_models)
        rep = after
    if repair and (state in ("stale", "missing", "corrupt") or rep.checks.get("temp_files")):
        if not _sqlite_is_sound(rep):
            rep.problems.append(f"{store_path}: not repairing the vector files while SQLite itself has problems")
            return rep
        _repair(index_dir)
        rep.repaired = True
        after = VerifyReport(index_dir=str(index_dir), repaired=True)
        _verify_once(index_dir, after, check_models)
        return after
    return rep


def _sqlite_is_sound(rep: VerifyReport) -> bool:
    c = rep.checks
    return bool(c.get("sqlite", {}).get("ok")) and not c.get("schema", {}).get("missing_tables") and \
        c.get("schema", {}).get("version") == c.get("schema", {}).get("expected") and "variants" in c and \
        not c["variants"].get("bad_size") and not c["variants"].get("bad_norm")


def _verify_once(index_dir: Path, rep: VerifyReport, check_models: bool) -> str | None:
    from . import vindex
    from .store import STORE_FILE

    store_path = index_dir / STORE_FILE
    conn = _connect(store_path)
    try:
        if not _check_sqlite(conn, rep, store_path):
            return None
        if not _check_schema(conn, rep, store_path):
            return None
        # One read transaction: every query below sees the same commit, even while `index` writes.
        # The manifest is read before it starts and again once it has, so SQLite is at least as new
        # as the snapshot and no deletion the snapshot lacks has been pruned from the log yet.
        for _ in range(20):
            manifest = vindex.read_manifest(index_dir)
            conn.execute("BEGIN")
            try:
                _check_foreign_keys(conn, rep, store_path)
                if vindex.read_manifest(index_dir) == manifest:
                    break
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("ROLLBACK")
            rep.checks["sqlite"].pop("foreign_key_violations", None)
            rep.problems.clear()  # only the foreign key lines can be there: checked again
        try:
            meta = _meta(conn)
            rep.checks["counts"] = {
                "images_ok": conn.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0],
                "images_failed": conn.execute("SELECT COUNT(*) FROM images WHERE status = 'failed'").fetchone()[0],
            }
            sql = _check_variants(conn, meta, rep, store_path)
            seen = int((manifest or {}).get("deletions_seen", 0))
            deletions = np.fromiter((r[0] for r in conn.execute(
                "SELECT key FROM variant_deletions WHERE seq > ?", (seen,))), dtype=np.int64)
            if check_models:
                _check_models(conn, meta, rep)
            _check_lock_and_runs(index_dir, conn, rep)
        finally:
            conn.execute("COMMIT")
        _check_fts(conn, rep, store_path)
        if sql is None:
            return None
        return _check_vectors(index_dir, meta, sql, manifest, np.sort(deletions), rep)
    except sqlite3.DatabaseError as exc:
        rep.problems.append(f"{store_path}: {exc}; delete the index directory and re-index")
        return None
    finally:
        conn.close()


def _repair(index_dir: Path) -> int:
    """Rebuild the vector snapshot from SQLite under the index lock (refused while `index` runs)."""
    from .indexdir import IndexDir

    with IndexDir.open_writer(index_dir, create=False) as ix:
        n = ix.rebuild()
        for tmp in index_dir.glob("*.tmp"):  # safe under the lock: no save is in flight
            tmp.unlink(missing_ok=True)
        return n
