"""The package's structure, measured (issue 24). Two instruments, and what each counts:

Imports, read with `ast` from every module of edge_t2t (imports inside functions included,
relative imports resolved to the module they name):
- an import circle is a strongly connected component of the module import graph with more than one
  module: modules that reach each other through imports;
- a private import is `from M import _name` where _name is not a module and not a dunder
  (`__version__` is public): reaching into another module's private names;
- a module's size is its number of lines; only describe/vlm.py, the llama.cpp adapter, may import
  llama_cpp (any `import llama_cpp...` or `from llama_cpp... import`).

A trace of `edge-t2t search`: cli/search.py:run run in-process under sys.setprofile on small indexes
(a caption-file index of synthetic scenes; a georeferenced mosaic for --within), once untraced to
import what it imports, then traced. Over the package's files only:
- LAYERS orders the modules (docs/architecture.md shows the same table); a climb is a call from a
  module into a module of a higher layer;
- a file is entered where a call from another package file hands it one of the command's arguments
  (the query text, the index directory, the query image's path, the place): a parameter (self and
  *args/**kwargs included, lists and tuples one level deep) equal to one of them. This follows the
  arguments, as the issue's reading did; calls with derived values (vectors, rows, hits) are the
  modules' own business and are not counted. Each call site (caller file and line, callee
  function) counts once, however often a loop runs it; a generator counts on its first call only.
  Climbs are counted by call site too;
- the store is opened once: Store() constructions and sqlite3.connect calls during the command.

Run as a script (`python tests/test_structure.py`) it prints the figures without asserting, so the
same instrument can be pointed at an older tree (PYTHONPATH=OLD_TREE): its figures are in
docs/architecture.md.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import inspect
import io
import json
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import edge_t2t

PACKAGE = Path(edge_t2t.__file__).resolve().parent
MAX_LINES = 600
LLAMA_ADAPTER = "describe/vlm.py"

# Highest first. A module may call and import its own layer and the layers below it. Entries are
# files or folders (ending in "/"); an empty package __init__.py is shared.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("commands", ("cli/", "serve.py", "serve_pool.py", "serve_answers.py", "serve_access.py", "doctor.py", "__main__.py", "web/", "manual/", "demo/demo.py",
                  "evaluation/eval_report.py", "evaluation/evaluate.py", "evaluation/quantcost.py",
                  "evaluation/quant_report.py", "evaluation/index_source.py")),
    ("searcher", ("query/searcher.py",)),
    ("ranking", ("query/retrieval.py", "scene/geosearch.py", "query/report.py", "scene/scene_report.py")),
    ("ranking parts", ("query/search.py", "query/lexical.py", "query/query_parse.py")),
    ("index", ("index/", "scene/scene_index.py", "scene/chipstore.py")),
    ("describe and embed", ("describe/", "embed/", "scene/tiling.py", "scene/geo.py", "scene/mosaic.py",
                            "demo/scenes.py", "demo/scene_drawing.py", "evaluation/dataset.py")),
    ("shared", ("config.py", "errors.py", "records.py", "modes.py", "hashing.py", "fileio.py", "images.py",
                "__init__.py")),
)  # fmt: skip

MAX_ENTRIES_PER_FILE = 2
MAX_CLIMBS = 5


def layer_of(rel: str) -> int:
    """The rank of a package file's layer (0 = highest); KeyError for a file no layer names."""
    for rank, (_, members) in enumerate(LAYERS):
        if rel in members or any(m.endswith("/") and rel.startswith(m) for m in members):
            return rank
    if rel.endswith("/__init__.py") and not (PACKAGE / rel).read_text().strip():
        return len(LAYERS) - 1
    raise KeyError(f"{rel} is in no layer of tests/test_structure.py LAYERS (and docs/architecture.md)")


# -- imports, read with ast ------------------------------------------------------------------------
def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


@dataclass
class Imports:
    edges: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    private: list[str] = field(default_factory=list)  # "importer: from module import _name"
    llama_cpp: set[str] = field(default_factory=set)  # modules importing llama_cpp


