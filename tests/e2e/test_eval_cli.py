"""`edge-t2t eval` end to end: the --json contract on a Karpathy file made here and on the RSICD
COCO file, --out files, --source index over an index built by `edge-t2t index`, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import helpers_media as hm
import pytest

from edge_t2t import config

ROOT = Path(__file__).resolve().parents[2]
RECALLS = {"R@1", "R@5", "R@10"}
TOP_KEYS = {
    "t2i", "i2t", "mR", "t2i_mean", "i2t_mean",
    "t2i_nodup", "i2t_nodup", "mR_nodup", "t2i_mean_nodup", "i2t_mean_nodup",
    "counts", "config",
}
COUNT_KEYS = {
    "images", "captions", "distinct_captions", "duplicate_captions", "images_without_captions",
    "images_with_one_caption", "queries", "t2i_queries", "t2i_queries_dup", "i2t_queries", "i2t_queries_dup",
}


@pytest.fixture(scope="module", autouse=True)
def embedder_built():
    if not (config.embedder_dir() / "manifest.json").is_file():
        pytest.fail("embedder not built: run `make models` (edge-t2t models build-embedder)")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_t2t", *args], cwd=ROOT, capture_output=True, text=True, timeout=hm.HANG_S
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-t2t {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def check_contract(out: dict) -> None:
    assert set(out) == TOP_KEYS
    for key in ("t2i", "i2t", "t2i_nodup", "i2t_nodup"):
        assert set(out[key]) == RECALLS
    assert COUNT_KEYS <= set(out["counts"])
    six = [*out["t2i"].values(), *out["i2t"].values()]
    assert None not in six, out  # every dataset here has T2I and I2T queries
    assert out["mR"] == pytest.approx(sum(six) / 6)
    assert out["t2i_mean"] == pytest.approx(sum(out["t2i"].values()) / 3)


def check_by_brute_force(out: dict, annotations: Path, split: str | None = None) -> tuple[list[int], list[int]]:
    """The CLI's six recalls equal the oracle protocol written with loops (test_evaluate's
    brute_force_oracle) over vectors this test embeds itself, with the precision the CLI used.
    Returns the loops' T2I and I2T ranks."""
    from test_evaluate import brute_force_oracle, recall_by_hand

    from edge_t2t.embed.embedder import Embedder
    from edge_t2t.evaluation.dataset import load_annotations

    ann = load_annotations(annotations, split)
    texts = sorted(set(ann.captions))
    vec_of_text = dict(zip(texts, Embedder(precision=out["config"]["precision"]).embed(texts), strict=True))
    t2i, i2t = brute_force_oracle(ann, vec_of_text)
    for d, ranks in (("t2i", t2i), ("i2t", i2t)):
        assert out[d] == {f"R@{k}": pytest.approx(recall_by_hand(ranks, k), abs=1e-9) for k in (1, 5, 10)}, d
    return t2i, i2t


def sents(*texts: str) -> list[dict]:
    return [{"raw": t, "tokens": t.split()} for t in texts]


# A marina whose captions compete with the harbour's (see test_recalls_match_the_loops_where_targets_rank_second)
MARINA = {"filename": "marina_7.jpg", "split": "test",
          "sentences": sents("boats are moored at the piers of a marina .", "a marina full of small boats .")}  # fmt: skip


def karpathy_file(tmp_path: Path, *extra_images: dict) -> Path:
    data = {
        "dataset": "toy",
        "images": [
            {"filename": "harbour_1.jpg", "split": "test",
             "sentences": sents("many boats are moored in a harbour .", "boats line the piers of a harbour .",
                                "many boats are moored in a harbour .")},
            {"filename": "forest_2.jpg", "split": "test",
             "sentences": sents("a dense green forest covers the hills .", "thick trees cover the whole area .")},
            {"filename": "airport_3.jpg", "split": "test",
             "sentences": sents("two airplanes are parked next to a terminal .",
                                "a runway runs beside the airport terminal .")},
            {"filename": "river_4.jpg", "split": "test", "sentences": sents("a river winds through farmland .")},
            {"filename": "empty_5.jpg", "split": "test", "sentences": []},
            {"filename": "desert_6.jpg", "split": "train",
             "sentences": sents("yellow sand dunes in a desert .", "a desert with dunes .")},
            *extra_images,
        ],
    }
    path = tmp_path / "dataset_toy.json"
    path.write_text(json.dumps(data))
    return path


def test_json_contract_on_karpathy_file(tmp_path):
    path = karpathy_file(tmp_path)
    out = json.loads(cli("eval", "--annotations", str(path), "--json").stdout)
    check_contract(out)
    c = out["counts"]
    # test split (the default): 5 images, 3 + 2 + 2 + 1 + 0 captions, one verbatim repeat (harbour)
    assert (c["images"], c["captions"], c["duplicate_captions"]) == (5, 8, 1)
    assert c["images_without_captions"] == 1 and c["images_with_one_caption"] == 1
    # the river's single caption cannot be asked under leave-one-out: 8 - 1 queries each way,
    # of which the two copies of the repeated harbour caption are dups
    assert c["t2i_queries"] == 7 and c["i2t_queries"] == 7 and c["queries"] == 14
    assert c["t2i_candidates"] == 4  # the caption-less image has nothing to represent it
    assert c["t2i_queries_dup"] == 2 and c["skipped_single_caption"] == 1
    assert out["config"]["split"] == "test" and out["config"]["format"] == "karpathy"
    check_by_brute_force(out, path)

    train = json.loads(cli("eval", "--annotations", str(path), "--split", "train", "--json").stdout)
    check_contract(train)
    check_by_brute_force(train, path, "train")
    assert (train["counts"]["images"], train["counts"]["captions"]) == (1, 2)


