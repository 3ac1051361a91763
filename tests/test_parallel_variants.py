"""Parallel variants: one image encoding, one sequence per variant in one llama.cpp batch.

Runs the real llama.cpp path on the tiny generated test VLM (random weights: the texts are
gibberish, but the grammar, the determinism and the bookkeeping are real)."""

from __future__ import annotations

import json

import helpers_media as hm
import pytest

from edge_t2t.describe import prompts, testvlm
from edge_t2t.describe.captioning import caption_images
from edge_t2t.describe.captions import CaptionCache
from edge_t2t.describe.vlm import VLM, ParallelSettings, VLMConfig
from edge_t2t.errors import ImageError, ModelError

SMALL = hm.BOUNDED_SCHEMA


@pytest.fixture(scope="module")
def images(rsicd_samples) -> list[bytes]:
    return [hm.sample_png(rsicd_samples / n) for n in ("airport_17.jpg", "sparseresidential_268.jpg")]


@pytest.fixture(scope="module")
def model(vlm_dir):
    with VLM(VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE)) as v:
        yield v


def test_each_sequence_follows_its_own_grammar_and_variants_differ(model, images):
    vp = prompts.build_variant_prompts(3)
    res = model.describe_parallel(images[:1], vp.shared, vp.suffixes, json_schema=SMALL, max_tokens=200)
    assert len(res.texts) == 1 and len(res.texts[0]) == 3
    objs = [json.loads(t) for t in res.texts[0]]  # each sequence is one complete, schema-valid object
    for obj in objs:
        assert set(SMALL["required"]) <= set(obj) and obj["size"] in ("small", "medium", "large")
        assert len(obj["one_sentence"]) <= 40 and len(obj["caption"]) <= 60
    assert len(set(res.texts[0])) == 3  # the focus suffixes make the variants differ under greedy decoding
    assert all(0 < n <= 200 for n in res.tokens[0]) and res.gen_tokens == sum(res.tokens[0])
    # One batched decode per step while any sequence goes on: a sequence that stopped itself after n
    # tokens took n steps (its end token is sampled, never decoded), one cut at 200 took 199.
    assert res.gen_steps == max(n if n < 200 else 199 for n in res.tokens[0])


def test_same_inputs_same_texts_and_batch_mates_do_not_change_an_image(model, images):
    vp = prompts.build_variant_prompts(2)
    kw = {"json_schema": SMALL, "max_tokens": 120}
    a = model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw)
    assert model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw).texts == a.texts
    b = model.describe_parallel(images[1:], vp.shared, vp.suffixes, **kw)
    assert b.texts != a.texts  # the answer depends on the image
    both = model.describe_parallel(images, vp.shared, vp.suffixes, **kw)  # two images in one context
    flipped = model.describe_parallel(images[::-1], vp.shared, vp.suffixes, **kw)
    assert both.texts == [a.texts[0], b.texts[0]] and flipped.texts == [b.texts[0], a.texts[0]]
    # each image's prompt (its picture, the shared text, the suffixes) is decoded once, for itself
    assert a.prompt_tokens == b.prompt_tokens and both.prompt_tokens == a.prompt_tokens + b.prompt_tokens


def test_sampled_variants_use_per_variant_seeds(model, images):
    kw = {"json_schema": SMALL, "max_tokens": 120}
    one = model.describe_parallel(images[:1], "Describe the image as JSON.", ["", ""], temperatures=[0.9, 0.9], **kw)
    assert one.texts[0][0] != one.texts[0][1]  # same prompt, seeds seed+0 and seed+1
    again = model.describe_parallel(images[:1], "Describe the image as JSON.", ["", ""], temperatures=0.9, **kw)
    assert again.texts == one.texts


def test_bad_image_bytes_raise_image_error(model):
    with pytest.raises(ImageError):
        model.describe_parallel([b"not an image"], "x", [""], max_tokens=8)
    with pytest.raises(ImageError):
        model.describe_parallel([b""], "x", [""], max_tokens=8)


def test_unknown_variant_mode_is_refused(vlm_dir):
    with pytest.raises(ModelError, match="variant mode"):
        VLM(VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, variant_mode="both"))


def test_pipeline_records_say_which_path_wrote_them(vlm_dir, rsicd_samples, tmp_path):
    image = rsicd_samples / "square_146.jpg"
    records: dict[str, list] = {"parallel": [], "sequential": []}
    with CaptionCache(tmp_path / "c.sqlite") as cache:
        for mode, out in records.items():
            cfg = VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, variant_mode=mode)
            s = caption_images([image], cfg, n_variants=2, cache=cache, max_tokens=2400, on_record=out.append)
            assert s.failed == 0 and s.captioned == 1  # a changed mode is a cache miss
        again: list = []
        cfg = VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, variant_mode="parallel")
        s = caption_images([image], cfg, n_variants=2, cache=cache, max_tokens=2400, on_record=again.append)
        assert s.cached == 1 and again[0].variants == records["parallel"][0].variants
    par, seq = records["parallel"][0], records["sequential"][0]
    assert par.variant_mode == "parallel" and seq.variant_mode == "sequential"
    assert par.to_dict()["variant_mode"] == "parallel" and seq.to_dict()["variant_mode"] == "sequential"
    assert par.tokens_generated and seq.tokens_generated and par.tokens_generated > 0
    assert 1 <= len(par.variants) <= 2 and par.variants != seq.variants
    # Uncached, the parallel path gives the same record again.
    cfg = VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, variant_mode="parallel")
    fresh: list = []
    caption_images([image], cfg, n_variants=2, cache=None, max_tokens=2400, on_record=fresh.append)
    assert fresh[0].variants == par.variants and fresh[0].tokens_generated == par.tokens_generated


