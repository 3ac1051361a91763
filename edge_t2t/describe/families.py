"""The chat-handler families of GGUF vision-language models, and which family a GGUF pair is.

Plain data and metadata rules, without llama.cpp: the model-file registry (model_files.py) records a
pair's family when it is added, and the adapter (vlm.py) picks the family's chat handler at load.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_check import GGUFInfo


@dataclass(frozen=True)
class Family:
    handler: str  # class name in llama_cpp.llama_chat_format
    supports_grammar: bool  # whether response_format / a JSON grammar reaches the sampler
    image_tokens: int  # context one image may take (upper estimate for tiling models)
    note: str = ""


FAMILIES: dict[str, Family] = {
    "llava-1.5": Family("Llava15ChatHandler", True, 576, "LLaVA-1.5 7B/13B, vicuna prompt"),
    "llava-1.6": Family("Llava16ChatHandler", True, 2880, "LLaVA-NeXT: up to 4 tiles + overview"),
    "bakllava": Family("Llava15ChatHandler", True, 576, "BakLLaVA-1 (Mistral + LLaVA-1.5 projector)"),
    "obsidian": Family("ObsidianChatHandler", True, 576, "Nous Obsidian 3B (ChatML with ###)"),
    "moondream2": Family("MoondreamChatHandler", True, 729, "moondream2 (SigLIP 378px)"),
    "nanollava": Family("NanoLlavaChatHandler", True, 729, "nanoLLaVA (Qwen1.5 0.5B + SigLIP)"),
    "minicpm-v-2.6": Family("MiniCPMv26ChatHandler", True, 640, "MiniCPM-V 2.6 (64 tokens/slice)"),
    "qwen2.5-vl": Family("Qwen25VLChatHandler", True, 1296, "Qwen2.5-VL (dynamic resolution)"),
    "mtmd": Family("MTMDChatHandler", True, 1024, "generic libmtmd, prompt from the GGUF chat template"),
}


def infer_family(model_info: GGUFInfo, mmproj_info: GGUFInfo) -> str:
    """Pick a chat-handler family from GGUF metadata; "mtmd" (the GGUF's own template) if unsure."""
    md = {**mmproj_info.metadata, **model_info.metadata}
    text = " ".join(
        str(md.get(k) or "")
        for k in ("general.name", "general.basename", "general.finetune", "general.base_model.0.name")
    )
    text = f"{text} {model_info.name} {mmproj_info.name} {model_info.path.name} {mmproj_info.path.name}".lower()
    proj = mmproj_info.projector_type or ""
    if model_info.is_test_model:  # shape-true and per-family test models name their family
        return str(md.get("edge_t2t.family") or "llava-1.5")
    if proj == "resampler":
        return "minicpm-v-2.6" if mmproj_info.minicpmv_version in (None, 3) else "mtmd"
    if proj == "qwen2.5vl_merger" or "qwen2.5-vl" in text or "qwen2_5_vl" in text:
        return "qwen2.5-vl"
    if "moondream" in text:
        return "moondream2"
    if "nanollava" in text:
        return "nanollava"
    if "bakllava" in text:
        return "bakllava"
    if "obsidian" in text:
        return "obsidian"
    tiled = "clip.vision.image_grid_pinpoints" in md or md.get("clip.vision.mm_patch_merge_type") == "spatial_unpad"
    if tiled or any(k in text for k in ("llava-v1.6", "llava-1.6", "llava-next", "llava_next")):
        return "llava-1.6"
    if proj in ("mlp", "mlp_norm", "ldp", "ldpv2") and ("llava" in text or not model_info.chat_template):
        return "llava-1.5"
    return "mtmd"
