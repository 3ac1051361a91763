"""The one reader of caption datasets: which reference captions belong to which image.

`edge-t2t eval` reads it as ground truth (Annotations) and `edge-t2t index --captions` imports it
as caption records (caption_records); both go through `read_dataset`, so both accept the same
files under the same rules:

* COCO caption JSON: ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``, ``caption``).
* Karpathy-style ``dataset_*.json``: ``images[]`` with ``filename`` (or ``file_name``),
  ``sentences[]`` (``raw``, else ``tokens`` joined, or a plain string) and ``split``.
* Either may give images a ``split``. ``split=NAME`` keeps that split (an error when no image
  carries it); without it `default_split` applies: eval passes "test" (the test split when the
  file has one, else every image), index passes None (every image).
* Each image appears once (file names unique); a caption is a non-empty string. Captions are kept
  verbatim (only surrounding white space is stripped) because the evaluation treats two captions
  as duplicates only when their texts are exactly equal.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..modes import EVAL_HALVES
from ..records import CaptionRecord, Variant

# the default split of each command (docs/indexing.md "Captions made elsewhere")
EVAL_DEFAULT_SPLIT = "test"
INDEX_DEFAULT_SPLIT = None


@dataclass
class Annotations:
    """Images (by file name) and their reference captions, in file order.

    ``caption_image[c]`` is the index into ``images`` of caption ``c``. Images may have no
    captions at all (they are counted, and handled by the evaluation).
    """

    images: list[str]
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) int64
    source: str = ""
    format: str = ""  # "coco" or "karpathy"
    split: str | None = None
    notes: list[str] = field(default_factory=list)
    image_ids: list | None = None  # COCO image ids, per image (None for other formats)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def half(self, name: str) -> Annotations:
        """One of two fixed halves of the images, chosen by a hash of each file name (not its
        position or its captions), so the same image falls in the same half in any file and
        any order: "tune" (first byte of sha256(file name) even) or "report" (odd). The bench
        calibrates retrieval weights on "tune" and reports on "report"."""
        if name not in EVAL_HALVES:
            raise InputError(f"unknown half {name!r}: use one of {', '.join(EVAL_HALVES)}")
        keep = [i for i, n in enumerate(self.images) if _half_of(n) == name]
        new_index = np.full(self.n_images, -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        mask = new_index[self.caption_image] >= 0
        return Annotations(
            images=[self.images[i] for i in keep],
            captions=[c for c, k in zip(self.captions, mask, strict=True) if k],
            caption_image=new_index[self.caption_image[mask]],
            source=self.source,
            format=self.format,
            split=self.split,
            notes=[*self.notes, f"{name} half only ({len(keep)} of {self.n_images} images)"],
            image_ids=[self.image_ids[i] for i in keep] if self.image_ids is not None else None,
        )

    def captions_per_image(self) -> np.ndarray:
        return np.bincount(self.caption_image, minlength=self.n_images)

    def subset(self, n_images: int) -> Annotations:
        """The first ``n_images`` images and their captions (for quick runs and tests)."""
        keep = self.caption_image < n_images
        return Annotations(
            images=self.images[:n_images],
            captions=[c for c, k in zip(self.captions, keep, strict=True) if k],
            caption_image=self.caption_image[keep].copy(),
            source=self.source,
            format=self.format,
            split=self.split,
            notes=[*self.notes, f"first {n_images} images only"],
            image_ids=self.image_ids[:n_images] if self.image_ids is not None else None,
        )


def _half_of(file_name: str) -> str:
    """"tune" or "report" for an image, from its base name alone (see Annotations.half)."""
    return EVAL_HALVES[hashlib.sha256(Path(file_name).name.encode("utf-8")).digest()[0] % 2]


def from_lists(images: list[str], captions: list[tuple[int, str]], source: str = "<memory>") -> Annotations:
    """Build annotations from (image index, caption) pairs; used by tests and scripts."""
    return Annotations(
        images=list(images),
        captions=[c for _, c in captions],
        caption_image=np.asarray([i for i, _ in captions], dtype=np.int64),
        source=source,
        format="memory",
    )


def load_annotations(path: str | Path, split: str | None = None) -> Annotations:
    """Ground truth for `edge-t2t eval`: the test split by default (see the module docstring)."""
    ann = read_dataset(path, split, default_split=EVAL_DEFAULT_SPLIT)
    if not ann.images:
        raise InputError(f"{path}: no images to evaluate" + (f" in split {split!r}" if split else ""))
    if not ann.captions:
        raise InputError(f"{path}: no captions found; every image needs reference captions to evaluate")
    return ann


def read_dataset(path: str | Path, split: str | None = None, default_split: str | None = None) -> Annotations:
    """Read a COCO caption file or a Karpathy-style dataset file; InputError names the file on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; pass an existing COCO or Karpathy caption file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "pass a COCO caption file or a Karpathy-style dataset_*.json"
        ) from None
    return parse_dataset(data, path, split, default_split)


def is_dataset(data: object) -> bool:
    """Whether parsed JSON is a COCO or Karpathy caption dataset (not a list of caption records)."""
    return isinstance(data, dict) and isinstance(data.get("images"), list) and "variants" not in data


def parse_dataset(data: object, path: Path, split: str | None = None, default_split: str | None = None) -> Annotations:
    if not is_dataset(data):
        raise InputError(
            f"{path}: expected a JSON object with an 'images' list (COCO caption file or "
            "Karpathy-style dataset_*.json)"
        )
    if "annotations" in data:
        return _load_coco(path, data, split, default_split)
    return _load_karpathy(path, data, split, default_split)


