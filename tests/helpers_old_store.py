"""Stores as older edge-t2t versions left them, for the migration tests.

`make_old_store(index_dir, version)` runs the first `version` schema steps (schema.MIGRATIONS[:v],
the very SQL those versions ran) and inserts rows the way that version's code wrote them: each
embedded text a `variants` row carrying its variant's three fields and a float32 vector blob.
What went in is returned (OldStore), so a test derives what the migrated store must hold from it,
not from the code under test.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_t2t.index import schema
from edge_t2t.index.store import STORE_FILE

DIM = 8
# The schema step that brought the lean layout (v7): the stores made here are the ones before it.
LEAN_VERSION = schema.MIGRATIONS.index(schema.lean_layout) + 1
IDENTITY = {"name": "fake-embedder", "dim": DIM, "weights_sha256": "ab" * 32, "pooling": "mean"}


@dataclass
class OldRow:
    key: int
    image_id: int
    path: str
    ordinal: int
    field: str
    one_sentence: str
    features: str
    caption: str
    text: str
    vector: np.ndarray


@dataclass
class OldStore:
    version: int
    rows: list[OldRow] = field(default_factory=list)  # the texts left after the deletion below
    deleted_keys: list[int] = field(default_factory=list)
    max_key_used: int = 0
    chip_image_id: int | None = None  # v5+: one image is a chip of a scene, with an R*Tree box

    def live(self) -> list[OldRow]:
        return [r for r in self.rows if r.key not in self.deleted_keys]


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def make_old_store(index_dir: Path, version: int, n_images: int = 4, seed: int = 0) -> OldStore:
    """A store at schema `version` (1..6) with `n_images` images of 2 variants x 3 texts each; the
    last text written is deleted again (its key stays used, so the new sequence must go past it)."""
    assert 1 <= version < LEAN_VERSION
    index_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    conn = sqlite3.connect(index_dir / STORE_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=ON")
    assert schema.migrate(conn, schema.MIGRATIONS[:version]) == version
    old = OldStore(version)
    conn.execute("BEGIN")
    for key, value in (("dim", DIM), ("dtype", "i8"), ("text_mode", "sentences"), ("embedder_identity", IDENTITY),
                       ("created_at", 1.0)):
        conn.execute("INSERT INTO meta VALUES (?, ?)", (key, json.dumps(value)))
    conn.execute("INSERT INTO descriptions(id, model, mmproj, family, prompt_version, test_model, constrained) "
                 "VALUES (1, 'imported:captions', '', '', '', 0, 0)")
    for i in range(n_images):
        path = f"/data/img{i}.png"
        image_id = conn.execute(
            "INSERT INTO images(path, size, mtime_ns, sha256, status, source, desc_hash, description_id, indexed_at) "
            "VALUES (?, 10, 1, ?, 'ok', 'captions', 'h', 1, 1.0)", (path, f"sha{i}")).lastrowid
        for ordinal in range(2):
            one = f"image {i} variant {ordinal} harbour {'north' if i % 2 else 'south'}"
            feats = json.dumps([{"name": f"tank{i}", "position": "west", "size": "large"}])
            cap = f"Caption {i}.{ordinal} with boats. Second sentence {i}."
            for field_name, text in (("one_sentence", one), ("feature", f"large tank{i} in the west"),
                                     ("sentence", f"Caption {i}.{ordinal} with boats.")):
                vec = _unit(rng)
                key = conn.execute(
                    "INSERT INTO variants(image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, ordinal, field_name, one, feats, cap, text, vec.tobytes())).lastrowid
                old.rows.append(OldRow(key, image_id, path, ordinal, field_name, one, feats, cap, text, vec))
    if version >= 5:
        chip = old.rows[0].image_id
        scene = conn.execute(
            "INSERT INTO scenes(path, width, height, chip, overlap, status, indexed_at) "
            "VALUES ('/data/scene.tif', 1000, 1000, 512, 0.1, 'ok', 1.0)").lastrowid
        conn.execute("INSERT INTO chips(image_id, scene_id, x, y, w, h) VALUES (?, ?, 0, 0, 512, 512)", (chip, scene))
        conn.execute("INSERT INTO chips_rtree VALUES (?, 10.0, 10.1, 50.0, 50.1)", (chip,))
        old.chip_image_id = chip
    last = old.rows[-1].key
    conn.execute("DELETE FROM variants WHERE id = ?", (last,))
    old.deleted_keys.append(last)
    old.max_key_used = last
    conn.execute("COMMIT")
    conn.close()
    return old


# Meta keys the lean layout (v7) added; a v6 store never had them.
_V7_META = ("exact_copy", "embedder_precision", "upgrade", schema.VACUUM_PENDING)


def make_v6_copy(index: Path, dest: Path) -> None:
    """The index at `index` (the current schema, an i8 index with its float16 copy, snapshot saved) as
    edge-t2t before the lean layout would have left it: the same images, ids, descriptions and
    snapshot files, and each text a v6 `variants` row with its variant's fields and its vector
    (the float16 copy's values as float32: what that snapshot holds) as a blob."""
    import shutil

    from edge_t2t.index import vindex

    dest.mkdir(parents=True)
    snap = vindex.Snapshot.open(index)
    assert snap is not None and snap.exact is not None and len(snap.dead) == 0
    src = sqlite3.connect(index / STORE_FILE)
    conn = sqlite3.connect(dest / STORE_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    assert schema.migrate(conn, schema.MIGRATIONS[:6]) == 6
    conn.execute("BEGIN")
    for key, value in src.execute("SELECT key, value FROM meta"):
        if key not in _V7_META:
            conn.execute("INSERT INTO meta VALUES (?, ?)", (key, value))
    for table in ("descriptions", "images", "runs", "scenes", "chips"):
        # the columns a v6 table had (later steps added some, e.g. v8's backend and device)
        old_cols = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})") if r[1] in old_cols]
        rows = src.execute(f"SELECT {', '.join(cols)} FROM {table}").fetchall()
        conn.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)
    conn.executemany("INSERT INTO chips_rtree SELECT ?, ?, ?, ?, ?", src.execute("SELECT * FROM chips_rtree").fetchall())
    rows = src.execute("SELECT t.id, v.image_id, v.ordinal, t.field, v.one_sentence, v.features, v.caption, t.text "
                       "FROM texts t JOIN variants v ON v.id = t.variant_id ORDER BY t.id").fetchall()
    at, live = snap.find(np.array([r[0] for r in rows], np.int64))
    assert live.all()
    vecs = snap.vectors_at(at)
    conn.executemany("INSERT INTO variants(id, image_id, ordinal, field, one_sentence, features, caption, text, vector) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(*r, v.tobytes()) for r, v in zip(rows, vecs, strict=True)])
    seq = src.execute("SELECT seq FROM sqlite_sequence WHERE name = 'texts'").fetchone()[0]
    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'variants'", (seq,))
    conn.execute("COMMIT")
    conn.close()
    src.close()
    for name in [vindex.MANIFEST_FILE, *vindex.manifest_files(snap.manifest)]:
        shutil.copy(index / name, dest / name)
