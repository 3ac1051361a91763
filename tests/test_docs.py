"""The user documentation (issue 27): README.md and docs/*.md are short where they must be, their
links hold, docs/cli.md is what the parsers say, every example command parses, and every block
marked runnable runs.

Runnable blocks: a fenced block whose info string is `sh runnable` is run with bash (-e, pipefail),
the page's blocks in order, each page in a fresh copy of a workspace laid out like a clone after
`make demo`:

    models/             embedder/ and test-vlm/ (links to the built ones), vlm/ (empty)
    demo-out/           what `edge-t2t demo --vlm-images 0 --no-rsicd` wrote (its index of ground truth)
    imagery/            four of the demo's scenes: "a folder of your images"
    scene.tif           a 1024x512 georeferenced mosaic (UTM 33N, near 15 E 42 N); chips.jsonl holds
                        the ground truth of its two 512-px chips
    model.gguf, mmproj.gguf   the test VLM's pair: "the files you copied"
    captions_val.json   the RSICD validation captions (../shared/data)

The test VLM stands in for the reader's VLM (EDGE_T2T_VLM/EDGE_T2T_MMPROJ); models, caches and HOME
point into the workspace, and nothing touches the network. A ```text output block right after a
runnable one lists lines its output must contain, in order (`...` matches anything).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_t2t import config
from edge_t2t.manual import cli_reference, pages

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
NOTES = [ROOT / "bench" / "results" / "README-history.md", ROOT / "bench" / "results" / "retrieval_modes_notes.md"]
DOC_FILES = [README, *GUIDES]
MAX_README_LINES = 250
BLOCK_TIMEOUT_S = 600


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _tokens(path: Path):
    md = pages.markdown()
    assert md is not None, "markdown-it-py is missing (rich requires it): run 'make setup'"
    return md.parse(path.read_text(encoding="utf-8"))


def _blocks(path: Path) -> list[dict]:
    """Every fenced sh block of a page: {line, code, runnable, expect (lines, or None)}."""
    fences = [t for t in _tokens(path) if t.type == "fence"]
    out = []
    for i, t in enumerate(fences):
        words = t.info.split()
        if not words or words[0] != "sh":
            continue
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        expect = None
        if nxt is not None and nxt.info.split() == ["text", "output"] and nxt.map[0] - t.map[1] <= 1:
            expect = [line.strip() for line in nxt.content.splitlines() if line.strip()]
        out.append({"line": t.map[0] + 1, "code": t.content, "runnable": "runnable" in words[1:], "expect": expect})
    return out


# -- size and links ---------------------------------------------------------------------------------
def test_readme_is_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail into docs/"


def test_readme_links_every_guide():
    """A page no one links to is a page no one finds: the README reaches every guide."""
    linked = set()
    for href, _ in pages.links(_tokens(README)):
        target = pages.resolve("README.md", href)
        if target:
            linked.add(target[0])
    missing = [_rel(g) for g in GUIDES if _rel(g) not in linked]
    assert not missing, f"README.md links to no {missing}"


@pytest.mark.parametrize("path", [*DOC_FILES, *NOTES], ids=_rel)
def test_relative_links_and_anchors_resolve(path):
    source = _rel(path)
    anchors = {}  # page -> its heading anchors

    def anchors_of(rel: str) -> set[str]:
        if rel not in anchors:
            anchors[rel] = set(pages.heading_anchors(_tokens(ROOT / rel)))
        return anchors[rel]

    broken = []
    for href, line in pages.links(_tokens(path)):
        if href.startswith("#"):
            target = (source, href[1:])
        else:
            target = pages.resolve(source, href)
            if target is None:
                continue  # an absolute URL
            if not (ROOT / target[0]).exists():
                broken.append(f"{source}:{line}: {href} (no file {target[0]})")
                continue
        rel, anchor = target
        if anchor and rel.endswith(".md") and anchor not in anchors_of(rel):
            broken.append(f"{source}:{line}: {href} (no heading #{anchor} in {rel})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_heading_anchors_are_githubs():
    """The anchors links use are the ones GitHub makes (examples worked out by hand from its rules:
    lower case, punctuation dropped, each space a hyphen, repeats numbered)."""
    seen: dict[str, int] = {}
    got = [pages.slugify(t, seen) for t in ("Air-gapped: install from the bundle", "`--json` output", "A GPU",
                                            "Scores", "Scores", "What a 224 px image costs")]
    assert got == ["air-gapped-install-from-the-bundle", "--json-output", "a-gpu", "scores", "scores-1",
                   "what-a-224-px-image-costs"]


# -- the CLI reference ------------------------------------------------------------------------------
def test_cli_reference_is_current():
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == cli_reference.generate(), (
        f"docs/cli.md is stale: run `{cli_reference.COMMAND}` "
        "(.venv/bin/python -m edge_t2t.manual.cli_reference) and commit docs/cli.md")


def test_cli_reference_names_every_command_and_option():
    """Checked against the parsers' own --help, not against the generator's walk."""
    from edge_t2t.cli import build_parser

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")

    def subcommands(help_text: str) -> list[str]:
        return re.findall(r"^    ([a-z][a-z-]+)\s", help_text, flags=re.M)

    commands = [[c] for c in subcommands(build_parser().format_help())]
    assert len(commands) >= 13
    for words in commands:
        assert f"# edge-t2t {' '.join(words)}\n" in text, words
        proc = subprocess.run([sys.executable, "-m", "edge_t2t", *words, "--help"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"}, timeout=60)  # fmt: skip
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", proc.stdout)) - {"--help"}:
            assert f"`{option}" in text, f"edge-t2t {' '.join(words)} {option} is not in docs/cli.md"
        if len(words) == 1:
            commands += [[*words, sub] for sub in subcommands(proc.stdout)]


# -- every example command parses ------------------------------------------------------------------
def _command_lines(code: str) -> list[str]:
    return [line for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _edge_t2t_argv(line: str) -> list[str] | None:
    """The arguments after `edge-t2t` on one shell line (redirections and pipes cut off), or None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if Path(w).name == "edge-t2t":
            argv = []
            for a in words[i + 1:]:
                if a in ("|", "||", "&&", ";", "&") or re.match(r"^\d?>", a) or a.startswith("<"):
                    break
                argv.append(a)
            return argv
    return None