def caption_records(ann: Annotations) -> list[CaptionRecord]:
    """The dataset as caption records to index (`index --captions`): one record per image that has
    a caption, one Variant (one_sentence) per distinct caption, first occurrence kept, white space
    collapsed. A repeated caption can never change an image's score (the max over its variants)
    and would only grow the index; RSICD repeats one caption five times for about half its images."""
    by_image: list[list[str]] = [[] for _ in ann.images]
    for text, i in zip(ann.captions, ann.caption_image.tolist(), strict=True):
        by_image[i].append(text)
    out = []
    for i, (name, caps) in enumerate(zip(ann.images, by_image, strict=True)):
        variants = list({t: Variant(one_sentence=t) for t in (" ".join(c.split()) for c in caps) if t}.values())
        if not variants:
            continue  # nothing could retrieve it
        extra: dict = {}
        if ann.image_ids is not None:
            extra["coco_id"] = ann.image_ids[i]
        if ann.split:
            extra["split"] = ann.split
        out.append(CaptionRecord.imported(name, variants, ann.format, extra))
    return out


def _caption_text(path: Path, value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{path}: {where}: caption must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InputError(f"{path}: {where}: empty caption; remove it or fill it in")
    return text


def _file_name(path: Path, value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{path}: {where}: missing or empty image file name")
    return value.strip()


def _check_unique(path: Path, names: list[str]) -> None:
    repeated = [n for n, k in Counter(names).items() if k > 1]
    if repeated:
        raise InputError(
            f"{path}: image file name {repeated[0]!r} is listed {Counter(names)[repeated[0]]} times; "
            "each image must appear once"
        )


def _load_coco(path: Path, data: dict, split: str | None, default_split: str | None) -> Annotations:
    if not isinstance(data["annotations"], list):
        raise InputError(f"{path}: 'annotations' must be a list of {{image_id, caption}} objects")
    images: list[str] = []
    index_of: dict[object, int] = {}
    splits: list[str | None] = []
    for n, img in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(f"{path}: {where}: each image needs an 'id' and a 'file_name'")
        if img["id"] in index_of:
            raise InputError(f"{path}: {where}: image id {img['id']!r} appears twice")
        index_of[img["id"]] = len(images)
        images.append(_file_name(path, img.get("file_name"), where))
        splits.append(img.get("split"))
    _check_unique(path, images)
    pairs: list[tuple[int, str]] = []
    for n, a in enumerate(data["annotations"]):
        where = f"annotations[{n}]"
        if not isinstance(a, dict) or "image_id" not in a:
            raise InputError(f"{path}: {where}: each annotation needs an 'image_id' and a 'caption'")
        if a["image_id"] not in index_of:
            raise InputError(f"{path}: {where}: image_id {a['image_id']!r} is not in 'images'")
        pairs.append((index_of[a["image_id"]], _caption_text(path, a.get("caption"), where)))
    keep, used = _choose_split(path, splits, split, default_split)
    ann = _assemble(path, "coco", images, pairs, keep, used)
    ids = list(index_of)
    ann.image_ids = [i for i, k in zip(ids, keep, strict=True) if k] if keep is not None else ids
    return ann


def _load_karpathy(path: Path, data: dict, split: str | None, default_split: str | None) -> Annotations:
    images: list[str] = []
    splits: list[str | None] = []
    pairs: list[tuple[int, str]] = []
    for n, img in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(img, dict):
            raise InputError(f"{path}: {where}: each image must be an object with 'filename' and 'sentences'")
        name = img.get("filename", img.get("file_name"))
        images.append(_file_name(path, name, where))
        splits.append(img.get("split"))
        sentences = img.get("sentences", [])
        if not isinstance(sentences, list):
            raise InputError(f"{path}: {where}: 'sentences' must be a list")
        for m, s in enumerate(sentences):
            swhere = f"{where}.sentences[{m}]"
            if isinstance(s, dict) and "raw" in s:
                raw = s["raw"]
            elif isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(str(t) for t in s["tokens"])  # some exports drop 'raw'
            elif isinstance(s, str):
                raw = s
            else:
                raise InputError(f"{path}: {swhere}: a sentence needs a 'raw' text")
            pairs.append((n, _caption_text(path, raw, swhere)))
    _check_unique(path, images)
    keep, used = _choose_split(path, splits, split, default_split)
    return _assemble(path, "karpathy", images, pairs, keep, used)


def _choose_split(
    path: Path, splits: list[str | None], wanted: str | None, default: str | None
) -> tuple[np.ndarray | None, str | None]:
    """(boolean mask of images to keep or None for all, the split kept). Without `wanted`, the
    `default` split when the file has it, else every image."""
    present = sorted({s for s in splits if isinstance(s, str)})
    if wanted is None:
        if default is not None and default in present:
            wanted = default
        else:
            return None, None
    if not present:
        raise InputError(f"{path}: --split {wanted!r} given but the images carry no 'split' field; drop --split")
    if wanted not in present:
        raise InputError(f"{path}: no images in split {wanted!r}; splits present: {', '.join(present)}")
    return np.asarray([s == wanted for s in splits], dtype=bool), wanted


def _assemble(
    path: Path,
    fmt: str,
    images: list[str],
    pairs: list[tuple[int, str]],
    keep: np.ndarray | None,
    split: str | None,
) -> Annotations:
    if keep is not None:
        new_index = np.cumsum(keep) - 1
        images = [n for n, k in zip(images, keep, strict=True) if k]
        pairs = [(int(new_index[i]), c) for i, c in pairs if keep[i]]
    return Annotations(
        images=images,
        captions=[c for _, c in pairs],
        caption_image=np.asarray([i for i, _ in pairs], dtype=np.int64).reshape(-1),
        source=str(path),
        format=fmt,
        split=split,
    )