def test_recalls_match_the_loops_where_targets_rank_second(tmp_path):
    """On the toy alone every target ranks first, so R@1 = R@5 = R@10 = 100 whatever the cut-off
    rule; with the marina some targets rank exactly second (the loops say so), and an off-by-one
    in R@k would show in R@1."""
    path = karpathy_file(tmp_path, MARINA)
    out = json.loads(cli("eval", "--annotations", str(path), "--json").stdout)
    t2i, i2t = check_by_brute_force(out, path)
    assert 1 in t2i and 1 in i2t, (t2i, i2t)


def test_json_contract_on_rsicd_coco_and_out_files(shared_data, tmp_path):
    coco = shared_data / "rsicd" / "captions_val.json"
    proc = cli("eval", "--annotations", str(coco), "--max-images", "100", "--json", "--out", str(tmp_path))
    out = json.loads(proc.stdout)
    check_contract(out)
    c = out["counts"]
    assert c["images"] == 100 and c["captions"] == 500 and c["t2i_queries"] == 500
    assert c["duplicate_captions"] > 0 and c["t2i_queries_dup"] > 0  # RSICD repeats captions
    assert out["config"]["format"] == "coco" and out["config"]["dtype"] == "f32"
    written = json.loads((tmp_path / "eval-oracle-int8-f32.json").read_text())
    assert written["mR"] == out["mR"] and written["counts"] == out["counts"]
    md = (tmp_path / "eval-oracle-int8-f32.md").read_text()
    assert "| T2I |" in md and "| I2T (no dup) |" in md
    assert not list(tmp_path.glob("*.tmp"))

    table = cli("eval", "--annotations", str(coco), "--max-images", "30", "--dtype", "i8")
    assert "T2I" in table.stdout and "mR" in table.stdout


# Measured: `edge-t2t eval --annotations ../shared/data/rsicd/captions_val.json --precision fp32 --json`
# (oracle, exact numpy, all 1092 validation images; README "Retrieval evaluation"). The figures are
# arithmetic on fixed vectors, so they are deterministic; the tolerance only covers another CPU's
# float summation order (one T2I query is 0.018 points, one I2T query 0.018).
RSICD_VAL_FP32 = {"t2i": (67.91, 82.86, 86.96), "i2t": (59.85, 66.85, 75.51), "mR": 73.32, "mR_nodup": 9.75}
TOLERANCE = 0.05


def test_rsicd_validation_fp32_figures_are_the_measured_ones(shared_data):
    coco = shared_data / "rsicd" / "captions_val.json"
    out = json.loads(cli("eval", "--annotations", str(coco), "--precision", "fp32", "--json").stdout)
    check_contract(out)
    assert out["counts"]["images"] == 1092 and out["config"]["exact"] and out["config"]["dtype"] == "f32"
    for d in ("t2i", "i2t"):
        got = tuple(out[d][f"R@{k}"] for k in (1, 5, 10))
        assert got == pytest.approx(RSICD_VAL_FP32[d], abs=TOLERANCE), (d, got)
    assert out["mR"] == pytest.approx(RSICD_VAL_FP32["mR"], abs=TOLERANCE)
    assert out["mR_nodup"] == pytest.approx(RSICD_VAL_FP32["mR_nodup"], abs=TOLERANCE)


def test_index_source_over_an_index_of_the_captions(tmp_path):
    # An index whose descriptions ARE the reference captions (edge-t2t index --captions): each
    # caption's own image holds that very text (cosine 1) and the toy captions of different
    # scenes are far apart, so every T2I and I2T query must hit at rank 0.
    path = karpathy_file(tmp_path)
    index = tmp_path / "ix"
    cli("index", "--captions", str(path), "--index", str(index), "--dtype", "f32", "--no-progress")
    # exact numpy; the index's own usearch file (rescore, then hnsw mode); a fresh i8 HNSW index
    runs = (["--exact"], [], ["--vector-mode", "hnsw"], ["--dtype", "i8"], ["--mode", "lexical"], ["--mode", "hybrid"])
    for extra in runs:
        out = json.loads(cli("eval", "--annotations", str(path), "--source", "index", "--index", str(index),
                             "--json", *extra).stdout)
        check_contract(out)
        assert out["t2i"]["R@1"] == 100.0 and out["i2t"]["R@1"] == 100.0
        c = out["counts"]
        # the caption-less image is not in the index; the train image is indexed but not annotated here
        assert c["images_not_in_index"] == 1 and c["index_images_not_annotated"] == 1
        assert c["t2i_queries"] == 8 and c["i2t_queries"] == 4
        cfg = out["config"]
        assert cfg["exact"] is (extra == ["--exact"] or extra[:1] == ["--mode"])  # lexical modes score exactly
        assert cfg["dtype"] == ("i8" if "i8" in extra else "f32")
        assert cfg["mode"] == (extra[1] if extra[:1] == ["--mode"] else "dense")
        if extra in ([], ["--vector-mode", "hnsw"]):
            assert cfg["vector_mode"] == ("hnsw" if extra else "rescore") and "own search" in cfg["scoring"]


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]}')
    proc = cli("eval", "--annotations", str(bad), "--json", check=False)
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "image_id 9" in proc.stderr
    good = karpathy_file(tmp_path)
    missing = cli("eval", "--annotations", str(good), "--source", "index", "--index", str(tmp_path / "none"),
                  check=False)
    assert missing.returncode == 2 and str(tmp_path / "none") in missing.stderr
