"""`edge-t2t demo` as a user runs it: the step summary says what ran, what was skipped and why."""

from __future__ import annotations

import json

from edge_t2t import config
from edge_t2t.cli import main


def test_no_vlm_images_skips_the_vlm_step(tmp_path, capsys):
    """Issue 27: --vlm-images 0 asks for no VLM work, so step 4 is skipped, not failed with
    "nothing to index", and the demo exits 0."""
    assert (config.embedder_dir() / "manifest.json").is_file(), "run 'make models' first"
    code = main(["demo", "--out", str(tmp_path / "out"), "--scenes", "4", "--vlm-images", "0", "--no-rsicd", "--json"])
    steps = {s["name"].split(".")[0]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    assert code == 0
    assert steps["4"]["status"] == "skipped" and "--vlm-images 0" in steps["4"]["note"]
    assert [steps[k]["status"] for k in ("1-2", "3", "5", "6")] == ["ok", "ok", "skipped", "skipped"]
