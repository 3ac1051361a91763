"""Mutation testing of the core ranking and text modules (issue 23) with mutmut, and its report.

    pip install mutmut          # 3.8.1 was used; not a dependency of edge-t2t
    .venv/bin/python bench/mutation.py run [--minutes 60] [MUTANT ...]
    .venv/bin/python bench/mutation.py report --meta DIR [--meta DIR ...] [--then DIR ...] \
        [--verdict NAME=STATUS ...]

`run` is `mutmut run` (its configuration: pyproject.toml [tool.mutmut]: the modules, the in-process
test files, forkserver isolation) under `nice`, with the built models and the shared data named by
environment variables (mutmut runs the tests from its copy in mutants/, where the clone's paths do
not resolve), stopped by SIGINT after --minutes; the verdicts reached by then stay in mutants/.

`report` merges the verdicts in mutmut's mutants/**/*.py.meta files: the --meta directories in
order (a later verdict replaces an earlier one; a mutant never checked keeps the one it had), as
"before the new tests", then the --then directories and --verdict overrides (a single mutant run by
hand: `cd mutants && MUTANT_UNDER_TEST=NAME PYTHONPATH=. python -m pytest ...`) as "after". Every
survivor left is listed with its disposition from DISPOSITIONS below (a mutant without one is
marked "unclassified"), and the whole goes to bench/results/mutation.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

from _common import ROOT, write_results

MODULES = ("embed.texts", "query.lexical", "query.query_parse", "query.search", "query.retrieval")
# mutmut's own reading of a worker's exit code (mutmut/stats.py status_by_exit_code)
STATUS = {1: "killed", 3: "killed", 0: "survived", None: "not checked", 5: "no tests", 33: "no tests",
          34: "skipped", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout"}

EQUIVALENT = "equivalent"  # no input tells it from the original
IN_USE = "equivalent in use"  # differs only on a path or argument no caller reaches
WORK = "more or less work, same result"
SCALE = "not observable at test scale"
LEFT = "real, left"

# (function, mutant numbers, disposition, why): the survivors of the last run, read one by one.
DISPOSITIONS = [
    ("search.x_rank_images", {1}, SCALE, "HNSW oversampling 5 instead of 4: the test indexes are small enough "
     "that every vector mode finds the exact top k"),
    ("search.x_rank_images", {2}, EQUIVALENT, "default pool 1 instead of 0: n_out = max(k, pool) and k >= 1"),
    ("search.x_rank_images", {5}, LEFT, "the message of the k < 1 error (StoreError is raised either way)"),
    ("search.x_rank_images", {8, 10, 47, 64, 68}, EQUIVALENT, "dtype or count hint of an array whose values "
     "are the same"),
    ("search.x_rank_images", {19, 25, 28, 91, 114}, WORK, "first fetch size, rows read for every candidate, "
     "one more doubling round: the result is cut to the same k"),
    ("search.x_rank_images", {41}, EQUIVALENT, "oversample left out: vectors.search's default is the same 4"),
    ("search.x_rank_images", {79, 81, 84}, EQUIVALENT, "sort kind: the hits are sorted again by (score, path)"),
    ("search.x_rank_images", {92}, IN_USE, "differs only with no candidate at all; an empty index is refused first"),
    ("search.x_rank_images", set(range(117, 124)), SCALE, "the doubling branch runs only when the first fetch "
     "(k x texts per image x 2) holds fewer than k images and fewer than all texts: impossible for exact "
     "search, possible only when HNSW returns too few"),
    ("lexical.x_query_terms", {7}, EQUIVALENT, "a dict used as an ordered set: its values are never read"),
    ("lexical.x__quote", {11, 12}, EQUIVALENT, "words come from [^\\W_]+ and never hold a double quote"),
    ("lexical.x_stems", {1, 2, 7, 8}, WORK, "a new private in-memory connection per call instead of the "
     "thread's cached one"),
    ("lexical.x_stems", {13}, EQUIVALENT, "transaction mode of a private connection nobody else reads"),
    ("lexical.x_stems", {14, 15}, LEFT, "an SQLite file named ':MEMORY:' / 'XX:memory:XX' in the working "
     "directory instead of memory: the same stems, plus a stray file no test looks for"),
    ("lexical.x_stems", {19, 20, 26, 27, 34, 35, 40, 41}, EQUIVALENT, "SQL keywords and names in another "
     "case (SQLite ignores case)"),
    ("lexical.x_doc_count", {1, 16}, WORK, "the varint is not decoded and COUNT(*) gives the same number"),
    ("lexical.x_doc_count", {3}, EQUIVALENT, "FTS5 always has the averages row, so `row` is never None"),
    ("lexical.x_doc_count", {8}, EQUIVALENT, "a 64-bit count takes at most 9 varint bytes"),
    ("lexical.x_doc_count", {18, 19, 20}, LEFT, "the COUNT(*) fallback runs only while FTS5's averages record "
     "is empty (rows not yet flushed); select_terms reads the vocabulary first, which flushes them, so no "
     "test reaches it"),
    ("lexical.x_select_terms", {20, 22, 23}, EQUIVALENT, "doc_frequencies returns every term, so the "
     ".get default is never used"),
    ("lexical.x_search_texts", {17, 19, 22, 24, 34, 38, 42, 46}, EQUIVALENT, "dtype or count hint: the same "
     "values (float keys compare and hash as the ints)"),
    ("lexical.x_bm25_matrix", {12, 13, 34, 42, 43}, EQUIVALENT, "SQL keywords and names in another case"),
    ("lexical.x_bm25_matrix", {17, 19}, EQUIVALENT, "dtype float64 is numpy's default"),
    ("lexical.x_normalise_rows", {3, 5}, EQUIVALENT, "dtype: the scores are float64 already"),
    ("lexical.x_normalise_rows", {7}, EQUIVALENT, "np.where(None, -inf, s) is s"),
    ("query_parse.x__singular", {7, 14, 15}, EQUIVALENT, "applied alike to the query's and the feature's words "
     "and to no synonym it could split (three-letter plurals, words ending in ss)"),
    ("query_parse.x__near", {12, 15, 16}, EQUIVALENT, "zip of two cells, always two items each"),
    ("query_parse.x__region_score", {10, 11, 13, 14}, EQUIVALENT, "the centre shares no compass part with "
     "any other cell, so its explicit exclusion never decides"),
    ("retrieval.x__dense_candidates", {13}, IN_USE, "retrieval.rank's exclude_image_ids: no caller passes it "
     "(search by image calls rank_images itself)"),
    ("retrieval.x__image_ids", {6}, SCALE, "chunks of 500 paths: wrong only past 1,000 images found by the "
     "lexical side alone (pool x at most 8 texts; the pool is 50)"),
    ("retrieval.x__image_ids", {7, 9, 12}, WORK, "chunk size (1 path, or 501 paths: under SQLite's "
     "variable limit)"),
    ("retrieval.x_best_variant_structure", {2, 4}, EQUIVALENT, "the first variant is always taken "
     "(best_ord < 0), whatever the initial best"),
    ("retrieval.x_score_structure", {12, 14}, IN_USE, "every candidate image has variants: candidates come "
     "from its texts"),
    ("retrieval.x_gather", {1, 2}, IN_USE, "default vector mode: every caller passes one"),
    ("retrieval.x_gather", {5}, EQUIVALENT, "the text of an empty parse is never read"),
    ("retrieval.x_gather", {37, 41, 42}, EQUIVALENT, "a dense candidate's key is not used: its text comes "
     "from its dense hit"),
    ("retrieval.x_gather", {40, 158, 159, 165, 166, 167, 168}, EQUIVALENT, "image ids are >= 1; any "
     "placeholder below that is resolved the same"),
    ("retrieval.x_gather", {27}, WORK, "the dense fetch sized for the pool instead of k: rank_images returns "
     "max(k, pool) images either way"),
    ("retrieval.x_gather", {53, 68, 176}, WORK, "a larger lexical fetch (cut to the same pool), or structure "
     "scored for a query without constraints (all 0)"),
    ("retrieval.x_gather", {79, 114, 116, 118}, EQUIVALENT, "BM25 of a match is > 0 (FTS5 floors idf above "
     "0), and with no match the loop is empty"),
    ("retrieval.x_gather", {83, 86, 87, 145, 148, 149}, EQUIVALENT, "zip strictness of equal-length lists"),
    ("retrieval.x_gather", {90, 93}, IN_USE, "a matched text always has its row (triggers keep FTS in step) "
     "and no caller passes exclusions here"),
    ("retrieval.x_gather", {119}, IN_USE, "lexical mode passes no query vector"),
    ("retrieval.x_gather", {128, 130, 136, 138, 140}, EQUIVALENT, "dtype of the same values; reshape(-2) "
     "is numpy's reshape(-1)"),
    ("retrieval.x_gather", {153}, IN_USE, "max() without default: fails only for a lexical find none of "
     "whose matched texts has a vector (texts added after the last save); not reached"),
    ("retrieval.x_gather", {171, 173, 174, 175}, IN_USE, "the default of an image path missing from "
     "images: every candidate's path is there"),
    ("retrieval.x_combine", {1, 2, 3, 4, 5}, IN_USE, "defaults: rank passes every argument"),
    ("retrieval.x_combine", {7, 8, 12, 13}, EQUIVALENT, "membership by mode: the sides gathered already "
     "decide it (a dense pool has no lexical order and the reverse)"),
    ("retrieval.x_combine", {23}, EQUIVALENT, "ranks are computed but only rrf reads them"),
    ("retrieval.x_combine", {47, 49, 56, 58, 65, 67, 72, 74}, EQUIVALENT, "dtype float64 of float values"),
    ("retrieval.x_combine", {51, 53}, LEFT, "rrf only: an image one side did not find gets rank NaN instead of "
     "inf. rrf is eval/bench-only (search does not offer it) and its test finds every image on both sides"),
    ("retrieval.x_combine", {60, 62}, IN_USE, "dense is None only in lexical mode, whose score ignores dense"),
    ("retrieval.x_combine", {70, 75}, EQUIVALENT, "without constraints every structure part is 0"),
    ("retrieval.x_combine", {89}, EQUIVALENT, "without structure the text score is the score"),
    ("retrieval.x_combine", {100}, LEFT, "rrf with structure: the text score without the ranks; rrf is "
     "eval/bench-only"),
    ("retrieval.x_to_hits", {1}, IN_USE, "default explain: every caller passes it"),
    ("retrieval.x_to_hits", {3, 4}, EQUIVALENT, "SQLite row ids start at 1"),
    ("retrieval.x_to_hits", {7}, EQUIVALENT, "variant_rows([]) is {}"),
    ("retrieval.x_to_hits", {18, 21, 22}, IN_USE, "a lexical key always has its row"),
    ("retrieval.x_to_hits", {34, 41, 48, 55}, LEFT, "the --json parts rounded to 7 decimals instead of 6: "
     "the 6-decimal contract is asserted for `score` only; trivial"),
]


def disposition(name: str) -> tuple[str, str]:
    short = name.removeprefix("edge_t2t.")
    fn, _, number = short.rpartition("__mutmut_")
    for func, numbers, what, why in DISPOSITIONS:
        if fn in (f"query.{func}", f"embed.{func}") and int(number) in numbers:
            return what, why
    return "unclassified", ""


def read_meta(root: Path) -> dict[str, str]:
    out = {}
    for meta in sorted(root.glob("edge_t2t/**/*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = STATUS.get(code, "suspicious")
    return out


def merge(dirs: list[Path], base: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(base or {})
    for d in dirs:
        for name, status in read_meta(d).items():
            if status != "not checked" or name not in out:
                out[name] = status
    return out


def module_of(name: str) -> str:
    return next(m for m in MODULES if name.startswith(f"edge_t2t.{m}.x"))


def counts(verdicts: dict[str, str]) -> dict[str, dict[str, int]]:
    out = {m: Counter() for m in MODULES}
    for name, status in verdicts.items():
        out[module_of(name)][status] += 1
    return {m: {"mutants": sum(c.values()), **c} for m, c in out.items()}


def change(name: str) -> str:
    """The mutated line (+) of `mutmut show` (run in the clone: it reads mutants/)."""
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=ROOT, capture_output=True,
                           text=True).stdout
    added = [line[1:].strip() for line in shown.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else ""


def report(args) -> None:
    before = merge([Path(d) for d in args.meta])
    after = merge([Path(d) for d in args.then], before)
    for item in args.verdict:
        name, _, status = item.partition("=")
        after[name] = status
    by_module_before, by_module_after = counts(before), counts(after)
    survivors = []
    for name in sorted(n for n, s in after.items() if s == "survived"):
        what, why = disposition(name)
        survivors.append({"mutant": name, "change": change(name), "disposition": what, "why": why})
    data = {
        "tool": f"mutmut {metadata.version('mutmut')}",
        "modules": [f"edge_t2t/{m.replace('.', '/')}.py" for m in MODULES],
        "meta_before": args.meta, "meta_after": args.then, "verdicts_by_hand": args.verdict,
        "counts_before": by_module_before, "counts_after": by_module_after,
        "survivors": survivors,
        "dispositions": dict(Counter(s["disposition"] for s in survivors)),
    }
    head = "| module | mutants | checked | killed | timeout | survived before | survived after | not checked |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in MODULES:
        b, a = by_module_before[m], by_module_after[m]
        rows.append(f"| {m} | {a['mutants']} | {a['mutants'] - a.get('not checked', 0)} | {a.get('killed', 0)} | "
                    f"{a.get('timeout', 0)} | {b.get('survived', 0)} | {a.get('survived', 0)} | "
                    f"{a.get('not checked', 0)} |")
    table = ["| mutant | change | disposition | why |", "|---|---|---|---|"]
    for s in survivors:
        code = s["change"].replace("|", "\\|")
        table.append(f"| {s['mutant'].removeprefix('edge_t2t.')} | `{code}` | {s['disposition']} | {s['why']} |")
    notes = Path(args.notes).read_text() if args.notes else ""
    md = "\n".join([data["tool"] + "; " + ", ".join(data["modules"]), "", *rows, "",
                    "Dispositions of the survivors left: " + ", ".join(f"{k} {v}" for k, v in data["dispositions"].items()),
                    "", notes, "", "## Survivors left", "", *table])
    write_results(args.name, data, md)


def run(args) -> None:
    env = dict(os.environ)
    env.setdefault("EDGE_T2T_MODELS_DIR", str(ROOT / "models"))
    env.setdefault("EDGE_T2T_SHARED", str(ROOT.parent / "shared" / "data"))
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs), *args.mutants]
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # mutmut keeps the verdicts reached so far
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--minutes", type=float, default=60.0)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("mutants", nargs="*")
    s = sub.add_parser("report")
    s.add_argument("--meta", action="append", default=[], required=True)
    s.add_argument("--then", action="append", default=[])
    s.add_argument("--verdict", action="append", default=[])
    s.add_argument("--notes", help="a markdown file whose text goes under the table")
    s.add_argument("--name", default="mutation")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
