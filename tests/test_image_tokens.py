"""--image-max-tokens: mtmd's cap on one image's tokens, for tiling projectors that upscale small
images (SmolVLM's idefics3 turns a 224 px RSICD image into 16 tiles + an overview)."""

from __future__ import annotations

import io

import pytest

from edge_t2t.describe import prompts, testvlm
from edge_t2t.describe.captioning import generation_params
from edge_t2t.describe.vlm import VLM, VLMConfig

SHAPE = "tiny-smolvlm"  # idefics3: 32 px tiles of 8 px patches, pixel shuffle x2 (4 tokens a tile), longest edge 64


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol")
    manifest = testvlm.build_shape(SHAPE, out, precisions=("F16",))
    return out / manifest["models"]["F16"], out / manifest["mmproj"]


@pytest.fixture(scope="module")
def image(rsicd_samples) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(rsicd_samples / "airport_17.jpg").convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _prompt_tokens(model, mmproj, image: bytes, cap: int | None) -> tuple[int, list[str]]:
    vp = prompts.build_variant_prompts(2)
    with VLM(VLMConfig(model, mmproj, n_threads=1, image_max_tokens=cap)) as vlm:
        res = vlm.describe_parallel([image], vp.shared, vp.suffixes, json_schema=prompts.variant_schema(), max_tokens=24)
    return res.prompt_tokens, res.texts[0]


def test_cap_cuts_the_tiles_of_an_upscaled_image(smol, image):
    # 224 px -> longest edge 64 -> 2x2 tiles + overview = 5 passes x 4 tokens (plus the tile
    # separators); capped at 4 tokens (1024 px^2) -> 1 tile + overview = 2 passes.
    full, _ = _prompt_tokens(*smol, image, None)
    capped, texts = _prompt_tokens(*smol, image, 4)
    assert full - capped >= 3 * 4, (full, capped)
    assert len(texts) == 2 and all(texts)


def test_cap_reaches_the_sequential_path(smol, image):
    """Both paths share the handler's mtmd context, so the cap applies to generate() too."""
    import llama_cpp

    counts = []
    for cap in (None, 4):
        with VLM(VLMConfig(*smol, n_threads=1, image_max_tokens=cap, variant_mode="sequential")) as vlm:
            vlm.generate(image, "Describe.", max_tokens=4)
            counts.append(int(llama_cpp.llama_perf_context(vlm._llama.ctx).n_p_eval))
    assert counts[0] - counts[1] >= 3 * 4, counts


def test_cap_is_in_the_cache_key_only_when_set(smol):
    kw = {"n_variants": 5, "max_tokens": 100, "temperature": 0.0, "max_megapixels": 4.0, "bands": None}
    plain = generation_params(VLMConfig(*smol), **kw)
    assert "image_max_tokens" not in plain  # existing caches keep their keys
    assert generation_params(VLMConfig(*smol, image_max_tokens=64), **kw)["image_max_tokens"] == 64


def test_cli_refuses_a_cap_below_one(smol, tmp_path, rsicd_samples, capsys):
    from edge_t2t.cli import main

    rc = main(["caption", str(rsicd_samples / "airport_17.jpg"), "--vlm", str(smol[0]), "--mmproj", str(smol[1]),
               "--image-max-tokens", "0", "--no-cache"])  # fmt: skip
    assert rc == 2
    assert "--image-max-tokens" in capsys.readouterr().err