def test_every_example_command_parses():
    """Every `edge-t2t ...` line of every sh block, runnable or not, is accepted by the real parser:
    a renamed or removed option fails here even in examples that cannot run in a test."""
    from edge_t2t.cli import build_parser

    checked, bad = 0, []
    for path in DOC_FILES:
        for block in _blocks(path):
            for line in _command_lines(block["code"]):
                argv = _edge_t2t_argv(line)
                if argv is None:
                    continue
                checked += 1
                try:
                    build_parser().parse_args(argv)
                except SystemExit:
                    bad.append(f"{_rel(path)}:{block['line']}: {line.strip()}")
    assert checked >= 50, checked
    assert not bad, "example commands the parser refuses:\n" + "\n".join(bad)


# -- runnable blocks -------------------------------------------------------------------------------
RUNNABLE = [p for p in DOC_FILES if any(b["runnable"] for b in _blocks(p))]


def _env(page_dir: Path, root: Path) -> dict:
    test_vlm = config.test_vlm_dir()
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_T2T_", "DEMO_", "XDG_", "VIRTUAL_ENV"))}
    return {
        **keep,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(root / "home"),
        "XDG_CACHE_HOME": str(root / "home" / ".cache"),
        "EDGE_T2T_MODELS_DIR": str(page_dir / "models"),
        "EDGE_T2T_CACHE_DIR": str(root / "caption-cache"),  # shared: a page reuses what another described
        "EDGE_T2T_SHARED": str(config.shared_data_dir()),
        "EDGE_T2T_VLM": str(test_vlm / "tiny-llava.Q4_K_M.gguf"),
        "EDGE_T2T_MMPROJ": str(test_vlm / "tiny-llava-mmproj.F16.gguf"),
        "COLUMNS": "160",  # rich's tables: wide enough that a file name is not folded
    }


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, shared_data) -> Path:
    """The clone-like workspace every page's copy starts from (see the module docstring)."""
    import helpers_media as hm

    hm.require("rasterio", "the 'geo' extra is not installed: pip install -e '.[geo]' (make test installs it)")
    hm.require("distributed", "the 'cluster' extra is not installed: pip install -e '.[cluster]'")
    from edge_t2t.describe.captions import JsonlWriter
    from edge_t2t.scene.mosaic import write_mosaic

    embedder, test_vlm = config.embedder_dir(), config.test_vlm_dir()
    for need in (embedder / "manifest.json", test_vlm / "tiny-llava.Q4_K_M.gguf"):
        if not need.is_file():
            pytest.fail(f"{need} is missing: run 'make models' first")
    if not (Path(sys.executable).parent / "edge-t2t").is_file():
        pytest.fail(f"no edge-t2t script beside {sys.executable}: run 'make setup'")
    root = tmp_path_factory.mktemp("docs")
    (root / "home").mkdir()
    clone = root / "clone"
    (clone / "models" / "vlm").mkdir(parents=True)
    (clone / "models" / "embedder").symlink_to(embedder)
    (clone / "models" / "test-vlm").symlink_to(test_vlm)
    env = _env(clone, root)
    demo = subprocess.run(["edge-t2t", "demo", "--vlm-images", "0", "--no-rsicd"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    (clone / "imagery").mkdir()
    for n in range(4):
        shutil.copy2(clone / "demo-out" / "scenes" / f"scene-0-{n:03d}.png", clone / "imagery")
    mosaic = write_mosaic(clone / "scene.tif", grid=(2, 1), tile=512)
    with JsonlWriter(clone / "chips.jsonl") as w:
        for rec in mosaic.records("scene.tif"):
            w.write(rec)
    (clone / "model.gguf").symlink_to(test_vlm / "tiny-llava.Q4_K_M.gguf")
    (clone / "mmproj.gguf").symlink_to(test_vlm / "tiny-llava-mmproj.F16.gguf")
    (clone / "captions_val.json").symlink_to(shared_data / "rsicd" / "captions_val.json")
    return clone


def _expected(lines: list[str], output: str) -> str | None:
    """The first expected line not found (in order) in the output, or None."""
    at = 0
    for line in lines:
        pattern = ".*?".join(re.escape(part) for part in line.split("..."))
        m = re.compile(pattern).search(output, at)
        if m is None:
            return line
        at = m.end()
    return None


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=_rel)
def test_runnable_examples(path, workspace, tmp_path):
    page_dir = tmp_path / "clone"
    shutil.copytree(workspace, page_dir, symlinks=True)
    env = _env(page_dir, workspace.parent)
    for block in (b for b in _blocks(path) if b["runnable"]):
        where = f"{_rel(path)}:{block['line']}"
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["code"]], cwd=page_dir, env=env,
                              capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{block['code']}\n--- output ---\n{output[-4000:]}"
        if block["expect"]:
            missing = _expected(block["expect"], proc.stdout)
            assert missing is None, f"{where}: the output lacks {missing!r}\n--- stdout ---\n{proc.stdout[-4000:]}"
