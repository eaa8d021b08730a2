"""Stable Diffusion generator (the paper's D-OOD): C-OOD vectors as a text-token embedding.

Conditioning
    A placeholder token (default ``<oaml-outlier>``) is added to the CLIP tokenizer and the text
    encoder's embedding table is resized for it. The prompt template (default
    ``"a photo of a {}"``) is filled with the placeholder. For a batch of C-OOD vectors, the
    text encoder runs once on the batch with a forward hook on its token-embedding layer that
    replaces, for sample ``b``, the placeholder position's input embedding by
    ``v_b / ||v_b|| * r``, where ``r`` is the mean L2 norm of the original token-embedding
    matrix (``embedding_norm="mean"``; a float sets ``r`` directly; ``"none"`` keeps ``v_b``
    as is). No weights are changed. The vector width must equal the token-embedding width
    (768 for SD 1.x). The resulting ``prompt_embeds`` (and ``negative_prompt_embeds`` from the
    negative prompt, default ``""``) are passed to the ``diffusers`` pipeline, so every sample
    of a batch has its own conditioning. This is the authors' injection (they overwrote the
    first BPE token of a class name in the embedding table, one vector per batch) done per
    sample and without touching the model.

Sampling and what is kept
    Scheduler ``pndm`` (PLMS, SD's default, ``skip_prk_steps``) or ``ddim``; ``steps`` (50),
    ``guidance_scale`` (7.5), ``resolution`` (512), seeded initial noise. ``capture="final"``
    keeps the final latent (before VAE decoding, in SD's scaled latent space: 4x64x64 -> 16384-d
    at 512 px, as the authors kept); ``capture="step"`` keeps the latent after denoising step
    ``capture_step`` (1-based; read with ``callback_on_step_end``, the remaining steps are
    skipped). ``pool`` (optional) adaptive-average-pools the 4xHxW latent to 4 x pool x pool
    before flattening, for a smaller MI-estimator input.

Weights
    ``model`` is a local diffusers folder or a Hugging Face id already in the local cache
    (``local_files_only=True``); nothing is downloaded. Tests and offline users can build a
    pipeline themselves and pass it with :meth:`StableDiffusionGenerator.from_pipeline`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ...config import StrictModel
from ...errors import ConfigError, NonFiniteError, OamlError, ShapeError
from ...utils.device import resolve_device
from .base import GENERATORS, Generator

log = logging.getLogger(__name__)


class StableDiffusionConfig(StrictModel):
    """Settings of the Stable Diffusion D-OOD generator (defaults: the authors' run)."""

    model: str = Field("CompVis/stable-diffusion-v1-4", description="local diffusers folder or cached HF id")
    revision: str | None = None
    variant: str | None = Field(None, description="weights variant, e.g. 'fp16'")
    scheduler: Literal["pndm", "ddim"] = "pndm"
    steps: int = Field(50, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    resolution: int = Field(512, gt=0)
    prompt_template: str = "a photo of a {}"
    negative_prompt: str = ""
    placeholder_token: str = "<oaml-outlier>"
    embedding_norm: Literal["mean", "none"] | float = "mean"
    capture: Literal["final", "step"] = "final"
    capture_step: int | None = Field(None, gt=0, description="1-based denoising step whose output is kept")
    pool: int | None = Field(None, gt=0, description="adaptive-avg-pool the latent to pool x pool")
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "auto"
    device: str = "auto"


class StableDiffusionGenerator(Generator):
    """D-OOD by Stable Diffusion conditioned on C-OOD vectors through a placeholder token."""

    name = "stable_diffusion"

    def __init__(self, cfg: StableDiffusionConfig | None = None, pipeline: Any = None):
        self.cfg = cfg or StableDiffusionConfig()
        self._check_cfg()
        self.device = resolve_device(self.cfg.device)
        if pipeline is None:
            pipeline = self._load_pipeline()
        self.pipe = pipeline
        self._setup()

    @classmethod
    def from_pipeline(cls, pipeline: Any, cfg: StableDiffusionConfig | None = None) -> "StableDiffusionGenerator":
        """Wrap an already built ``StableDiffusionPipeline`` (any SD 1.x-style components)."""
        return cls(cfg, pipeline=pipeline)

    # --- setup ------------------------------------------------------------------------------
    def _check_cfg(self) -> None:
        c = self.cfg
        if "{}" not in c.prompt_template:
            raise ConfigError(f"prompt_template must contain '{{}}' for the outlier token, got {c.prompt_template!r}")
        if c.capture == "step":
            if c.capture_step is None:
                raise ConfigError("capture='step' needs capture_step (1-based denoising step)")
            if c.capture_step > c.steps:
                raise ConfigError(f"capture_step={c.capture_step} is beyond steps={c.steps}")
        elif c.capture_step is not None:
            raise ConfigError("capture_step is only used with capture='step'")

    def _dtype(self) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.cfg.dtype)

    def _load_pipeline(self) -> Any:
        from diffusers import StableDiffusionPipeline

        kwargs: dict[str, Any] = dict(local_files_only=True, torch_dtype=self._dtype(), safety_checker=None,
                                      requires_safety_checker=False)
        if self.cfg.revision:
            kwargs["revision"] = self.cfg.revision
        if self.cfg.variant:
            kwargs["variant"] = self.cfg.variant
        try:
            with warnings.catch_warnings():  # diffusers >= 0.40 renames torch_dtype; older ones need it
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                return StableDiffusionPipeline.from_pretrained(self.cfg.model, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise OamlError(
                f"cannot load Stable Diffusion weights {self.cfg.model!r} offline ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Provide an SD 1.x pipeline in diffusers "
                "format: either a local folder (with model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                "scheduler/) as `model`, or a Hugging Face id already downloaded into the local cache "
                "(HF_HOME); nothing is downloaded. Without SD weights use generator 'feature_diffusion'."
            ) from None

    def _setup(self) -> None:
        from diffusers import DDIMScheduler, PNDMScheduler

        pipe = self.pipe
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.cfg.scheduler == "pndm":
            pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
        else:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        tok, enc = pipe.tokenizer, pipe.text_encoder
        emb = enc.get_input_embeddings()
        with torch.no_grad():
            base_norm = emb.weight.float().norm(dim=-1).mean().item()
        if self.cfg.placeholder_token not in tok.get_vocab():
            n_added = tok.add_tokens([self.cfg.placeholder_token])
            if n_added != 1:
                raise ConfigError(f"could not add placeholder token {self.cfg.placeholder_token!r} to the tokenizer")
        self.token_id = tok.convert_tokens_to_ids(self.cfg.placeholder_token)
        if self.token_id >= emb.num_embeddings:
            enc.resize_token_embeddings(len(tok), mean_resizing=False)
        self.embed_dim = int(enc.get_input_embeddings().weight.shape[1])
        if self.cfg.embedding_norm == "mean":
            self.target_norm: float | None = base_norm
        elif self.cfg.embedding_norm == "none":
            self.target_norm = None
        else:
            self.target_norm = float(self.cfg.embedding_norm)
        prompt = self.cfg.prompt_template.format(self.cfg.placeholder_token)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        n_ph = int((ids == self.token_id).sum())
        if n_ph != 1:
            raise ConfigError(f"prompt {prompt!r} must contain the placeholder token exactly once after "
                              f"tokenisation (found {n_ph}; is the prompt longer than {tok.model_max_length} tokens?)")
        self.prompt_ids = ids.to(self.device)
        neg = tok(self.cfg.negative_prompt, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            self.negative_embeds = enc(neg.to(self.device))[0]
        self.vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        self.latent_channels = int(pipe.unet.config.in_channels)
        if self.cfg.resolution % self.vae_scale:
            raise ConfigError(f"resolution {self.cfg.resolution} must be a multiple of the VAE factor {self.vae_scale}")

    # --- conditioning -----------------------------------------------------------------------
    def _scaled(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.ndim != 2 or vectors.shape[1] != self.embed_dim:
            raise ShapeError(
                f"C-OOD vectors of width {vectors.shape[-1]} cannot be a token embedding of this text encoder "
                f"(width {self.embed_dim}; 768 for SD 1.x). Sample C-OOD in a {self.embed_dim}-d teacher space "
                "(e.g. ViT-B/16) or use generator 'feature_diffusion'"
            )
        v = vectors.float()
        if self.target_norm is not None:
            v = F.normalize(v, dim=-1) * self.target_norm
        return v

    @contextlib.contextmanager
    def _inject(self, vectors: torch.Tensor) -> Iterator[None]:
        emb_layer = self.pipe.text_encoder.get_input_embeddings()
        token_id = self.token_id

        def hook(module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            (ids,) = inputs[:1]
            mask = ids == token_id
            if mask.sum(dim=1).ne(1).any() or ids.shape[0] != vectors.shape[0]:
                raise ShapeError("placeholder injection expects one placeholder per prompt and one vector per prompt")
            out = output.clone()
            out[mask] = vectors.to(out.dtype)
            return out

        handle = emb_layer.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def encode(self, cood_vectors: torch.Tensor) -> torch.Tensor:
        """``prompt_embeds`` (B, L, width) for the prompt with each vector as the placeholder's embedding."""
        v = self._scaled(cood_vectors.to(self.device))
        ids = self.prompt_ids.expand(v.shape[0], -1)
        with self._inject(v):
            out = self.pipe.text_encoder(ids)[0]
        return out

    # --- generator interface ----------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.cfg.resolution // self.vae_scale
        return (self.latent_channels, side, side)

    def output_dim(self, input_dim: int) -> int:
        if input_dim != self.embed_dim:
            self._scaled(torch.zeros(1, input_dim))  # raises the ShapeError with the explanation
        c, h, w = self.latent_shape()
        if self.cfg.pool:
            return c * self.cfg.pool * self.cfg.pool
        return c * h * w

    def settings(self) -> dict[str, Any]:
        import diffusers
        import transformers

        name_or_path = getattr(self.pipe, "name_or_path", None) or self.pipe.config.get("_name_or_path")
        return {
            "config": self.cfg.model_dump(mode="json"),
            "pipeline": str(name_or_path) if name_or_path else None,
            "target_norm": self.target_norm,
            "embed_dim": self.embed_dim,
            "latent_shape": list(self.latent_shape()),
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        }

    @torch.no_grad()
    def latents(self, cood_vectors: torch.Tensor, seed: int) -> torch.Tensor:
        """Captured latents (B, C, H, W) for the given C-OOD vectors (before pooling)."""
        prompt_embeds = self.encode(cood_vectors)
        b = prompt_embeds.shape[0]
        neg = self.negative_embeds.expand(b, -1, -1)
        captured: dict[str, torch.Tensor] = {}
        callback = None
        if self.cfg.capture == "step":
            want = int(self.cfg.capture_step) - 1

            def callback(pipe: Any, i: int, t: Any, kw: dict) -> dict:
                if i == want:
                    captured["latents"] = kw["latents"].detach().clone()
                    pipe._interrupt = True  # documented diffusers way to skip the remaining steps
                return kw

        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        dtype = self.pipe.unet.dtype
        out = self.pipe(
            prompt_embeds=prompt_embeds.to(dtype),
            negative_prompt_embeds=neg.to(dtype),
            num_inference_steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance_scale,
            height=self.cfg.resolution,
            width=self.cfg.resolution,
            generator=gen,
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        if self.cfg.capture == "step":
            if "latents" not in captured:
                raise OamlError(f"denoising step {self.cfg.capture_step} was never reached")
            return captured["latents"].float()
        return out.images.float()

    def generate(self, cood_vectors: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        lat = self.latents(cood_vectors, seed)
        if self.cfg.pool:
            lat = F.adaptive_avg_pool2d(lat, self.cfg.pool)
        out = lat.reshape(lat.shape[0], -1).cpu()
        if not torch.isfinite(out).all():
            raise NonFiniteError("Stable Diffusion produced non-finite latents (try dtype float32)")
        return out


GENERATORS.register("stable_diffusion", "stable-diffusion", "sd")(StableDiffusionGenerator)