@pytest.mark.parametrize("first_chars", [True, False], ids=["first-char pass", "no first-char pass"])
@pytest.mark.parametrize("stages", [(1024,), (8, 64), (64, 256), ()])
def test_grammar_checked_on_the_chosen_token_picks_what_the_full_grammar_pass_picks(
    model, images, monkeypatch, stages, first_chars
):
    """The one-token grammar check, and after a refusal the grammar pass on the best-scoring
    candidates first, then on the tokens whose first character the grammar allows, are speed-ups
    only: under greedy decoding the tokens equal those of llama.cpp's usual chain (penalty, grammar
    over the whole vocabulary, greedy). The tiny model's vocabulary is 1,024 tokens, so small
    stages make the staged pass run (and hit) here, and (1024,) goes straight to the first-character
    pass."""
    import llama_cpp as lc

    from edge_t2t.describe import vlm as vlm_module
    from edge_t2t.describe import vlm_parallel
    from edge_t2t.describe.vlm_sampling import SequenceSampler

    monkeypatch.setattr(SequenceSampler, "STAGES", stages)
    if not first_chars:
        monkeypatch.setattr(vlm_module.VLM, "_first_char_index", lambda self, vocab, n: None)
    hits, fc_hits = [], []
    staged = SequenceSampler._greedy_allowed
    monkeypatch.setattr(SequenceSampler, "_greedy_allowed", lambda self, lg: hits.append(1) or staged(self, lg))
    by_first = SequenceSampler._allowed_first_char_tokens
    monkeypatch.setattr(SequenceSampler, "_allowed_first_char_tokens",
                        lambda self: fc_hits.append(1) or by_first(self))  # fmt: skip

    class FullPass(SequenceSampler):
        def __init__(self, bindings, vocab, n_vocab, gbnf, temperature, seed, first_chars=None):
            super().__init__(bindings, vocab, n_vocab, None, temperature, seed)
            self.reference = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            for smp in (lc.llama_sampler_init_penalties(n_vocab, 64, 1.1, 0.0, 0.0),
                        lc.llama_sampler_init_grammar(vocab, gbnf, b"root"), lc.llama_sampler_init_greedy()):  # fmt: skip
                lc.llama_sampler_chain_add(self.reference, smp)

        def sample(self, ctx, idx, logits=None):  # llama.cpp's own chain reads the logits itself
            return lc.llama_sampler_sample(self.reference, ctx, idx)

        def free(self):
            lc.llama_sampler_free(self.reference)
            super().free()

    vp = prompts.build_variant_prompts(3)
    kw = {"json_schema": prompts.variant_schema(), "max_tokens": 150}
    fast = model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw)
    monkeypatch.setattr(vlm_parallel, "SequenceSampler", FullPass)
    reference = model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw)
    assert fast.texts == reference.texts and fast.tokens == reference.tokens
    assert hits  # the grammar refused some greedy tokens, so the staged pass ran
    if not first_chars:
        assert not fc_hits
    elif stages in ((1024,), ()):  # no stage below the 1,024-token vocabulary: every refusal reaches it
        assert len(fc_hits) == len(hits)


