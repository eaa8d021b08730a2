"""D-OOD generators: one interface (:class:`Generator`), a registry, and the bank driver.

``feature_diffusion`` is imported eagerly (torch + diffusers schedulers only); the Stable
Diffusion generator is registered when :mod:`.stable_diffusion` is imported (done here too;
it imports ``diffusers``/``transformers`` lazily inside its functions).
"""

from .base import GENERATORS, Generator, batch_seed, generate_bank, rank_batches, select_rows
from .feature_diffusion import (
    FeatureDiffusionConfig,
    FeatureDiffusionGenerator,
    FeatureDiffusionModel,
    FeatureDiffusionTrainConfig,
    train_feature_diffusion,
)
from .stable_diffusion import StableDiffusionConfig, StableDiffusionGenerator

__all__ = [
    "GENERATORS",
    "Generator",
    "batch_seed",
    "generate_bank",
    "rank_batches",
    "select_rows",
    "FeatureDiffusionConfig",
    "FeatureDiffusionGenerator",
    "FeatureDiffusionModel",
    "FeatureDiffusionTrainConfig",
    "train_feature_diffusion",
    "StableDiffusionConfig",
    "StableDiffusionGenerator",
]
