"""`edge-t2t demo`: the whole pipeline on a fresh machine with no external data.

1. draw seeded synthetic aerial scenes (edge_t2t.demo.scenes) and 2. write their ground-truth RSRT
descriptions; 3. index them through the captions path and run example searches whose right answer
is known; 4. caption some scenes with the configured VLM (or the test VLM, said loudly) into a second
index; 5. index the real RSICD captions when ../shared/data has them; 6. caption, index and search
the user's own images from $DEMO_IMAGES. Every step is timed; a step that cannot run says why.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import config
from ..errors import EdgeT2TError
from ..fileio import atomic_write_text
from . import scenes as S

RSICD_QUERY = "a stadium surrounded by a green field"
USER_QUERY_DEFAULT = "buildings next to a road"
VLM_QUERY = "a lake next to a forest"


@dataclass
class Step:
    name: str
    status: str = "ok"  # ok | skipped | failed | interrupted
    seconds: float = 0.0
    note: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class DemoOptions:
    out_dir: Path = Path("demo-out")
    n_scenes: int = 40
    seed: int = 0
    vlm_images: int = 6  # scenes captioned by the VLM: a real VLM takes ~a minute per image on 2 cores
    rsicd: bool = True
    user_images: Path | None = None  # $DEMO_IMAGES
    user_query: str = USER_QUERY_DEFAULT
    progress: bool = True


def _example_queries(scenes: list[S.Scene]) -> list[tuple[str, str]]:
    """Three of the fixed directional queries, one per kind of template, not picked by outcome."""
    chosen: list[tuple[str, str]] = []
    for template in ("relation", "position-relation", "size-position"):
        for spec, sid in S.directional_query_specs(scenes):
            if spec.template == template:
                chosen.append((spec.text, sid))
                break
    return chosen


def _html_section(query: str, hits, expected: str | None, rank: int | None, expected_path: Path | None = None) -> str:
    from ..images import thumbnail_data_uri

    head = f"<h2>{html.escape(query)}</h2>"
    if expected:
        verdict = "ranked first" if rank == 1 else (f"ranked {rank}" if rank else "not in the top results")
        head += f"<p>Expected scene <b>{html.escape(expected)}</b>: {verdict}.</p>"
    cells = []
    for h in hits:
        path = Path(h.image)
        thumb = (f'<img src="{thumbnail_data_uri(path, 160)}" width="160">' if path.is_file()
                 else '<div class="ph">image not available here</div>')
        mark = " expected" if expected and path.stem == expected else ""
        cells.append(f'<div class="hit{mark}"><div>#{h.rank} &middot; {h.score:.3f}</div>{thumb}'
                     f'<div class="name">{html.escape(path.name)}</div>'
                     f'<div class="text">{html.escape(h.text[:220])}</div></div>')
    if expected_path is not None and expected_path.is_file() and not any(Path(h.image).stem == expected for h in hits):
        # Show the right answer too when the search missed it, so the page never flatters.
        cells.append(f'<div class="hit expected"><div>expected (rank {rank})</div>'
                     f'<img src="{thumbnail_data_uri(expected_path, 160)}" width="160">'
                     f'<div class="name">{html.escape(expected_path.name)}</div></div>')
    return head + '<div class="row">' + "".join(cells) + "</div>"


def _write_html(path: Path, title: str, sections: list[str]) -> Path:
    css = ("body{font-family:system-ui,sans-serif;margin:2em}.row{display:flex;gap:1em;flex-wrap:wrap}"
           ".hit{width:170px;font-size:12px;padding:4px;border:2px solid #ddd}.expected{border-color:#2a2}"
           ".name{font-family:monospace}.text{color:#555}.ph{width:160px;height:160px;background:#eee}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>" + "\n".join(sections)
            + "</body></html>\n")
    return atomic_write_text(path, page)


def _rank_of(hits, expected: str) -> int | None:
    return next((h.rank for h in hits if Path(h.image).stem == expected), None)


def _resolve_vlm(console) -> tuple[object, bool, str]:
    """(VLMConfig, is_test_model, description): the configured VLM, else the test VLM (built if missing)."""
    from ..describe.vlm import VLMConfig, resolve_vlm_paths

    try:
        model, mmproj = resolve_vlm_paths(None, None)
        return VLMConfig(model=model, mmproj=mmproj), False, f"configured VLM {model.name} + {mmproj.name}"
    except EdgeT2TError as exc:
        reason = str(exc).split(".")[0]
    from ..describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm

    build_test_vlm()  # a no-op when already built and current
    d = config.test_vlm_dir()
    cfg = VLMConfig(model=d / MODEL_FILE, mmproj=d / MMPROJ_FILE)
    return cfg, True, f"TEST VLM {MODEL_FILE} (random weights) because {reason}"


def _loud(console, text: str) -> None:
    from rich.panel import Panel

    console.print(Panel(text, border_style="bold red", title="read this"), highlight=False)


def _index(index_dir: Path, embedder, progress: bool, paths=(), captions=None, vlm_cfg=None):
    from ..describe.captioning import CaptionSettings
    from ..describe.captions import CaptionCache
    from ..index.indexer import Indexer

    with ExitStack() as closing:  # the caption cache is closed whatever happens
        cache = closing.enter_context(CaptionCache()) if vlm_cfg is not None else None
        indexer = Indexer(index_dir, embedder=embedder, progress=progress, vlm_cfg=vlm_cfg,
                          caption=CaptionSettings(cache=cache))
        return indexer.run(list(paths), captions_file=captions)


def run_demo(opts: DemoOptions, console=None, on_step: Callable[[Step], None] | None = None) -> list[Step]:
    from rich.console import Console
    from rich.markup import escape
    from rich.rule import Rule

    from ..embed.embedder import Embedder
    from ..query.report import print_table
    from ..query.searcher import Searcher

    console = console or Console()
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    steps: list[Step] = []
    embedder: list = []  # loaded once, on first use

    def emb():
        if not embedder:
            embedder.append(Embedder(precision="int8"))
        return embedder[0]

    def search(index: Path, query: str, k: int):
        with Searcher(index, embedder=emb()) as searcher:
            return searcher.text(query, k)

    def step(name: str, fn: Callable[[Step], None]) -> bool:
        console.print(Rule(name))
        s = Step(name)
        t0 = time.perf_counter()
        try:
            fn(s)
        except KeyboardInterrupt:
            s.status, s.note = "interrupted", "Ctrl-C: finished batches are kept in the index"
        except EdgeT2TError as exc:
            s.status, s.note = "failed", str(exc)
            console.print(f"[red]failed:[/red] {escape(str(exc))}", highlight=False)
        s.seconds = time.perf_counter() - t0
        steps.append(s)
        if on_step:
            on_step(s)
        return s.status != "interrupted"

    scene_dir = out / "scenes"
    state: dict = {}

    def draw(s: Step) -> None:
        paths, captions = S.write_scene_set(scene_dir, n=opts.n_scenes, seed=opts.seed)
        state.update(paths=paths, captions=captions, scenes=S.make_scenes(opts.n_scenes, opts.seed))
        s.note = f"{len(paths)} PNGs + ground truth (5 variants each) in {captions}"
        s.details = {"images": len(paths), "captions": str(captions)}
        console.print(s.note, highlight=False)
        first = S.describe(state["scenes"][0], seed=opts.seed).variants[0]
        console.print(f"e.g. {paths[0].name}: {first.one_sentence}", highlight=False)

    def text_search(s: Step) -> None:
        index = out / "index-text"
        summary = _index(index, emb(), opts.progress, [scene_dir], state["captions"])
        sections, results = [], []
        with Searcher(index, embedder=emb()) as searcher:
            for query, expected in _example_queries(state["scenes"]):
                hits = searcher.text(query, 5)
                print_table(hits, query, console)
                rank = _rank_of(searcher.text(query, opts.n_scenes), expected)
                ok = rank == 1
                console.print(("[green]expected scene ranked first[/green]" if ok else
                               f"[yellow]expected scene {expected} ranked {rank}, not first[/yellow]"), highlight=False)
                results.append({"query": query, "expected": expected, "rank": rank})
                sections.append(_html_section(query, hits, expected, rank, scene_dir / f"{expected}.png"))
            # All fixed queries, so the three above are seen against the whole list.
            ranks = [_rank_of(searcher.text(query, opts.n_scenes), expected) or opts.n_scenes
                     for query, expected in S.directional_queries(state["scenes"])]  # fmt: skip
        first, top5 = sum(r == 1 for r in ranks), sum(r <= 5 for r in ranks)
        page = _write_html(out / "demo.html", "edge-t2t demo: synthetic scenes, ground-truth descriptions", sections)
        s.note = (f"indexed {summary.added} new ({summary.skipped} unchanged); all {len(ranks)} fixed directional "
                  f"queries: {first} first, {top5} in the top 5 (chance: {len(ranks) / opts.n_scenes:.1f} first); "
                  f"thumbnails in {page}")
        s.details = {"examples": results, "fixed_first": first, "fixed_top5": top5, "fixed_n": len(ranks)}
        console.print(s.note, highlight=False)

    def vlm_path(s: Step) -> None:
        from ..describe.vlm import llama_cpp_import_error

        missing = llama_cpp_import_error()
        if missing:
            s.status, s.note = "skipped", f"llama-cpp-python is not importable ({missing}); run 'make setup'"
            console.print(s.note, highlight=False)
            return
        cfg, is_test, what = _resolve_vlm(console)
        if is_test:
            _loud(console, f"Captioning with the {what}.\nIts captions are PLACEHOLDERS and its ranking means "
                           "NOTHING: this step only shows the pipeline runs. Put a real GGUF VLM + mmproj in "
                           f"{config.user_vlm_dir()}/ or set EDGE_T2T_VLM / EDGE_T2T_MMPROJ.")
        else:
            _loud(console, f"Captioning with the {what}.")
        subset = state["paths"][: opts.vlm_images]
        index = out / ("index-testvlm" if is_test else "index-vlm")
        summary = _index(index, emb(), opts.progress, subset, vlm_cfg=cfg)
        hits = search(index, VLM_QUERY, 3)
        print_table(hits, VLM_QUERY + (" (TEST VLM: meaningless)" if is_test else ""), console)
        s.note = (f"{'TEST VLM (placeholder captions)' if is_test else 'configured VLM'}: "
                  f"{summary.added} captioned+indexed, {summary.skipped} unchanged, {summary.failed} failed "
                  f"of {len(subset)} scenes into {index}")
        s.details = {"test_model": is_test, "model": str(cfg.model), "images": len(subset), "failed": summary.failed}
        console.print(s.note, highlight=False)

    def real_data(s: Step) -> None:
        path = config.shared_data_dir() / "rsicd" / "captions_val.json"
        if not opts.rsicd or not path.is_file():
            s.status = "skipped"
            s.note = "--no-rsicd" if not opts.rsicd else f"{path} not found (no real data on this machine)"
            console.print(s.note, highlight=False)
            return
        index = out / "index-rsicd"
        summary = _index(index, emb(), opts.progress, captions=path)
        hits = search(index, RSICD_QUERY, 5)
        print_table(hits, RSICD_QUERY, console)
        s.note = (f"RSICD val captions: {summary.added} new images ({summary.skipped} unchanged) in {index}; "
                  "images themselves are not here, only their captions")
        s.details = {"added": summary.added, "top": [h.image for h in hits]}
        console.print(s.note, highlight=False)

    def user_images(s: Step) -> None:
        if opts.user_images is None:
            s.status, s.note = "skipped", "set DEMO_IMAGES=DIR to caption, index and search your own images"
            console.print(s.note, highlight=False)
            return
        if not opts.user_images.is_dir():
            raise EdgeT2TError(f"DEMO_IMAGES={opts.user_images} is not a folder: point it at a folder of images")
        cfg, is_test, what = _resolve_vlm(console)
        _loud(console, f"Captioning your images in {opts.user_images} with the {what}."
              + ("\nTEST VLM: placeholder captions; the ranking below means nothing." if is_test else ""))
        index = out / "index-user"
        summary = _index(index, emb(), opts.progress, [opts.user_images], vlm_cfg=cfg)
        hits = search(index, opts.user_query, 5)
        print_table(hits, opts.user_query, console)
        s.note = (f"{'TEST VLM (placeholder captions, ranking meaningless)' if is_test else 'configured VLM'}: "
                  f"{summary.added} new, {summary.skipped} unchanged, {summary.failed} failed in {index}")
        s.details = {"test_model": is_test, "added": summary.added, "failed": summary.failed}
        console.print(s.note, highlight=False)

    plan = [
        ("1-2. scenes + ground-truth descriptions", draw),
        ("3. text search over the ground truth", text_search),
        ("4. VLM captioning path", vlm_path),
        ("5. real data: RSICD captions", real_data),
        ("6. your images ($DEMO_IMAGES)", user_images),
    ]
    for i, (name, fn) in enumerate(plan):
        if i > 0 and "scenes" not in state and name.startswith(("3", "4")):
            steps.append(Step(name, "skipped", 0.0, "no scenes (step 1 failed)"))
            continue
        if not step(name, fn):
            break
    return steps


def summary_table(steps: list[Step], total: float):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"edge-t2t demo: {total:.1f} s in all")
    t.add_column("step")
    t.add_column("status")
    t.add_column("seconds", justify="right")
    t.add_column("result", overflow="fold")
    colour = {"ok": "green", "skipped": "yellow", "failed": "red", "interrupted": "red"}
    for s in steps:
        t.add_row(escape(s.name), f"[{colour[s.status]}]{s.status}[/]", f"{s.seconds:.1f}", escape(s.note))
    return t


def steps_to_dicts(steps: list[Step]) -> list[dict]:
    return [asdict(s) for s in steps]