def test_first_character_pass_never_leaves_out_an_allowed_token(model, images, monkeypatch):
    """At every refusal in a generation, each token the grammar allows over the whole vocabulary is
    among the tokens the first-character pass hands on (the property that makes it exact)."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    from edge_t2t.describe.vlm_sampling import SequenceSampler

    monkeypatch.setattr(SequenceSampler, "STAGES", ())
    sizes: list[tuple[int, int]] = []
    by_first = SequenceSampler._allowed_first_char_tokens

    def checked(self):
        ids = by_first(self)
        buf = np.zeros(self.n_vocab, dtype=self.buf.dtype)
        buf["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cur = lc.llama_token_data_array(data=buf.ctypes.data_as(lc.llama_token_data_p), size=self.n_vocab,
                                        selected=-1, sorted=False)  # fmt: skip
        lc.llama_sampler_apply(self.grammar, ctypes.byref(cur))  # masks only; the state is unchanged
        allowed = set(np.flatnonzero(buf["logit"] > -np.inf).tolist())
        assert allowed <= set(ids.tolist())
        sizes.append((len(allowed), len(ids)))
        return ids

    monkeypatch.setattr(SequenceSampler, "_allowed_first_char_tokens", checked)
    vp = prompts.build_variant_prompts(3)
    model.describe_parallel(images[:1], vp.shared, vp.suffixes, json_schema=prompts.variant_schema(), max_tokens=150)
    assert len(sizes) > 20
    # outside free strings the grammar allows few first characters, so most passes look at a part
    assert sum(n for _, n in sizes) < 0.5 * len(sizes) * model._first_chars.n_vocab


def test_utf8_tail_and_first_character():
    from edge_t2t.describe.vlm_sampling import _first_char, utf8_incomplete_tail

    assert utf8_incomplete_tail(b"abc") == b""
    assert utf8_incomplete_tail("é".encode()) == b""
    assert utf8_incomplete_tail(b"ab\xc3") == b"\xc3"
    assert utf8_incomplete_tail(b"a\xe2\x82") == b"\xe2\x82"
    assert utf8_incomplete_tail("€".encode()) == b""
    assert utf8_incomplete_tail(b"\xf0\x9f\x98") == b"\xf0\x9f\x98"
    assert utf8_incomplete_tail(b"") == b""
    assert _first_char(b"north") == "n" and _first_char("éast".encode()) == "é"
    assert _first_char(b"\xe2\x82") is None and _first_char(b"\x82ab") is None


def test_sampling_threads_pick_the_same_tokens(vlm_dir, images, monkeypatch):
    """With more than one thread the sequences' samplers run side by side; each is independent of
    the others, so the texts equal those of the samplers run one after another."""
    from edge_t2t.describe import vlm as vlm_module

    vp = prompts.build_variant_prompts(3)
    kw = {"json_schema": prompts.variant_schema(), "max_tokens": 150}
    with VLM(VLMConfig(vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE, n_threads=2)) as v:
        pooled = v.describe_parallel(images, vp.shared, vp.suffixes, **kw)
        assert v._pool is not None  # the threads were used
        monkeypatch.setattr(vlm_module.VLM, "_sampling_pool", lambda self: None)
        serial = v.describe_parallel(images, vp.shared, vp.suffixes, **kw)
    assert pooled.texts == serial.texts and pooled.tokens == serial.tokens


@pytest.mark.parametrize("settings", [ParallelSettings(kv_unified=False), ParallelSettings(flash_attn=True),
                                      ParallelSettings(kv_unified=False, flash_attn=True)], ids=lambda s: s.key)  # fmt: skip
def test_every_context_setting_is_deterministic_and_follows_the_grammar(model, images, settings):
    """One KV stream per sequence (the prefix copied across streams by seq_cp) and flash attention:
    each variant still a schema-valid object, the same texts on a second call and with a second
    image in the same context (its sequences in streams of their own)."""
    vp = prompts.build_variant_prompts(3)
    kw = {"json_schema": SMALL, "max_tokens": 120}
    before = model.parallel_settings
    model.parallel_settings = settings
    try:
        a = model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw)
        assert model._parallel.settings == settings
        assert model.describe_parallel(images[:1], vp.shared, vp.suffixes, **kw).texts == a.texts
        both = model.describe_parallel(images, vp.shared, vp.suffixes, **kw)
    finally:
        model.parallel_settings = before
    for obj in (json.loads(t) for t in a.texts[0]):
        assert set(SMALL["required"]) <= set(obj)
    assert both.texts[0] == a.texts[0] and len(set(a.texts[0])) == 3


def test_flash_attention_settings_are_in_the_cache_key_and_the_encoder_runs_either_way(vlm_dir, images):
    """The vision encoder's flash attention (on by default) and the text model's (off) reorder the
    attention's sums, so records made with and without them get different cache keys; each
    setting still gives schema-valid, repeatable answers."""
    from edge_t2t.describe.captioning import generation_params

    m, p = vlm_dir / testvlm.MODEL_FILE, vlm_dir / testvlm.MMPROJ_FILE
    kw = {"n_variants": 2, "max_tokens": 100, "temperature": 0.0, "max_megapixels": 4.0, "bands": None}
    default = generation_params(VLMConfig(m, p), **kw)
    assert default["vision_flash_attn"] is True and "flash_attn" not in default
    assert "vision_flash_attn" not in generation_params(VLMConfig(m, p, vision_flash_attn=False), **kw)
    assert generation_params(VLMConfig(m, p, flash_attn=True), **kw)["flash_attn"] is True
    vp = prompts.build_variant_prompts(2)
    for cfg in (VLMConfig(m, p, vision_flash_attn=False), VLMConfig(m, p, flash_attn=True)):
        with VLM(cfg) as v:
            a = v.describe_parallel(images[:1], vp.shared, vp.suffixes, json_schema=SMALL, max_tokens=120)
            assert v.describe_parallel(images[:1], vp.shared, vp.suffixes, json_schema=SMALL, max_tokens=120).texts == a.texts
        assert all(set(SMALL["required"]) <= set(json.loads(t)) for t in a.texts[0])
