"""The checkpoint types: what a checkpoint's own files say (`CheckpointFiles`), what the
driver knows of a resolved checkpoint (`ModelInfo`), how its pixels are preprocessed
(`PreprocessSpec`) and what a run's rows hold (`TaskSpec`).

Types only: `batchscore.checkpoints.models` fills them for every layout (transformers, timm, `.npz`, the
latter two through `batchscore.checkpoints.timm_models`), and the stages that use them (decode, predict)
import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchscore.exceptions import ModelError


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw pixels become the model's input, as the checkpoint defines it.

    Decode applies resize and crop on uint8 pixels; predict applies rescale and normalize on
    the device. `size` is (height, width) or, with `shortest_edge`, the shortest edge only.
    """

    size: tuple[int, int] | None
    shortest_edge: int | None
    interpolation: str
    crop: tuple[int, int] | None
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    crop_offsets: str = "floor"  # centre-crop offsets: floor (transformers) or round (torchvision, timm)

    @property
    def output_hw(self) -> tuple[int, int]:
        """The (height, width) of the uint8 array decode hands to predict."""
        if self.crop:
            return self.crop
        if self.size:
            return self.size
        raise ModelError("preprocessor config: a shortest_edge resize without a crop gives no fixed input size")


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about a checkpoint before any actor loads it."""

    ref: str
    path: str
    name: str
    model_type: str
    weights_sha256: str
    labels: tuple[str, ...]
    multi_label: bool
    preprocess: PreprocessSpec
    cache_key: str | None = None  # content key of a checkpoint fetched from a bucket
    weights_format: str = "safetensors"  # or "pickle", only with allow_pickle; "npz"
    layout: str = "transformers"  # or "timm" (timm's HF folder), "npz" (vision_transformer file)
    architecture: str = ""  # the transformers class, or the timm model name
    has_head: bool = True  # a trained classification head (labels non-empty)
    has_pooler: bool = False  # trained pooler weights (transformers' pooler, an npz's pre_logits);
    # always True for timm folders, whose pre-logits features (timm's own pooling) are the pooler
    hidden_dim: int = 0  # width of the final tokens (cls and mean embeddings)
    pooler_dim: int = 0  # width of the pooler output
    model_args: str = "{}"  # timm: create_model keyword arguments, as JSON
    weights_file: str = "model.safetensors"  # relative to `path`'s folder; the .npz file's name

    @property
    def tag(self) -> str:
        """The `model` column: name and weights hash."""
        return f"{self.name}@sha256:{self.weights_sha256[:16]}"


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint's own files say, read without transformers or torch (`check`)."""

    ref: str
    where: str  # the folder or bucket URI that was looked at
    name: str
    model_type: str
    labels: tuple[str, ...]
    multi_label: bool
    weights: str  # the weights file: model.safetensors, its index, or pytorch_model.bin
    weights_format: str  # "safetensors", or "pickle" (only with allow_pickle), or "npz"
    layout: str = "transformers"  # or "timm", "npz"
    has_head: bool = True  # False: headless (no labels), scored with task embed

    @property
    def headless(self) -> bool:
        return not self.has_head

    def summary(self) -> str:
        labels = f"{len(self.labels)} labels" if self.has_head else "headless (embeddings)"
        layout = "" if self.layout == "transformers" else f", {self.layout}"
        return (f"{self.name} ({self.model_type}{layout}): {labels}, weights {self.weights} "
                f"({self.weights_format}), at {self.where}")


@dataclass(frozen=True)
class TaskSpec:
    """What a run's rows hold: the resolved task and, when it embeds, how the vector is made."""

    task: str  # classify, embed or classify+embed
    pool: str | None = None  # cls, pooler or mean; None when the task does not embed
    normalize: bool = False
    dtype: str = "float32"  # of the embedding column: float32 or float16
    dim: int = 0

    @property
    def classifies(self) -> bool:
        return self.task in ("classify", "classify+embed")

    @property
    def embeds(self) -> bool:
        return self.task in ("embed", "classify+embed")
