"""The caption pipeline: cache hits without the model, failures that do not stop a run, retries,
quality notes, Ctrl-C. Most tests use a scripted stand-in VLM (instant, exact); the last ones run the
tiny generated GGUF test VLM through llama.cpp."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import helpers_media as hm
import numpy as np
import pytest
from PIL import Image

from edge_t2t import config
from edge_t2t.describe import prompts
from edge_t2t.describe.captioning import Callbacks, caption_images
from edge_t2t.describe.captions import CaptionCache
from edge_t2t.describe.vlm import VLMConfig
from edge_t2t.errors import ModelError


def _answer(n: int, tag: str) -> str:
    return json.dumps({"variants": [{
        "one_sentence": f"Scene {tag} seen from above, focus {i}.",
        "features": [{"name": f"building {i}", "position": "north", "size": "large"}],
        "caption": f"Buildings stand in the north of scene {tag}; a road crosses it ({i}).",
    } for i in range(n)]})  # fmt: skip


class ScriptedVLM:
    """Answers like a well-behaved model; `script` can override answers call by call."""

    def __init__(self, cfg, script=None, supports_grammar=True, fail_with=None):
        self.cfg = cfg
        self.calls = 0
        self.script = list(script or [])
        self.supports_grammar = supports_grammar
        self.fail_with = fail_with
        self.family, self.model_name, self.is_test_model = "llava-1.5", "scripted", False
        self.model_path, self.mmproj_path = Path(cfg.model), Path(cfg.mmproj)
        self.model_sha256 = hashlib.sha256(self.model_path.read_bytes()).hexdigest()
        self.mmproj_sha256 = hashlib.sha256(self.mmproj_path.read_bytes()).hexdigest()
        self.seen: list[dict] = []
        self.closed = False

    def generate(self, image, prompt, *, json_schema=None, max_tokens=512, temperature=0.0, mime="image/png"):
        self.calls += 1
        self.seen.append({"schema": json_schema, "temperature": temperature, "max_tokens": max_tokens})
        if self.fail_with:
            raise self.fail_with
        assert Image.open(io.BytesIO(image)).format == "PNG"
        if self.script:
            return self.script.pop(0)
        n = json_schema["properties"]["variants"]["minItems"] if json_schema else 5
        return _answer(n, hashlib.sha256(image).hexdigest()[:8])

    def close(self):
        self.closed = True


@pytest.fixture()
def env(tmp_path: Path):
    (tmp_path / "m.gguf").write_bytes(b"model bytes")
    (tmp_path / "p.gguf").write_bytes(b"mmproj bytes")
    cfg = VLMConfig(model=tmp_path / "m.gguf", mmproj=tmp_path / "p.gguf", family=None, seed=0)
    made: list[ScriptedVLM] = []

    def factory(**kw):
        def make(c):
            vlm = ScriptedVLM(c, **kw)
            made.append(vlm)
            return vlm

        return make

    cache = CaptionCache(tmp_path / "cache" / "captions.sqlite")
    yield SimpleNamespace(cfg=cfg, factory=factory, made=made, cache=cache, tmp=tmp_path)
    cache.close()


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(n)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_records_then_fully_cached_run_never_loads_model(env) -> None:
    imgs = _images(env.tmp / "imgs", 3)
    out: list = []
    s1 = caption_images([env.tmp / "imgs"], env.cfg, n_variants=3, cache=env.cache, on_record=out.append,
                        vlm_factory=env.factory())  # fmt: skip
    assert (s1.total, s1.captioned, s1.cached, s1.failed, s1.model_calls) == (3, 3, 0, 0, 3)
    assert env.made[0].closed
    assert [r.image for r in out] == [str(p) for p in imgs]
    for r, p in zip(out, imgs, strict=True):
        assert r.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
        assert len(r.variants) == 3 and not r.cached and r.constrained
        assert r.prompt_version == prompts.PROMPT_VERSION and r.model == "m.gguf" and r.mmproj == "p.gguf"
        assert "problems" not in r.extra
    assert env.made[0].seen[0]["schema"] == prompts.schema(3)
    assert env.made[0].seen[0]["max_tokens"] == prompts.default_max_tokens(3)

    again: list = []
    s2 = caption_images([env.tmp / "imgs"], env.cfg, n_variants=3, cache=env.cache, on_record=again.append,
                        vlm_factory=env.factory())  # fmt: skip
    assert (s2.captioned, s2.cached, s2.model_calls, s2.model_loaded) == (0, 3, 0, False)
    assert len(env.made) == 1  # the factory was never called the second time
    assert [r.to_dict()["variants"] for r in again] == [r.to_dict()["variants"] for r in out]
    assert all(r.cached for r in again)


def test_a_kept_model_counts_each_runs_calls_and_summaries_add_up(env) -> None:
    """Scene chips are described batch by batch with one kept model: each batch's summary counts its own
    model calls (not the model's calls so far), and merging the summaries gives the whole run's counts."""
    from edge_t2t.describe.captioning import CaptionSummary, InProcess

    _images(env.tmp / "a", 2)
    _images(env.tmp / "b", 3)  # other pixels (another seed): no cache hits between the two
    kept = InProcess(env.factory(), keep_loaded=True)
    try:
        s1 = caption_images([env.tmp / "a"], env.cfg, n_variants=2, cache=env.cache, executor=kept)
        s2 = caption_images([env.tmp / "b"], env.cfg, n_variants=2, cache=env.cache, executor=kept)
    finally:
        kept.close()
    assert len(env.made) == 1 and env.made[0].calls == 5
    assert (s1.model_calls, s2.model_calls) == (2, 3)
    run = CaptionSummary()
    run.merge(s1)
    run.merge(s2)
    assert (run.total, run.captioned, run.cached, run.model_calls, run.model_loaded) == (5, 5, 0, 5, True)
    assert run.seconds == s1.seconds + s2.seconds and not run.interrupted


def test_records_carry_model_file_paths_and_hashes_fresh_cached_and_uncached(env) -> None:
    _images(env.tmp / "imgs", 2)
    want = {
        "model_path": str(env.cfg.model.resolve()),
        "model_sha256": hashlib.sha256(env.cfg.model.read_bytes()).hexdigest(),
        "mmproj_path": str(env.cfg.mmproj.resolve()),
        "mmproj_sha256": hashlib.sha256(env.cfg.mmproj.read_bytes()).hexdigest(),
    }
    fresh: list = []
    caption_images([env.tmp / "imgs"], env.cfg, n_variants=1, cache=env.cache, on_record=fresh.append,
                   vlm_factory=env.factory())  # fmt: skip
    uncached: list = []  # no cache: the hashes come from the loaded VLM, from the first image on
    caption_images([env.tmp / "imgs"], env.cfg, n_variants=1, cache=None, on_record=uncached.append,
                   vlm_factory=env.factory())  # fmt: skip
    for r in fresh + uncached:
        assert not r.cached and {k: r.extra[k] for k in want} == want
        assert {k: r.to_dict()[k] for k in want} == want  # written into the JSON record

    # The same bytes under another name: a cache hit names the files as they are now.
    moved = env.tmp / "moved"
    moved.mkdir()
    cfg2 = SimpleNamespace(**{**vars(env.cfg), "model": moved / "m2.gguf", "mmproj": moved / "p2.gguf"})
    cfg2.model.write_bytes(env.cfg.model.read_bytes())
    cfg2.mmproj.write_bytes(env.cfg.mmproj.read_bytes())
    hits: list = []
    s = caption_images([env.tmp / "imgs"], cfg2, n_variants=1, cache=env.cache, on_record=hits.append,
                       vlm_factory=env.factory())  # fmt: skip
    assert s.cached == 2 and not s.model_loaded
    for r in hits:
        assert r.extra["model_path"] == str(cfg2.model.resolve()) and r.extra["mmproj_path"] == str(cfg2.mmproj.resolve())
        assert r.extra["model_sha256"] == want["model_sha256"] and r.extra["mmproj_sha256"] == want["mmproj_sha256"]


def test_changed_settings_or_prompt_miss_the_cache(env) -> None:
    _images(env.tmp / "imgs", 1)
    run = lambda **kw: caption_images([env.tmp / "imgs"], env.cfg, cache=env.cache, vlm_factory=env.factory(), **kw)  # noqa: E731
    assert run(n_variants=2).captioned == 1
    assert run(n_variants=2).cached == 1
    assert run(n_variants=3).captioned == 1
    assert run(n_variants=2, max_tokens=500).captioned == 1
    pf = env.tmp / "prompt.txt"
    pf.write_text("Describe this image {n} times as JSON.")
    assert run(n_variants=2, prompt_file=pf).captioned == 1
    assert run(n_variants=2, prompt_file=pf).cached == 1


def test_bad_files_are_listed_and_the_run_goes_on(env) -> None:
    folder = env.tmp / "mixed"
    good = _images(folder, 2)
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n")
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[:200])
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[:300])
    failures_live: list = []
    out: list = []
    s = caption_images([folder, env.tmp / "missing_dir"], env.cfg, n_variants=1, cache=env.cache,
                       on_record=out.append, callbacks=Callbacks(on_failure=failures_live.append),
                       vlm_factory=env.factory())  # fmt: skip
    assert [r.image for r in out] == [str(p) for p in good]
    assert s.captioned == 2 and s.failed == 5 and s.failures == failures_live
    failed = {Path(f.path).name: f.reason for f in s.failures}
    assert set(failed) == {"zero.jpg", "text.jpg", "cut.jpg", "cut.png", "missing_dir"}
    assert "empty" in failed["zero.jpg"]
    assert all("\n" not in r for r in failed.values())
    assert s.model_calls == 2


def test_unusable_answer_is_retried_once_sampled(env) -> None:
    _images(env.tmp / "imgs", 1)
    factory = env.factory(script=["I cannot see", _answer(2, "retry")])
    out: list = []
    s = caption_images([env.tmp / "imgs"], env.cfg, n_variants=2, cache=env.cache, on_record=out.append,
                       vlm_factory=factory)  # fmt: skip
    assert s.captioned == 1 and s.retries == 1 and s.model_calls == 2
    assert out[0].extra["retried"] is True and "retry" in out[0].variants[0].one_sentence
    temps = [c["temperature"] for c in env.made[0].seen]
    assert temps[0] == 0.0 and temps[1] > 0


def test_still_unusable_after_retry_fails_and_is_not_cached(env) -> None:
    _images(env.tmp / "imgs", 1)
    s = caption_images([env.tmp / "imgs"], env.cfg, n_variants=2, cache=env.cache,
                       vlm_factory=env.factory(script=["{", "nothing"]))  # fmt: skip
    assert s.failed == 1 and s.captioned == 0 and "no usable description" in s.failures[0].reason
    assert len(env.cache) == 0


def test_quality_problems_are_kept_and_noted(env) -> None:
    _images(env.tmp / "imgs", 1)
    one_of_three = _answer(1, "short")
    out: list = []
    s = caption_images([env.tmp / "imgs"], env.cfg, n_variants=3, cache=env.cache, on_record=out.append,
                       vlm_factory=env.factory(script=[one_of_three]))  # fmt: skip
    assert s.captioned == 1 and s.with_problems == 1 and s.retries == 0
    assert out[0].extra["problems"] == ["1 variants instead of 3"]


def test_model_error_on_one_image_fails_that_image(env) -> None:
    _images(env.tmp / "imgs", 2)
    s = caption_images([env.tmp / "imgs"], env.cfg, n_variants=1, cache=env.cache,
                       vlm_factory=env.factory(fail_with=ModelError("m.gguf: context too small")))  # fmt: skip
    assert s.failed == 2 and "context too small" in s.failures[0].reason


def test_family_without_grammar_gets_free_text_path(env) -> None:
    _images(env.tmp / "imgs", 1)
    free = "1. A field with a barn. The barn is in the north.\n2. Farmland. Crops fill the south."
    out: list = []
    caption_images([env.tmp / "imgs"], env.cfg, n_variants=2, cache=None, on_record=out.append,
                   vlm_factory=env.factory(script=[free], supports_grammar=False))  # fmt: skip
    assert env.made[0].seen[0]["schema"] is None
    assert out[0].constrained is False and [v.one_sentence for v in out[0].variants] == [
        "A field with a barn.", "Farmland."]  # fmt: skip


def test_ctrl_c_stops_after_current_image_and_keeps_it(env) -> None:
    _images(env.tmp / "imgs", 4)
    out: list = []

    def on_record(record):
        out.append(record)
        if len(out) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C now

    notices: list = []
    s = caption_images([env.tmp / "imgs"], env.cfg, n_variants=1, cache=env.cache, on_record=on_record,
                       callbacks=Callbacks(on_notice=notices.append), vlm_factory=env.factory())  # fmt: skip
    assert s.interrupted and s.captioned == 1 and len(out) == 1
    assert len(env.cache) == 1 and notices and "Ctrl-C again" in notices[0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


# ---------------------------------------------------------------- the real tiny GGUF test VLM


@pytest.fixture(scope="module")
def test_vlm_cfg():
    hm.require("llama_cpp", "llama-cpp-python is a core dependency: run `make setup`")
    from edge_t2t.describe.testvlm import MMPROJ_FILE, MODEL_FILE, build_test_vlm
    from edge_t2t.describe.vlm import VLMConfig

    out = config.test_vlm_dir()
    build_test_vlm(out)
    return VLMConfig(model=out / MODEL_FILE, mmproj=out / MMPROJ_FILE)


def test_tiny_test_vlm_end_to_end_then_cached(test_vlm_cfg, rsicd_samples: Path, tmp_path: Path) -> None:
    image = rsicd_samples / "square_146.jpg"
    loaded_models: list = []
    out: list = []
    with CaptionCache(tmp_path / "c.sqlite") as cache:
        # max_tokens covers the schema's longest answer even at one character per token.
        kw = {"n_variants": 1, "cache": cache, "max_tokens": 1300}
        s = caption_images([image], test_vlm_cfg, on_record=out.append,
                           callbacks=Callbacks(on_model_loaded=loaded_models.append), **kw)  # fmt: skip
        assert s.failed == 0 and s.captioned == 1 and s.model_calls >= 1 and s.test_model
        (r,) = out
        assert r.test_model is True and r.family == "llava-1.5" and r.constrained
        assert r.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
        assert len(r.variants) == 1
        v = r.variants[0]
        assert 0 < len(v.one_sentence) <= prompts.ONE_SENTENCE_MAX and 0 < len(v.caption) <= prompts.CAPTION_MAX
        assert prompts.FEATURES_MIN <= len(v.features) <= prompts.FEATURES_MAX
        assert all(f.position in prompts.POSITIONS and f.size in prompts.SIZES for f in v.features)
        assert r.extra["model_sha256"] == loaded_models[0].model_sha256

        again: list = []
        s2 = caption_images([image], test_vlm_cfg, on_record=again.append, **kw)
        assert (s2.cached, s2.model_calls, s2.model_loaded) == (1, 0, False)
        assert again[0].test_model is True and again[0].variants == r.variants


def test_no_vlm_config_resolves_from_env(env, monkeypatch: pytest.MonkeyPatch) -> None:
    _images(env.tmp / "imgs", 1)
    monkeypatch.setenv("EDGE_T2T_VLM", str(env.cfg.model))
    monkeypatch.setenv("EDGE_T2T_MMPROJ", str(env.cfg.mmproj))
    s = caption_images([env.tmp / "imgs"], None, n_variants=1, cache=env.cache, vlm_factory=env.factory())
    assert s.captioned == 1 and env.made[0].model_path == env.cfg.model
    monkeypatch.delenv("EDGE_T2T_VLM")
    monkeypatch.delenv("EDGE_T2T_MMPROJ")
    monkeypatch.setenv("EDGE_T2T_MODELS_DIR", str(env.tmp / "no-models"))
    with pytest.raises(ModelError, match="--vlm"):
        caption_images([env.tmp / "imgs"], None, cache=env.cache, vlm_factory=env.factory())


def test_vlm_without_parallel_path_falls_back_to_sequential_and_says_so(env) -> None:
    from edge_t2t.records import CaptionRecord

    _images(env.tmp / "imgs", 1)
    out: list = []
    caption_images([env.tmp / "imgs"], env.cfg, n_variants=2, cache=env.cache, on_record=out.append,
                   vlm_factory=env.factory())  # fmt: skip
    (r,) = out
    assert r.variant_mode == "sequential" and r.tokens_generated == 0
    back = CaptionRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert (back.variant_mode, back.tokens_generated) == ("sequential", 0) and "variant_mode" not in back.extra