def read_imports(modules: dict[str, Path]) -> Imports:
    out = Imports()
    root = min(modules, key=len)  # the package itself
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "llama_cpp":
                        out.llama_cpp.add(name)
                    target = _known(alias.name, modules)
                    if target and target != name:
                        out.edges[name].add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    base = node.module or ""
                    if base.split(".")[0] == "llama_cpp":
                        out.llama_cpp.add(name)
                else:
                    up = package[: len(package) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                if base.split(".")[0] != root:
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # a module
                        target = f"{base}.{alias.name}"
                    else:  # a name in a module
                        target = _known(base, modules)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            out.private.append(f"{name}: from {base} import {alias.name}")
                    if target and target != name:
                        out.edges[name].add(target)
    return out


def _known(dotted: str, modules: dict[str, Path]) -> str | None:
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module."""
    reach: dict[str, set[str]] = {}
    for start in list(edges):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        reach[start] = seen
    circles = {frozenset(m for m in reach if m in reach[start] and start in reach[m]) | {start}
               for start in reach if start in reach[start]}  # fmt: skip
    return sorted(sorted(c) for c in circles if len(c) > 1)


def module_lines(modules: dict[str, Path]) -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules.items()}


# -- the trace of `edge-t2t search` -----------------------------------------------------------------
@dataclass
class Trace:
    entries: collections.Counter = field(default_factory=collections.Counter)  # file -> times entered
    climbs: set[str] = field(default_factory=set)  # "caller:line -> callee:function"
    stores_opened: int = 0  # Store() constructions
    connections: int = 0  # sqlite3.connect calls
    files: set[str] = field(default_factory=set)  # package files run


def _rel(filename: str) -> str | None:
    prefix = str(PACKAGE) + os.sep
    return filename[len(prefix):].replace(os.sep, "/") if filename.startswith(prefix) else None


def _carries(value, follow: list) -> bool:
    """Whether a parameter value is (or, for a list or tuple, holds) one of the followed arguments."""
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return any(_carries(v, follow) for v in value[:64])
    for arg in follow:
        if isinstance(arg, Path):
            if isinstance(value, (str, os.PathLike)) and str(value) and Path(value) == arg:
                return True
        elif type(value) is type(arg) and value == arg:
            return True
    return False


def _parameters(frame) -> list:
    code = frame.f_code
    n = code.co_argcount + code.co_kwonlyargcount
    n += bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    local = frame.f_locals
    out = []
    for name in code.co_varnames[:n]:
        value = local.get(name)
        out.extend(value.values() if isinstance(value, dict) else [value])
    return out


def trace_search(argv: list[str], follow: list) -> Trace:
    """Run `edge-t2t ARGV` (a search) in-process, once to import, once traced; see the docstring."""
    from edge_t2t.cli import build_parser
    from edge_t2t.index.store import Store

    args = build_parser().parse_args(argv)
    quiet = contextlib.ExitStack()
    with quiet:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        assert args.func(args) == 0
    out = Trace()
    store_init = Store.__init__.__code__
    generators: set = set()
    sites: set[str] = set()  # call sites already counted as entries
    gen_flags = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR

    def profile(frame, event, arg):
        if event == "c_call":
            out.connections += arg is sqlite3.connect
            return
        if event != "call":
            return
        callee = _rel(frame.f_code.co_filename)
        if callee is None:
            return
        if frame.f_code.co_flags & gen_flags:
            if frame in generators:  # resumed, not entered
                return
            generators.add(frame)
        out.files.add(callee)
        out.stores_opened += frame.f_code is store_init
        caller_frame = frame.f_back
        while caller_frame is not None and _rel(caller_frame.f_code.co_filename) is None:
            caller_frame = caller_frame.f_back
        caller = _rel(caller_frame.f_code.co_filename) if caller_frame is not None else None
        if caller is None or caller == callee:
            return
        site = f"{caller}:{caller_frame.f_lineno} -> {callee}:{frame.f_code.co_name}"
        if layer_of(callee) < layer_of(caller):
            out.climbs.add(site)
        if site not in sites and any(_carries(v, follow) for v in _parameters(frame)):
            sites.add(site)
            out.entries[callee] += 1

    with quiet:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        sys.setprofile(profile)
        try:
            code = args.func(args)
        finally:
            sys.setprofile(None)
    assert code == 0
    return out


def _scene_set(root: Path) -> tuple[Path, Path]:
    """Eight synthetic scenes indexed with their ground-truth descriptions: (index, one image)."""
    from edge_t2t.cli import main
    from edge_t2t.demo.scenes import write_scene_set

    paths, captions = write_scene_set(root / "images", n=8, seed=0)
    index = root / "index"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["index", str(root / "images"), "--captions", str(captions), "--index", str(index),
                     "--no-progress", "--json"]) == 0  # fmt: skip
    return index, paths[0]


def _mosaic_index(root: Path) -> tuple[Path, str]:
    """A georeferenced mosaic indexed as chips with their ground truth: (index, a --within box)."""
    from edge_t2t.cli import main
    from edge_t2t.describe.captions import JsonlWriter
    from edge_t2t.scene.mosaic import write_mosaic

    root.mkdir(parents=True, exist_ok=True)
    mosaic = write_mosaic(root / "m.tif")
    truth = root / "m.gt.jsonl"
    with JsonlWriter(truth) as w:
        for rec in mosaic.records():
            w.write(rec)
    index = root / "m.ix"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["index", str(mosaic.path), "--captions", str(truth), "--index", str(index), "--json",
                     "--tile-above", "0.1", "--chip", "256", "--overlap", "0", "--no-progress"]) == 0  # fmt: skip
    window, obj = next((w, o) for scene, w in mosaic.placed for o in scene.objects if not o.linear)
    lon, lat = mosaic.object_lonlat(window, obj)
    return index, f"{lon - 0.01},{lat - 0.01},{lon + 0.01},{lat + 0.01}"


def search_commands(root: Path) -> dict[str, tuple[list[str], list]]:
    """name -> (argv, the arguments followed) of the traced searches."""
    from edge_t2t.scene.geo import PlaceFilter

    index, image = _scene_set(root / "scenes")
    geo_index, box = _mosaic_index(root / "geo")
    query = "a runway east of a river"
    return {
        "text": (["search", query, "--index", str(index)], [query, index]),
        "hybrid --explain --json": (["search", query, "--index", str(index), "--mode", "hybrid", "--explain", "--json"],
                                    [query, index]),
        "--image --exclude-self": (["search", "--image", str(image), "--index", str(index), "--exclude-self",
                                    "--json"], [image, index]),
        "--within --geojson": (["search", "a storage tank", "--index", str(geo_index), "--within", box, "--json",
                                "--geojson", str(root / "hits.geojson")],
                               ["a storage tank", geo_index, box, PlaceFilter.within(box)]),
    }  # fmt: skip


def figures(root: Path) -> dict:
    """Every figure the tests below bound, as one JSON-ready dict."""
    modules = package_modules()
    imports = read_imports(modules)
    lines = module_lines(modules)
    largest = max(lines, key=lines.get)
    out: dict = {
        "import_circles": import_circles(imports.edges),
        "private_imports": imports.private,
        "largest_module": [largest, lines[largest]],
        "modules_over_limit": {m: n for m, n in lines.items() if n > MAX_LINES},
        "llama_cpp_importers": sorted(imports.llama_cpp),
        "searches": {},
    }
    for name, (argv, follow) in search_commands(root).items():
        t = trace_search(argv, follow)
        out["searches"][name] = {
            "files_run": len(t.files),
            "entries": dict(t.entries.most_common()),
            "climbs": sorted(t.climbs),
            "stores_opened": t.stores_opened,
            "sqlite_connections": t.connections,
        }
    return out


# -- the tests ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imports() -> Imports:
    return read_imports(package_modules())


def test_no_import_circles(imports):
    assert import_circles(imports.edges) == []


def test_no_module_imports_another_modules_private_names(imports):
    assert imports.private == []


def test_no_module_is_over_the_line_limit():
    assert {m: n for m, n in module_lines(package_modules()).items() if n > MAX_LINES} == {}


def test_only_the_adapter_imports_llama_cpp(imports):
    assert imports.llama_cpp == {f"{PACKAGE.name}.{LLAMA_ADAPTER[:-3].replace('/', '.')}"}


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones(imports):
    """The layers the trace counts climbs against hold for the imports too (none points up)."""
    modules = package_modules()
    rel = {name: path.relative_to(PACKAGE).as_posix() for name, path in modules.items()}
    upward = [f"{rel[a]} -> {rel[b]}" for a, targets in imports.edges.items() for b in targets
              if layer_of(rel[b]) < layer_of(rel[a])]  # fmt: skip
    assert upward == []


def test_the_instruments_see_what_they_are_meant_to(tmp_path):
    """Each instrument counts a known case: a circle, a private import, an adapter import, a climb
    and an entry (so a figure of 0 above is not an instrument that sees nothing)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import _hidden, __version__\n    import llama_cpp\n")
    mods = package_modules(pkg)
    found = read_imports(mods)
    assert import_circles(found.edges) == [["pkg.a", "pkg.sub.b"]]
    assert found.private == ["pkg.sub.b: from pkg.a import _hidden"]
    assert found.llama_cpp == {"pkg.sub.b"}
    assert _carries(["x", "the query"], ["the query"]) and not _carries("the queries", ["the query"])
    assert _carries(str(tmp_path), [tmp_path]) and not _carries(tmp_path / "store.sqlite", [tmp_path])
    assert layer_of("query/search.py") > layer_of("query/retrieval.py") > layer_of("query/searcher.py")


def test_a_search_follows_one_way_through_the_package(tmp_path):
    """Every traced search: each file entered at most twice, at most MAX_CLIMBS climbs, one store."""
    got = figures(tmp_path)["searches"]
    for name, f in got.items():
        assert max(f["entries"].values()) <= MAX_ENTRIES_PER_FILE, (name, f["entries"])
        assert len(f["climbs"]) <= MAX_CLIMBS, (name, f["climbs"])
        assert (f["stores_opened"], f["sqlite_connections"]) == (1, 1), (name, f)
        assert f["entries"].get("index/store.py") == 1, (name, f["entries"])  # the index opened once, here


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(figures(Path(tmp)), indent=1))
