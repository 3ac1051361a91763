"""Installed model files and their checksums: named VLMs in models/vlm/NAME/, and verification of
every manifest (embedder, test VLM, named VLMs).

A named VLM is a folder models/vlm/NAME/ holding the text-model GGUF and its mmproj (copies, or
symlinks with --link) and a manifest.json: the sha256, size and GGUF facts of both files and the
chat family. `edge-t2t models add` writes it; `index`/`caption` find it (vlm.resolve_vlm_paths);
`models verify` and `doctor` re-check the checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import config
from ..errors import InputError, ModelError
from ..fileio import atomic_write_text
from ..hashing import sha256_file

MANIFEST = "manifest.json"
FORMAT = "edge-t2t-vlm/1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def slug(text: str) -> str:
    """A folder name from a model name: letters, digits, '.', '_', '-'; at most 64 characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return s or "vlm"


def _copy_hashing(src: Path, dst: Path) -> str:
    """Copy src to dst (through a temp name) and return the sha256 of the bytes written: one read."""
    h = hashlib.sha256()
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def _file_entry(info, stored: Path, digest: str, source: Path) -> dict:
    return {
        "file": stored.name,
        "sha256": digest,
        "size": info.size,
        "kind": info.kind,
        "architecture": info.architecture,
        "general_name": info.name,
        "source": str(source),
    }


def add_vlm(model: Path, mmproj: Path, name: str | None = None, *, family: str | None = None,
            link: bool = False, force: bool = False) -> dict:  # fmt: skip
    """Check a GGUF pair, then copy (or link) it into models/vlm/NAME/ with a manifest."""
    from .families import FAMILIES, infer_family
    from .gguf_check import PairFixes, check_pair

    usage = "edge-t2t models add MODEL.gguf MMPROJ.gguf"  # the pair is positional here, not --vlm/--mmproj
    fixes = PairFixes(swapped=f"give the model file first, then the projector: {usage}",
                      model_is_mmproj=f"give the text model .gguf first and its projector second: {usage}",
                      mmproj_is_model=f"give the matching mmproj-*.gguf second: {usage}")  # fmt: skip
    model, mmproj = Path(model).expanduser().resolve(), Path(mmproj).expanduser().resolve()
    m, p = check_pair(model, mmproj, fixes)
    if family is not None and family not in FAMILIES:
        raise InputError(f"unknown --family {family!r} for {model}; choose one of: {', '.join(FAMILIES)}")
    name = name or slug(m.name or model.stem)
    if not _NAME_RE.match(name):
        raise InputError(f"--name {name!r} is not a usable folder name; use letters, digits, '.', '_' or '-' (max 64)")
    if model.name == mmproj.name:
        raise InputError(f"{model} and {mmproj} have the same file name; rename one before adding the pair")
    root = config.user_vlm_dir()
    dest = root / name
    if dest.exists() and not force:
        raise InputError(f"{dest} already exists; choose another --name or pass --force to replace it")
    tmp = root / f".{name}.{os.getpid()}.adding"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        entries = {}
        for role, info, src in (("model", m, model), ("mmproj", p, mmproj)):
            stored = tmp / src.name
            if link:
                stored.symlink_to(src)
                digest = sha256_file(src)
            else:
                digest = _copy_hashing(src, stored)
            entries[role] = _file_entry(info, stored, digest, src)
        manifest = {
            "format": FORMAT,
            "name": name,
            "family": family or infer_family(m, p),
            "family_inferred": family is None,
            "test_model": m.is_test_model or p.is_test_model,
            "linked": link,
            "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **entries,
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "dir": str(dest)}


def named_vlms() -> list[dict]:
    """Every models/vlm/NAME/manifest.json that parses, with its folder under "dir"."""
    root = config.user_vlm_dir()
    found = []
    if root.is_dir():
        for manifest in sorted(root.glob(f"*/{MANIFEST}")):
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if data.get("format") == FORMAT:
                found.append({**data, "dir": str(manifest.parent)})
    return found


def named_vlm(name: str) -> dict | None:
    return next((v for v in named_vlms() if v["name"] == name or Path(v["dir"]).name == name), None)


def named_pair(entry: dict) -> tuple[Path, Path]:
    d = Path(entry["dir"])
    return d / entry["model"]["file"], d / entry["mmproj"]["file"]


@dataclass
class FileCheck:
    group: str  # "embedder", "test-vlm", "vlm:NAME"
    path: str
    status: str  # "ok" | "missing" | "mismatch"
    expected: str | None = None
    actual: str | None = None


@dataclass
class ModelCheck:
    files: list[FileCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "files": [vars(f) for f in self.files]}


def _check(rep: ModelCheck, group: str, path: Path, expected: str, fix: str) -> None:
    if not path.is_file():
        rep.files.append(FileCheck(group, str(path), "missing", expected))
        rep.problems.append(f"{path} is missing ({group}); {fix}")
        return
    actual = sha256_file(path)
    status = "ok" if actual == expected else "mismatch"
    rep.files.append(FileCheck(group, str(path), status, expected, actual))
    if status != "ok":
        rep.problems.append(f"{path} does not match its manifest's sha256 ({group}): damaged or replaced; {fix}")


def _manifest(path: Path, rep: ModelCheck, fix: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        rep.problems.append(f"{path} is unreadable ({exc}); {fix}")
        return None


def verify_models() -> ModelCheck:
    """Re-hash every file a manifest lists: the embedder, the test VLM and each named VLM."""
    rep = ModelCheck()
    emb_dir = config.embedder_dir()
    emb_fix = "rebuild it with `edge-t2t models build-embedder --force` (or reinstall from the bundle)"
    emb = _manifest(emb_dir / MANIFEST, rep, emb_fix)
    for name, digest in ((emb or {}).get("files") or {}).items():
        _check(rep, "embedder", emb_dir / name, digest, emb_fix)
    # A bundle installed without its optional archive has no fp32 model: checked only when present.
    for name, digest in ((emb or {}).get("optional_files") or {}).items():
        if (emb_dir / name).exists():
            _check(rep, "embedder", emb_dir / name, digest, emb_fix)
    test_dir = config.test_vlm_dir()
    test_fix = "rebuild it with `edge-t2t models build-test-vlm --force`"
    test = _manifest(test_dir / MANIFEST, rep, test_fix)
    for name, info in ((test or {}).get("files") or {}).items():
        if isinstance(info, dict) and info.get("sha256"):
            _check(rep, "test-vlm", test_dir / name, info["sha256"], test_fix)
    for entry in named_vlms():
        group = f"vlm:{entry['name']}"
        for role in ("model", "mmproj"):
            item = entry[role]
            fix = (f"copy the original again with `edge-t2t models add {item.get('source') or '...'} ... "
                   f"--name {entry['name']} --force`")  # fmt: skip
            _check(rep, group, Path(entry["dir"]) / item["file"], item["sha256"], fix)
    return rep


def require_named(name: str) -> tuple[Path, Path]:
    """The (model, mmproj) of the named VLM, or a ModelError listing the names there are."""
    entry = named_vlm(name)
    if entry is None:
        names = ", ".join(v["name"] for v in named_vlms()) or "none"
        raise ModelError(f"no VLM named {name!r} in {config.user_vlm_dir()} (added: {names}); "
                         "add one with `edge-t2t models add MODEL.gguf MMPROJ.gguf --name NAME`")
    return named_pair(entry)
