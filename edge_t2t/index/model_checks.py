"""`verify`'s model check: the embedder files the store recorded still have their sha256, the
current embedder was built from the recorded weights, and the VLM GGUFs (model and mmproj) that the
descriptions table records for the indexed images are unchanged (schema v2; imported captions
record none). A missing file is a warning, a changed one a problem.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import config
from ..hashing import sha256_file


def check_models(conn, meta: dict, rep) -> None:
    """Fill rep.checks["models"] (rep: a verify.VerifyReport) and add its problems and warnings."""
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
    if {"backend", "device"} <= cols:  # schema v8: where the descriptions were made (CPU or which GPU)
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
