"""Deliberate breaks: issue 23's proof that its tests fail when the feature they test breaks.

Each break below names an item of issue 23 (1-6), the tests that must go red, and one edit: an
exact `old` snippet of a file and the `new` text that breaks the feature. For each break the
repository is copied to a temporary directory (the files git tracks, plus new files it does not
ignore; models/ linked to this checkout's built ones), the edit is applied there (it must match
exactly once), and the named tests run in the copy with this Python, PYTHONPATH pointing at the copy
(the CLI subprocesses the tests start import the copy too). A break is red when every named test
fails or errors. The same tests run once on the unbroken copy first: they must all pass there.

    nice -n 10 .venv/bin/python scripts/deliberate_breaks.py            # all breaks; writes results
    .venv/bin/python scripts/deliberate_breaks.py --list                # the table, nothing run
    .venv/bin/python scripts/deliberate_breaks.py --only NAME [NAME..]  # some breaks; prints only

A full run writes bench/results/deliberate_breaks.{json,md} (machine and commit stamped). This is a
developer's tool, not part of `make test`: it runs the named tests once per break (about half an
hour on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 1800  # one pytest run per break; only a hang reaches it


@dataclass(frozen=True)
class Break:
    item: int  # issue 23's item: 1 signals, 2 one outcome, 3 checks that can fail, 4 measured bounds,
    #            5 independent rankings, 6 no skips
    name: str
    what: str  # the break, in words
    tests: tuple[str, ...]  # node ids, each of which must fail or error
    path: str
    old: str
    new: str
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the test run
    build: tuple[str, ...] = ()  # models built in the copy from its (broken) code instead of linked


E2E_INDEX = "tests/e2e/test_index_search_cli.py"
CTRL_C_INDEX = f"{E2E_INDEX}::test_ctrl_c_exits_130_and_says_what_was_kept"
SNAPSHOT = f"{E2E_INDEX}::test_search_json_matches_snapshot"
HOSTILE = "tests/test_hostile_inputs.py"
SCENES_GEO = "tests/test_scenes_geo.py"

# A batch's count in the summary, inside the block that holds a Ctrl-C until its COMMIT is over
BATCH_COUNT = (
    "            summary.texts_added += texts_added\n"
    "            for p in batch:\n"
    "                if p.error:\n"
    "                    summary.failed += 1\n"
    "                    summary.failures.append((p.path, p.error))\n"
    "                else:\n"
    "                    summary.added += 1\n"
)

# The max-over-variants rule broken: each image keeps its WORST fetched text instead of its best.
MIN_NOT_MAX = {
    "path": "edge_t2t/query/search.py",
    "old": "    order = np.lexsort((keys, -scores))\n",
    "new": "    order = np.lexsort((keys, scores))  # BROKEN: an image's worst text, not its best\n",
}

BREAKS: tuple[Break, ...] = (
    # -- 1: signals at known points, exact kept counts ---------------------------------------------
    Break(
        1, "ctrl-c-not-deferred",
        "Ctrl-C no longer held until a batch's COMMIT (interrupt_deferred does nothing)",
        (CTRL_C_INDEX,),
        "edge_t2t/index/run_parts.py",
        "    if threading.current_thread() is not threading.main_thread():\n        yield\n        return\n    caught",
        "    if True:  # BROKEN: never defer\n        yield\n        return\n    caught",
    ),
    Break(
        1, "ctrl-c-counted-after-commit",
        "a batch counted after the deferred block, so a Ctrl-C at its COMMIT keeps it uncounted",
        (CTRL_C_INDEX, "tests/test_crash_safety.py::test_sigint_from_outside[commit_after]"),
        "edge_t2t/index/indexer.py",
        BATCH_COUNT,
        "".join(line.removeprefix("    ") for line in BATCH_COUNT.splitlines(keepends=True)),  # BROKEN: one level out
    ),
    Break(
        1, "ctrl-c-no-save",
        "`index` interrupted by Ctrl-C no longer saves the vector snapshot on its way out",
        (CTRL_C_INDEX,),
        "edge_t2t/index/indexer.py",
        "                if ix.writer is not None:\n                    try:  # save what the finished batches added",
        "                if False:  # BROKEN: no save on Ctrl-C\n                    try:  # save what the finished batches added",
    ),
    Break(
        1, "caption-ctrl-c-drops-current",
        "the first Ctrl-C stops `caption` at once, dropping the image being described",
        ("tests/e2e/test_caption_cli.py::test_ctrl_c_keeps_finished_captions",),
        "edge_t2t/describe/captioning.py",
        '        if flag["stop"]:\n            raise KeyboardInterrupt\n        flag["stop"] = True',
        '        if True:  # BROKEN: stop at once\n            raise KeyboardInterrupt\n        flag["stop"] = True',
    ),
    Break(
        1, "cluster-ctrl-c-not-reported",
        "a Ctrl-C on a --workers run is not reported: exit 0, no 'kept' line",
        ("tests/test_cluster.py::test_ctrl_c_cancels_the_rest_and_keeps_finished_records",),
        "edge_t2t/describe/cluster.py",
        '    summary.interrupted = stop["stop"]\n',
        '    summary.interrupted = False  # BROKEN: the interrupt forgotten\n',
    ),
    Break(
        1, "checkpoint-every-batch",
        "the vector snapshot saved after every batch, ignoring the checkpoint interval",
        ("tests/test_indexer.py::test_a_run_saves_at_its_end_and_at_most_every_checkpoint_interval",),
        "edge_t2t/index/indexer.py",
        "            self.checkpoint(ix, summary, force=False)\n",
        "            self.checkpoint(ix, summary, force=True)  # BROKEN: every batch\n",
    ),
    # -- 2: hostile inputs, one outcome per file ----------------------------------------------------
    Break(
        2, "tif-not-scanned",
        "the folder scan silently leaves out .tif files (good ones and the truncated one)",
        (f"{HOSTILE}::test_index_survives_broken_files",),
        "edge_t2t/images.py",
        'IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"})',
        'IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tiff", ".webp"})  # BROKEN: no .tif',
    ),
    Break(
        2, "failure-lines-wrap",
        "`index` lets rich wrap each 'failed PATH: REASON' line at 80 columns (the bug issue 23 found)",
        (f"{HOSTILE}::test_failures_are_one_line_each_in_the_human_output",),
        "edge_t2t/cli/index.py",
        "markup=True, highlight=False, soft_wrap=True)",
        "markup=True, highlight=False, soft_wrap=False)  # BROKEN: wrapped",
    ),
    Break(
        2, "scene-with-failed-chip-ok",
        "a scene whose chip the VLM failed on is recorded whole ('ok'), so it is never looked at again",
        (f"{SCENES_GEO}::test_caption_and_index_describe_scene_chips_with_the_vlm",),
        "edge_t2t/scene/chipstore.py",
        '(total, skipped, "ok" if complete else "partial", scene_id)',
        '(total, skipped, "ok", scene_id)  # BROKEN: always whole',
    ),
    Break(
        2, "footprint-turned-the-wrong-way",
        "a rotated GeoTIFF's footprint turned the other way (the signs of the affine's rotation terms flipped)",
        (f"{SCENES_GEO}::test_rotated_footprint_follows_the_rotation",),
        "edge_t2t/scene/geo.py",
        "    return a * col + b * row + c, d * col + e * row + f\n",
        "    return a * col - b * row + c, -d * col + e * row + f  # BROKEN: rotated the other way\n",
    ),
    # -- 3: checks that can fail --------------------------------------------------------------------
    Break(
        3, "run-finish-stamp",
        "a run's finish time written as its start time",
        ("tests/test_store.py::test_runs_are_recorded",),
        "edge_t2t/index/store.py",
        '"UPDATE runs SET finished = ?, status = ?',
        '"UPDATE runs SET finished = started + 0 * ?, status = ?',
    ),
    Break(
        3, "gen-steps-count-tokens",
        "the parallel decoder counts tokens, not batched decode steps, as gen_steps",
        ("tests/test_parallel_variants.py::test_each_sequence_follows_its_own_grammar_and_variants_differ",),
        "edge_t2t/describe/vlm_parallel.py",
        "                    res.gen_steps += 1\n",
        "                    res.gen_steps += len(entries)  # BROKEN: tokens, not steps\n",
    ),
    Break(
        3, "destructor-does-not-close",
        "a VLM's destructor no longer closes the model it holds",
        ("tests/test_error_paths.py::test_half_built_vlm_destructor_is_quiet_and_a_built_one_closes",),
        "edge_t2t/describe/vlm.py",
        "        try:\n            self.close()\n        # A destructor must not raise",
        "        try:\n            pass  # BROKEN: nothing closed\n        # A destructor must not raise",
    ),
    Break(
        3, "deletions-never-pruned",
        "the deletion log is never pruned once a snapshot has applied it",
        ("tests/test_vindex.py::test_tail_merges_into_base_and_dead_rows_compact[True]",
         "tests/test_vindex.py::test_tail_merges_into_base_and_dead_rows_compact[False]"),
        "edge_t2t/index/indexdir.py",
        "        self.store.prune_deletions(w.deletions_seen)\n",
        "        pass  # BROKEN: deletions kept\n",
    ),
    Break(
        3, "recall-off-by-one",
        "R@k counts a target at rank k (ranks <= k instead of < k)",
        ("tests/e2e/test_eval_cli.py::test_recalls_match_the_loops_where_targets_rank_second",),
        "edge_t2t/evaluation/evaluate.py",
        "np.count_nonzero(ranks < k)",
        "np.count_nonzero(ranks <= k)",
    ),
    Break(
        3, "probe-rss-in-kib",
        "the search probe reports peak RSS in KiB under the name peak_rss_mib",
        ("tests/test_quantcost.py::test_probe_in_a_subprocess",),
        "edge_t2t/evaluation/quantcost.py",
        '        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n',
        '        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # BROKEN: KiB\n',
    ),
    # -- 4: bounds from measured figures -------------------------------------------------------------
    Break(
        4, "embedder-attends-to-a-pad",
        "the embedder's attention mask covers one padding token past each text (an off-by-one)",
        ("tests/e2e/test_eval_cli.py::test_rsicd_validation_fp32_figures_are_the_measured_ones",),
        "edge_t2t/embed/embedder.py",
        "            mask[row, : len(ids)] = 1\n",
        "            mask[row, : len(ids) + 1] = 1  # BROKEN: one pad attended\n",
    ),
    Break(
        4, "int8-activations-coarser",
        "the int8 embedder quantises activations to +-100 levels instead of +-127 (rebuilt in the copy)",
        ("tests/test_embedder.py::test_int8_close_to_sentence_transformers",),
        "edge_t2t/embed/onnx_build.py",
        '        c_127 = g.const("q_127", np.array(127.0, dtype=f32))\n',
        '        c_127 = g.const("q_127", np.array(100.0, dtype=f32))  # BROKEN: coarser activations\n',
        build=("embedder",),
    ),
    Break(
        4, "i8-codes-scaled-1pct-over",
        "int8 graph codes scaled 1% past +-127 (the peak component overflows its int8)",
        ("tests/test_quantcost.py::test_every_row_meets_its_measured_figures",),
        "edge_t2t/index/quantise.py",
        "    return np.round(vectors / np.maximum(peak, 1e-12) * 127).astype(np.int8)\n",
        "    return np.round(vectors / np.maximum(peak, 1e-12) * 127 * 1.01).astype(np.int8)  # BROKEN\n",
    ),
    # -- 5: rankings derived independently ----------------------------------------------------------
    Break(
        5, "min-over-variants",
        "an image scored by its worst variant text instead of its best (the paper's max rule)",
        (SNAPSHOT,),
        **MIN_NOT_MAX,
    ),
    Break(
        5, "min-over-variants-update-mode",
        "the same, with EDGE_T2T_UPDATE_SNAPSHOTS=1: update mode cannot write the broken ranking",
        (SNAPSHOT,),
        env={"EDGE_T2T_UPDATE_SNAPSHOTS": "1"},
        **MIN_NOT_MAX,
    ),
    Break(
        5, "min-over-variants-serve",
        "the same break, seen through the web API",
        ("tests/test_serve.py::test_api_ranks_as_the_max_cosine_worked_out_here",),
        **MIN_NOT_MAX,
    ),
    # -- 6: a skip is a failure ---------------------------------------------------------------------
    Break(
        6, "skip-passes-as-skip",
        "conftest's hook lets every skip through",
        ("tests/test_no_skips.py::test_a_skip_fails_unless_it_is_a_platform_limit",),
        "tests/conftest.py",
        '    if report.skipped and not hasattr(report, "wasxfail"):\n',
        '    if False:  # BROKEN: skips stay skips\n',
    ),
    Break(
        6, "missing-component-skips",
        "helpers_media.require skips when a component is missing",
        ("tests/test_no_skips.py::test_a_missing_component_fails_naming_the_fix",),
        "tests/helpers_media.py",
        '        pytest.fail(f"{module} cannot be imported ({exc}): {fix}")\n',
        '        pytest.skip(f"{module} cannot be imported ({exc}): {fix}")  # BROKEN\n',
    ),
)


# -- the copy ------------------------------------------------------------------------------------
def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    return sorted(set(filter(None, out.split("\0"))))


def make_copy(dest: Path, build: tuple[str, ...] = ()) -> None:
    """The repository's files (what git tracks, and new files it does not ignore) under `dest`, with
    models/<name> linked to this checkout's built models, except those in `build`, which are left to
    be built in the copy."""
    for rel in repo_files():
        src = ROOT / rel
        if src.is_dir() or not os.path.lexists(src):  # a linked folder (.venv, models/*) or a file deleted
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)
    for name in ("embedder", "test-vlm"):
        built = (ROOT / "models" / name).resolve()
        if not (built / "manifest.json").is_file():
            raise SystemExit(f"{built} is not built: run `make models` first")
        if name not in build:
            (dest / "models").mkdir(exist_ok=True)
            os.symlink(built, dest / "models" / name)


def apply_break(copy: Path, b: Break) -> None:
    path = copy / b.path
    text = path.read_text(encoding="utf-8")
    found = text.count(b.old)
    if found != 1:
        raise SystemExit(f"break {b.name}: its `old` snippet is found {found} times in {b.path} (must be once)")
    path.write_text(text.replace(b.old, b.new), encoding="utf-8")


def child_env(copy: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_T2T_") and k not in ("CI", "COLUMNS")}
    env["PYTHONPATH"] = str(copy)
    env["EDGE_T2T_SHARED"] = str((ROOT.parent / "shared" / "data").resolve())  # the copy has no ../shared
    env.update(extra or {})
    return env


def check_copy_is_imported(copy: Path) -> None:
    """The copy's package is the one a test and a CLI subprocess import (not this checkout's, nor an
    editable install's)."""
    code = "import edge_t2t, sys; print(edge_t2t.__file__)"
    got = subprocess.run([sys.executable, "-c", code], cwd=copy, env=child_env(copy), capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    if not Path(got).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy in {copy} is not what Python imports: edge_t2t comes from {got}")


# -- running tests -------------------------------------------------------------------------------
def _message(element: ET.Element, scratch: Path) -> str:
    """What a failure says: pytest's `E` lines from the comparison that failed (`assert ...` and the
    values it saw), then the start of the assertion's own message; else the first line of the
    message. The run's temp directory is shortened to <tmp>."""
    e_lines = [ln[1:].strip() for ln in (element.text or "").splitlines() if ln.startswith("E ")]
    at = next((i for i, ln in enumerate(e_lines) if ln.startswith("assert ")), None)
    text = " ".join(e_lines[:3])
    if at is not None and at > 0:
        text = " ".join(e_lines[at : at + 3]) + " <- " + e_lines[0][:100]
    text = text or (element.get("message") or "").strip().split("\n")[0]
    return " ".join(text.replace(str(scratch / "tmp"), "<tmp>").split())[:300]


def _outcomes(report: Path, tests: tuple[str, ...], scratch: Path) -> dict[str, dict]:
    """Per node id: passed / failed / error / skipped / not run, and what a failure said."""
    cases = {}
    collect_errors = {}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
            outcome = {"failure": "failed"}.get(bad[0].tag, bad[0].tag) if bad else "passed"
            message = _message(bad[0], scratch) if bad else ""
            if case.get("classname"):
                cases[(case.get("classname"), case.get("name"))] = {"outcome": outcome, "message": message}
            else:  # a module that could not be collected: JUnit names it by its dotted path
                collect_errors[case.get("name")] = {"outcome": "error", "message": message}
    out = {}
    for node in tests:
        module, name = node.split("::", 1)
        dotted = module.removesuffix(".py").replace("/", ".")
        out[node] = cases.get((dotted, name)) or collect_errors.get(dotted) or {"outcome": "not run", "message": ""}
    return out


def run_tests(copy: Path, tests: tuple[str, ...], env: dict[str, str] | None = None) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="pytest-", dir=copy.parent))
    report = scratch / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
            f"--basetemp={scratch / 'tmp'}", f"--junitxml={report}", *tests]  # fmt: skip
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=copy, env=child_env(copy, env), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)  # fmt: skip
        rc, tail = proc.returncode, proc.stdout[-4000:] + proc.stderr[-2000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = None, f"timed out after {RUN_TIMEOUT_S} s\n{(exc.stdout or b'')[-4000:]!r}"
    seconds = time.monotonic() - t0
    outcomes = _outcomes(report, tests, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"rc": rc, "seconds": round(seconds, 1), "load_at_start": round(load, 2), "tests": outcomes, "tail": tail}


def build_models(copy: Path, names: tuple[str, ...]) -> None:
    for name in names:
        sub = {"embedder": "build-embedder", "test-vlm": "build-test-vlm"}[name]
        subprocess.run([sys.executable, "-m", "edge_t2t", "models", sub], cwd=copy, env=child_env(copy),
                       check=True, capture_output=True)  # fmt: skip


def run_break(base: Path, work: Path, b: Break) -> dict:
    copy = work / b.name / "repo"
    if b.build:
        make_copy(copy, b.build)
    else:
        shutil.copytree(base, copy, symlinks=True)
    apply_break(copy, b)
    t0 = time.monotonic()
    build_models(copy, b.build)
    built_s = time.monotonic() - t0
    res = run_tests(copy, b.tests, b.env)
    res["build_seconds"] = round(built_s, 1)
    red = all(t["outcome"] in ("failed", "error") for t in res["tests"].values())
    res["verdict"] = "red" if red else "STAYED GREEN" if res["rc"] == 0 else "not red"
    shutil.rmtree(work / b.name, ignore_errors=True)
    return res


# -- report --------------------------------------------------------------------------------------
def markdown(baseline: dict, rows: list[tuple[Break, dict]]) -> str:
    lines = [
        "Issue 23's deliberate breaks (`scripts/deliberate_breaks.py`): each break is one edit in a throwaway "
        "copy of the repository; the named tests run there and must go red. The same tests pass on the "
        f"unbroken copy: **{baseline['verdict']}** ({len(baseline['tests'])} tests, {baseline['seconds']:.0f} s, "
        f"load {baseline['load_at_start']} at start).",
        "",
        "| item | break | what it breaks | test | result | seconds | message |",
        "|---:|---|---|---|---|---:|---|",
    ]
    for b, r in rows:
        for node, t in r["tests"].items():
            msg = t["message"].replace("|", "\\|")[:200]
            lines.append(f"| {b.item} | `{b.name}` | {b.what} | `{node.split('::', 1)[1]}` "
                         f"({node.split('::')[0]}) | {r['verdict']} ({t['outcome']}) | {r['seconds']:.0f} | {msg} |")  # fmt: skip
    lines += ["", "Seconds: the break's whole pytest run (fixtures included) on a machine shared with other work; "
              "the load average at its start is in the JSON."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these breaks only (results are printed, not written)")
    ap.add_argument("--list", action="store_true", help="print the breaks and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run on the unbroken copy (with --only)")
    args = ap.parse_args(argv)

    chosen = [b for b in BREAKS if not args.only or b.name in args.only]
    unknown = set(args.only or ()) - {b.name for b in BREAKS}
    if unknown:
        raise SystemExit(f"unknown break(s): {', '.join(sorted(unknown))}; --list shows them")
    if args.list:
        for b in chosen:
            print(f"{b.item}  {b.name:34} {b.path}\n   {b.what}\n   -> {', '.join(b.tests)}")
        return 0
    if args.no_baseline and not args.only:
        raise SystemExit("--no-baseline goes with --only: a full run always shows the tests green first")

    work = Path(tempfile.mkdtemp(prefix="edge-t2t-breaks-"))
    try:
        base = work / "unbroken" / "repo"
        make_copy(base)
        for b in chosen:  # every snippet is checked before anything runs
            apply_break(Path(shutil.copytree(base, work / "check" / b.name, symlinks=True)), b)
        shutil.rmtree(work / "check")
        check_copy_is_imported(base)
        all_tests = tuple(dict.fromkeys(t for b in chosen for t in b.tests))
        baseline = {"verdict": "skipped", "tests": {}, "seconds": 0.0, "load_at_start": 0.0}
        if not args.no_baseline:
            print(f"unbroken copy: {len(all_tests)} tests ...", flush=True)
            baseline = run_tests(base, all_tests)
            green = all(t["outcome"] == "passed" for t in baseline["tests"].values())
            baseline["verdict"] = "green" if green else "NOT GREEN"
            print(f"  {baseline['verdict']} in {baseline['seconds']:.0f} s", flush=True)
            if not green:
                print(baseline["tail"], file=sys.stderr)
        rows = []
        for b in chosen:
            print(f"{b.item} {b.name} ...", flush=True)
            r = run_break(base, work, b)
            rows.append((b, r))
            print(f"  {r['verdict']} in {r['seconds']:.0f} s: "
                  + "; ".join(f"{n.split('::')[1]} {t['outcome']}: {t['message'][:100]}" for n, t in r["tests"].items()),
                  flush=True)  # fmt: skip
            if r["verdict"] != "red":
                print(r["tail"], file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = markdown(baseline, rows)
    print("\n" + table)
    ok = baseline["verdict"] in ("green", "skipped") and all(r["verdict"] == "red" for _, r in rows)
    if not args.only:
        data = {
            "baseline": {k: v for k, v in baseline.items() if k != "tail"},
            "breaks": [{"item": b.item, "name": b.name, "what": b.what, "path": b.path, "old": b.old, "new": b.new,
                        "env": b.env, "build": list(b.build), **{k: v for k, v in r.items() if k != "tail"}}
                       for b, r in rows],  # fmt: skip
            "all_red": ok,
        }
        print(f"wrote {_bench_common().write_results('deliberate_breaks', data, table)}")
    return 0 if ok else 1


def _bench_common():
    """bench/_common.py (machine and commit stamp, result files), loaded by path: it is no package."""
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    sys.exit(main())
