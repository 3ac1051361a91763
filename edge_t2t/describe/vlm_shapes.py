"""The architectures of real vision-language models, as llama.cpp runs them, for random-weight
benchmark models (see testvlm.build_shape).

Speed does not depend on the weights' values: a GGUF pair with a real model's tensor shapes and
hyper-parameters, filled with seeded random values, runs at that model's speed. The numbers below
come from /work/shared/data/vlm/vlm_shapes.json (public model configs and llama.cpp's converters;
each shape names its model card), checked against the llama.cpp that llama-cpp-python 0.3.36
vendors: tensor names from src/models/<arch>.cpp and tools/mtmd/clip.cpp (load_tensors), GGUF
keys from src/llama-arch.cpp and tools/mtmd/clip-impl.h, projector strings from clip-impl.h
(PROJECTOR_TYPE_NAMES). tests/test_shapes.py compares them with ../shared when it is present.

The TINY_FAMILIES shapes keep each family's architecture and projector type but shrink every
width, so the tests can run each family's real chat handler in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Vision normalisation constants (clip.vision.image_mean/std): OpenAI CLIP's, and SigLIP's 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TextArch:
    """A llama.cpp text model: general.architecture and the hyper-parameters its loader reads."""

    arch: str  # llama | qwen2 | qwen2vl | phi2 | gemma3 | stablelm
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    head_dim: int = 0  # 0: n_embd // n_head
    rope_theta: float = 10000.0
    rope_dims: int = 0  # 0: head_dim (phi2 and stablelm rotate only part of each head)
    n_ctx_train: int = 4096
    tied_output: bool = False  # output head shares token_embd (Qwen2.5-VL-3B, Gemma 3)
    sliding_window: int = 0  # gemma3: local layers' window
    rope_theta_swa: float = 0.0
    rope_linear_scale: float = 0.0  # gemma3 4B: linear x8 on the global layers
    rope_sections: tuple[int, ...] = ()  # qwen2vl M-RoPE

    @property
    def hd(self) -> int:
        return self.head_dim or self.n_embd // self.n_head


@dataclass(frozen=True)
class VisionArch:
    """A clip.cpp vision tower + projector (the mmproj GGUF)."""

    projector: str  # clip.projector_type: mlp | idefics3 | qwen2.5vl_merger | gemma3 | resampler
    image_size: int
    patch_size: int
    n_layer: int  # clip.vision.block_count as the real mmproj stores it
    n_embd: int
    n_ff: int
    n_head: int
    class_embedding: bool = False  # OpenAI CLIP (LLaVA) has one and a pre-layernorm; SigLIP has neither
    use_gelu: bool = True  # False: quick-GELU (CLIP); ignored when use_silu
    use_silu: bool = False  # Qwen2.5-VL's SwiGLU
    mlp_hidden: int = 0  # mlp projector: width of mm.0 (0: the text width)
    scale_factor: int = 0  # idefics3 pixel shuffle / gemma3 average pool (clip.vision.projector.scale_factor)
    preproc_image_size: int = 0  # idefics3: longest edge before tiling
    n_wa_pattern: int = 0  # qwen2.5vl: every n-th block has full attention
    window_size: int = 0
    minicpmv_version: int = 0
    query_num: int = 0
    pinpoints: tuple[int, ...] = ()  # llava-1.6 (anyres) grid candidates, as w,h pairs
    mean: tuple[float, ...] = SIGLIP_MEAN
    std: tuple[float, ...] = SIGLIP_STD


@dataclass(frozen=True)
class Shape:
    name: str
    model_card: str  # the real model whose shapes these are
    family: str  # edge-t2t --family (chat handler)
    text: TextArch
    vision: VisionArch
    chat_template: str
    eos: str = "</s>"  # end-of-turn token text
    specials: tuple[str, ...] = ()  # control tokens the chat format and libmtmd look up
    image_tokens: str = ""  # what one image costs in the context, as llama.cpp runs it
    notes: str = ""
    tiny: bool = False  # a family-test model, not shape-true
    sources: tuple[str, ...] = field(default=(), repr=False)


# ---- chat templates (tokenizer.chat_template), simplified to the parts the handlers use --------
# Each takes string content or a list of parts (MTMDChatHandler passes parts with the media
# marker already in place of the image).

def _content(prefix: str = "") -> str:
    return (
        "{% if message['content'] is string %}" + prefix + "{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
        + prefix + "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )


CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _content() + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOLVLM = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: " + _content()
    + "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{% if message['role'] == 'assistant' %}model{% else %}user{% endif %}\n" + _content()
    + "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
VICUNA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}" + _content() + "\n"
    "{% elif message['role'] == 'user' %}USER: " + _content() + "\n"
    "{% else %}ASSISTANT: " + _content() + "{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
MOONDREAM = (
    "{% for message in messages %}{% if message['role'] == 'user' %}\n\nQuestion: " + _content()
    + "{% else %}\n\nAnswer: " + _content() + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n\nAnswer:{% endif %}"
)

CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
QWEN_VL_SPECIALS = CHATML_SPECIALS + ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
MINICPM_SPECIALS = CHATML_SPECIALS + ("<image>", "</image>", "<slice>", "</slice>")
SMOLVLM_SPECIALS = ("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
)
GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")

_SIGLIP_SO400M = {"n_embd": 1152, "n_ff": 4304, "n_head": 16}

SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "smolvlm-256m",
            "HuggingFaceTB/SmolVLM-256M-Instruct (GGUF: ggml-org/SmolVLM-256M-Instruct-GGUF)",
            "mtmd",
            TextArch("llama", 30, 576, 1536, 9, 3, 49280, rope_theta=100000.0, n_ctx_train=8192),
            VisionArch("idefics3", 512, 16, 12, 768, 3072, 12, scale_factor=4, preproc_image_size=2048),
            SMOLVLM, eos="<end_of_utterance>", specials=SMOLVLM_SPECIALS,
            image_tokens="64 per 512-px tile; up to 16 tiles + overview = 1088",
            notes="SigLIP-B/16-512 + pixel shuffle x4 (idefics3), SmolLM2-135M-shaped decoder",
        ),
        Shape(
            "smolvlm-500m",
            "HuggingFaceTB/SmolVLM-500M-Instruct (GGUF: ggml-org/SmolVLM-500M-Instruct-GGUF)",
            "mtmd",
            TextArch("llama", 32, 960, 2560, 15, 5, 49280, rope_theta=100000.0, n_ctx_train=8192),
            VisionArch("idefics3", 512, 16, 12, 768, 3072, 12, scale_factor=4, preproc_image_size=2048),
            SMOLVLM, eos="<end_of_utterance>", specials=SMOLVLM_SPECIALS,
            image_tokens="64 per 512-px tile; up to 16 tiles + overview = 1088",
            notes="SigLIP-B/16-512 + pixel shuffle x4 (idefics3), SmolLM2-360M-shaped decoder",
        ),
        Shape(
            "nanollava-1.5",
            "qnguyen3/nanoLLaVA-1.5 (GGUF: bee-kake/nanollava-1.5-gguf)",
            "nanollava",
            TextArch("qwen2", 24, 1024, 2816, 16, 16, 151936, rope_theta=1e6, n_ctx_train=32768),
            # 27 SigLIP blocks + a duplicate (block_count 28): clip.cpp's llava graph runs n-1.
            VisionArch("mlp", 378, 14, 28, **_SIGLIP_SO400M),
            CHATML, eos="<|im_end|>", specials=CHATML_SPECIALS,
            image_tokens="729 (27x27, fixed 378 px)",
            notes="SigLIP-so400m/14 + mlp2x_gelu, Qwen1.5-0.5B-shaped decoder",
        ),
        Shape(
            "moondream2",
            "vikhyatk/moondream2 (GGUF: moondream2-text-model-f16.gguf + moondream2-mmproj-f16.gguf)",
            "moondream2",
            TextArch("phi2", 24, 2048, 8192, 32, 32, 51200, rope_dims=32, n_ctx_train=2048),
            # mm.0 width 8192 is inferred from the 910 MB F16 mmproj (vlm_shapes.json)
            VisionArch("mlp", 378, 14, 28, mlp_hidden=8192, **_SIGLIP_SO400M),
            MOONDREAM, eos="<|endoftext|>", specials=("<|endoftext|>",),
            image_tokens="729 (27x27, fixed 378 px)",
            notes="SigLIP-so400m-style ViT + 2-layer MLP, Phi-1.5-sized decoder run by llama.cpp's phi2 graph",
        ),
        Shape(
            "qwen2.5-vl-3b",
            "Qwen/Qwen2.5-VL-3B-Instruct (GGUF: ggml-org/Qwen2.5-VL-3B-Instruct-GGUF)",
            "qwen2.5-vl",
            TextArch("qwen2vl", 36, 2048, 11008, 16, 2, 151936, head_dim=128, rope_theta=1e6, n_ctx_train=128000,
                     tied_output=True, rope_sections=(16, 24, 24, 0)),
            VisionArch("qwen2.5vl_merger", 560, 14, 32, 1280, 3420, 16, use_silu=True, n_wa_pattern=8,
                       window_size=112, mean=CLIP_MEAN, std=CLIP_STD),
            CHATML, eos="<|im_end|>", specials=QWEN_VL_SPECIALS,
            image_tokens="dynamic: (W/28)*(H/28), 8..4096; a 224 px image is 64",
            notes="Qwen2.5-VL ViT (window attention, 2x2 merger), M-RoPE decoder",
        ),
        Shape(
            "gemma-3-4b",
            "google/gemma-3-4b-it (GGUF: ggml-org/gemma-3-4b-it-GGUF)",
            "mtmd",
            TextArch("gemma3", 34, 2560, 10240, 8, 4, 262144, head_dim=256, rope_theta=1e6, n_ctx_train=131072,
                     tied_output=True, sliding_window=1024, rope_theta_swa=10000.0, rope_linear_scale=8.0),
            VisionArch("gemma3", 896, 14, 27, scale_factor=4, **_SIGLIP_SO400M),
            GEMMA3, eos="<end_of_turn>", specials=GEMMA3_SPECIALS,
            image_tokens="256 (64x64 patches pooled 4x4, fixed 896 px)",
            notes="SigLIP-so400m/14 at 896 px + avg-pool projector, Gemma 3 decoder with 5:1 sliding-window layers",
        ),
        Shape(
            "llava-1.5-7b",
            "liuhaotian/llava-v1.5-7b (GGUF: mys/ggml_llava-v1.5-7b, second-state/Llava-v1.5-7B-GGUF)",
            "llava-1.5",
            TextArch("llama", 32, 4096, 11008, 32, 32, 32000, n_ctx_train=4096),
            # 23 CLIP blocks stored (the legacy converter drops the last); llama.cpp runs 22.
            VisionArch("mlp", 336, 14, 23, 1024, 4096, 16, class_embedding=True, use_gelu=False,
                       mean=CLIP_MEAN, std=CLIP_STD),
            VICUNA, image_tokens="576 (24x24, fixed 336 px)",
            notes="CLIP ViT-L/14-336 + mlp2x_gelu, Vicuna-7B (Llama-2) decoder",
        ),
        Shape(
            "minicpm-v-2.6",
            "openbmb/MiniCPM-V-2_6 (GGUF: openbmb/MiniCPM-V-2_6-gguf)",
            "minicpm-v-2.6",
            TextArch("qwen2", 28, 3584, 18944, 28, 4, 151666, rope_theta=1e6, n_ctx_train=32768),
            VisionArch("resampler", 448, 14, 27, minicpmv_version=3, query_num=64, **_SIGLIP_SO400M),
            CHATML, eos="<|im_end|>", specials=MINICPM_SPECIALS,
            image_tokens="64 per slice; overview + up to 9 slices = 640",
            notes="SigLIP-400M + perceiver resampler (64 queries), Qwen2-7B decoder",
        ),
    )
}

# ---- tiny per-family models: each family's architecture and projector, every width shrunk ----

_TINY_TEXT = {"n_layer": 2, "n_embd": 256, "n_ff": 512, "n_head": 4, "n_head_kv": 4, "n_vocab": 1024, "n_ctx_train": 4096}
_TINY_VISION = {"n_layer": 2, "n_embd": 64, "n_ff": 128, "n_head": 4}


def _tiny(name: str, family: str, base: Shape, text: dict | None = None, vision: dict | None = None,
          card: str = "", template: str | None = None, eos: str | None = None, specials: tuple[str, ...] | None = None,
          notes: str = "") -> Shape:
    t = replace(base.text, **{**_TINY_TEXT, "head_dim": 0, **(text or {})})
    v = replace(base.vision, **{**_TINY_VISION, "mlp_hidden": 0, **(vision or {})})
    return Shape(name, card or base.model_card, family, t, v, template or base.chat_template,
                 eos=eos or base.eos, specials=base.specials if specials is None else specials,
                 notes=notes or f"tiny {t.arch} + {v.projector} projector (family test)", tiny=True)


_LLAVA = SHAPES["llava-1.5-7b"]
TINY_FAMILIES: dict[str, Shape] = {
    s.family if s.family != "mtmd" else f"mtmd:{s.text.arch}": s
    for s in (
        _tiny("tiny-llava-1.5", "llava-1.5", _LLAVA, vision={"image_size": 112}),
        _tiny("tiny-llava-1.6", "llava-1.6", _LLAVA, card="liuhaotian/llava-v1.6-vicuna-7b (anyres grid)",
              vision={"image_size": 112, "pinpoints": (112, 224, 224, 112, 224, 224)}),
        # BakLLaVA-1: Mistral-7B (llama architecture, grouped-query attention) + LLaVA-1.5 projector.
        _tiny("tiny-bakllava", "bakllava", _LLAVA, card="SkunkworksAI/BakLLaVA-1 (Mistral-7B + CLIP ViT-L/14)",
              text={"n_head_kv": 2}, vision={"image_size": 112}),
        # Obsidian-3B: StableLM-3B-4E1T decoder (layernorm, partial RoPE) + LLaVA-1.5 projector.
        _tiny("tiny-obsidian", "obsidian", _LLAVA, card="NousResearch/Obsidian-3B-V0.5 (StableLM-3B + CLIP ViT-L/14)",
              text={"arch": "stablelm", "rope_dims": 16}, vision={"image_size": 112}, template=CHATML,
              eos="<|im_end|>", specials=CHATML_SPECIALS),
        _tiny("tiny-moondream2", "moondream2", SHAPES["moondream2"], text={"rope_dims": 32}, vision={"image_size": 112}),
        _tiny("tiny-nanollava", "nanollava", SHAPES["nanollava-1.5"], vision={"image_size": 112}),
        _tiny("tiny-minicpm-v-2.6", "minicpm-v-2.6", SHAPES["minicpm-v-2.6"], vision={"image_size": 56}),
        # M-RoPE sections must add up to half a head (64 / 2)
        _tiny("tiny-qwen2.5-vl", "qwen2.5-vl", SHAPES["qwen2.5-vl-3b"],
              text={"n_head_kv": 2, "head_dim": 64, "rope_sections": (8, 12, 12, 0)},
              vision={"image_size": 112, "n_wa_pattern": 2}),
        # generic libmtmd handler, prompt from the GGUF's own chat template: SmolVLM and Gemma 3
        _tiny("tiny-smolvlm", "mtmd", SHAPES["smolvlm-256m"], vision={"image_size": 32, "patch_size": 8,
              "scale_factor": 2, "preproc_image_size": 64}),
        _tiny("tiny-gemma3", "mtmd", SHAPES["gemma-3-4b"], text={"head_dim": 64, "n_head_kv": 2, "sliding_window": 64},
              vision={"image_size": 56, "scale_factor": 2}),
    )
}


def get_shape(name: str) -> Shape:
    """A shape by name: a real model's (SHAPES) or a tiny family model (tiny-<family>)."""
    if name in SHAPES:
        return SHAPES[name]
    for s in TINY_FAMILIES.values():
        if s.name == name:
            return s
    from ..errors import InputError

    known = ", ".join([*SHAPES, *(s.name for s in TINY_FAMILIES.values())])
    raise InputError(f"unknown shape {name!r}; choose one of: {known} (or `--shape list`)")
