"""One config for a D-OOD generation run (what ``oaml generate`` executes) and its runner.

Example YAML (``oaml generate --config gen.yaml``)::

    cood: runs/fmnist/cood
    out: runs/fmnist/dood
    generator: feature_diffusion        # or stable_diffusion
    id_bank: runs/fmnist/id_features    # feature diffusion: trains the model if `model` is absent
    model: runs/fmnist/dood.fdiff.safetensors
    batch_size: 256
    seed: 0
    train: {train_steps: 3000, width: 512, depth: 3}
    feature_diffusion: {strength: 0.5, steps: 50}
    stable_diffusion: {model: /models/sd-v1-4, steps: 50, guidance_scale: 7.5}
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ...config import StrictModel
from ...errors import BankError, ConfigError
from ...utils.io import check_writable
from ..bank import Bank
from .base import _dist_env, generate_bank
from .feature_diffusion import (
    FeatureDiffusionConfig,
    FeatureDiffusionGenerator,
    FeatureDiffusionModel,
    FeatureDiffusionTrainConfig,
    train_feature_diffusion,
)
from .stable_diffusion import StableDiffusionConfig, StableDiffusionGenerator

log = logging.getLogger(__name__)


class GenerateConfig(StrictModel):
    cood: str = Field(..., description="C-OOD bank to generate from")
    out: str = Field(..., description="D-OOD bank to write")
    generator: Literal["feature_diffusion", "stable_diffusion"] = "feature_diffusion"
    batch_size: int = Field(256, gt=0)
    batches_per_shard: int = Field(64, gt=0)
    seed: int = 0
    num_samples: int | None = Field(None, gt=0, description="None: one D-OOD vector per C-OOD vector")
    resume: bool = True
    overwrite: bool = False
    id_bank: str | None = Field(None, description="ID feature bank to train the feature diffusion model on")
    model: str | None = Field(None, description="feature diffusion model file (default: <out>.fdiff.safetensors)")
    train: FeatureDiffusionTrainConfig = Field(default_factory=FeatureDiffusionTrainConfig)
    feature_diffusion: FeatureDiffusionConfig = Field(default_factory=FeatureDiffusionConfig)
    stable_diffusion: StableDiffusionConfig = Field(default_factory=StableDiffusionConfig)


def default_model_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".fdiff.safetensors")


#: How often ranks other than 0 look for the model that rank 0 trains (seconds).
POLL_SECONDS = 5.0

# training settings that do not change the trained model
_RUNTIME_KEYS = {"device", "num_threads", "log_every"}


def _feature_diffusion_model(cfg: GenerateConfig, cood: Bank, progress: bool, rank: int | None = None,
                             world_size: int | None = None) -> FeatureDiffusionModel:
    """Load or train the model.

    An explicit ``model`` file that exists is used as is (``train`` settings are not applied).
    The default file ``<out>.fdiff.safetensors`` is reused only if it was trained on the same
    ID bank with the same ``train`` settings; otherwise the run stops and asks for
    ``--overwrite`` (retrain) rather than silently using a different model.

    Under torchrun (``WORLD_SIZE`` > 1) only rank 0 trains the model; the other ranks wait for its
    file and load it.
    """
    path = Path(cfg.model) if cfg.model else default_model_path(cfg.out)
    rank, world = _dist_env(rank, world_size)
    if world > 1 and cfg.overwrite and path.is_file():
        raise ConfigError(
            f"--overwrite under torchrun cannot retrain the feature diffusion model {path} (the other ranks would "
            "read the old file): delete it, or retrain in one process first"
        )
    if rank != 0 and not path.is_file():
        log.info("rank %d waits for rank 0 to train the feature diffusion model %s", rank, path)
        while not path.is_file():  # written atomically by rank 0
            time.sleep(POLL_SECONDS)
    if path.is_file() and not cfg.overwrite:
        model = FeatureDiffusionModel.load(path)
        trained_on = model.meta.get("id_bank")
        if cfg.id_bank and (trained_on is None or Path(trained_on).resolve() != Path(cfg.id_bank).resolve()):
            raise BankError(
                f"feature diffusion model {path} was trained on {trained_on!r}, not {cfg.id_bank!r}; "
                "pass --overwrite to retrain it or another --model path"
            )
        if cfg.model is None:
            have = {k: v for k, v in model.meta.get("train_config", {}).items() if k not in _RUNTIME_KEYS}
            want = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in _RUNTIME_KEYS}
            if have != want:
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                raise BankError(
                    f"feature diffusion model {path} was trained with other settings ({', '.join(diff)}); pass "
                    "--overwrite to retrain it, or --model to use it as is"
                )
        log.info("using feature diffusion model %s", path)
        return model
    if not cfg.id_bank:
        raise ConfigError(
            f"no feature diffusion model at {path}: pass id_bank (--id-bank) so that one is trained on the ID "
            "features, or model (--model) pointing at a trained one"
        )
    id_bank = Bank.open(cfg.id_bank)
    for key in ("teacher", "dataset"):
        a, b = id_bank.meta.get(key), cood.meta.get(key)
        if a is not None and b is not None and a != b:
            raise BankError(f"ID bank {id_bank.path} has {key}={a!r} but C-OOD bank {cood.path} has {key}={b!r}")
    model = train_feature_diffusion(id_bank, cfg.train, progress=progress)
    model.save(path)
    log.info("trained feature diffusion model in %.1f s (final loss %.4f); saved to %s",
             model.meta["train_seconds"], model.meta["final_loss"], path)
    return FeatureDiffusionModel.load(path)


def run_generate(cfg: GenerateConfig, progress: bool = True) -> Bank:
    """Build the configured generator (training the feature model if needed) and write the D-OOD bank."""
    cood = Bank.open(cfg.cood)
    # before training a model or loading Stable Diffusion: the bank's folder (and the model file's)
    # must be writable with room for at least one output vector per C-OOD row
    rows = cfg.num_samples or len(cood)
    check_writable(cfg.out, need_bytes=rows * (4 * cood.dim + 8))
    model_path = Path(cfg.model) if cfg.model else default_model_path(cfg.out)
    if cfg.generator == "feature_diffusion" and (cfg.overwrite or not model_path.is_file()):
        check_writable(model_path.parent)  # a model will be trained and saved there
    if cfg.generator == "feature_diffusion":
        gen = FeatureDiffusionGenerator(_feature_diffusion_model(cfg, cood, progress), cfg.feature_diffusion)
    else:
        gen = StableDiffusionGenerator(cfg.stable_diffusion)
    return generate_bank(
        gen, cood, cfg.out, batch_size=cfg.batch_size, seed=cfg.seed, resume=cfg.resume, overwrite=cfg.overwrite,
        progress=progress, num_samples=cfg.num_samples, batches_per_shard=cfg.batches_per_shard,
    )
