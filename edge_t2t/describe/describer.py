"""The describe stage's interface: one image in, one CaptionRecord out.

`Describer` is what the caption pipeline asks of anything that writes descriptions. The VLM
implements it through `VLMDescriber` (a loaded edge_t2t.describe.vlm.VLM plus the hashes of its files);
the synthetic scenes' ground truth implements it through `scenes.GroundTruthDescriber`, so tests
can run the pipeline with exact, known descriptions. Options travel as one CaptionOptions
(captioning.py), the image as one ImageInput (the PNG the model sees and its facts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..records import CaptionRecord
    from .captioning import CaptionOptions, ImageInput


@runtime_checkable
class Describer(Protocol):
    def describe(self, image: ImageInput, options: CaptionOptions) -> CaptionRecord:
        """Describe one image; raises captioning.UnusableAnswer when no usable variant came back."""
        ...


@dataclass
class VLMDescriber:
    """A loaded VLM as a Describer: generate (one sampled retry), parse, check, build the record,
    with the model files' paths and hashes recorded (verify checks them later)."""

    vlm: Any  # edge_t2t.describe.vlm.VLM, or a stand-in with the same methods (tests)
    model_sha: str
    mmproj_sha: str
    model_files: tuple[Path | str, Path | str]

    def describe(self, image: ImageInput, options: CaptionOptions) -> CaptionRecord:
        from .captioning import describe_image

        return describe_image(self.vlm, image, options, model_sha=self.model_sha, mmproj_sha=self.mmproj_sha,
                              model_files=self.model_files)  # fmt: skip
