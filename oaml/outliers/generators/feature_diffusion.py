"""Feature-space diffusion: D-OOD vectors made by SDEdit in the teacher's feature space.

Model
    :class:`FeatureDenoiser` is an MLP epsilon-predictor: input projection, ``depth`` residual
    blocks (LayerNorm -> FiLM from the timestep embedding -> Linear-SiLU-Linear, added back),
    output LayerNorm + zero-initialised projection, added to the analytic skip
    ``sqrt(1 - alpha_bar_t) * x_t`` (the optimal epsilon for independent unit-variance
    dimensions, which standardisation produces; without it a ``width < dim`` bottleneck cannot pass
    ``x_t`` through and the loss stalls at about ``1 - width/dim``). The timestep goes through the sinusoidal
    embedding of ``diffusers`` (``Timesteps`` + ``TimestepEmbedding``); optionally a learned
    class embedding is added to it (``class_conditional``).

Data space
    Features are L2-normalised (``normalize_input``), then standardised per dimension with the
    mean/std of the training set (stored in the model), so the diffusion runs on data of unit
    variance. Outputs are mapped back (de-standardised) and, with ``normalize_output``,
    L2-normalised again.

Training (:func:`train_feature_diffusion`)
    Epsilon prediction, MSE, noise and timesteps from ``diffusers.DDPMScheduler`` (its
    ``add_noise``), AdamW with linear warm-up and cosine decay, optional EMA of the weights.

Generation (:class:`FeatureDiffusionGenerator`)
    SDEdit (Meng et al. 2022) with ``diffusers.DDIMScheduler`` (eta 0): the C-OOD vector x0 is
    noised to strength ``s`` - the DDIM schedule of ``steps`` steps is truncated to its last
    ``round(s * steps)`` steps, so the start timestep is about ``s * T`` - then denoised to
    t = 0, or stopped after ``capture_step`` of those denoising steps (the noisy state x_t is
    returned). ``strength=1`` ignores the input (pure sampling from the model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ...config import StrictModel
from ...errors import BankError, ConfigError, NonFiniteError, ShapeError
from ...utils.device import resolve_device
from ...utils.io import atomic_path, sha256_file
from ..bank import Bank
from .base import GENERATORS, Generator

log = logging.getLogger(__name__)

FORMAT = "oaml-feature-diffusion/1"


class FeatureDiffusionTrainConfig(StrictModel):
    """How the feature-space denoiser is built and trained."""

    width: int = Field(512, gt=0, description="hidden width of the residual MLP")
    depth: int = Field(2, gt=0, description="number of residual blocks")
    mlp_ratio: float = Field(1.0, gt=0, description="inner width of a block = width * mlp_ratio")
    time_embed_dim: int = Field(128, gt=0, description="sinusoidal timestep embedding width")
    dropout: float = Field(0.0, ge=0, lt=1)
    class_conditional: bool = False
    num_train_timesteps: int = Field(1000, gt=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    normalize_input: bool = Field(True, description="L2-normalise features before standardising")
    train_steps: int = Field(2000, gt=0)
    batch_size: int = Field(256, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="0 disables the EMA")
    grad_clip: float = Field(1.0, gt=0)
    max_train_samples: int | None = Field(None, gt=0, description="seeded subset of the ID bank")
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = Field(
        None, gt=0, description="torch CPU threads while training (None: leave torch's setting); 1 is far faster "
        "than an oversubscribed OpenMP pool on a shared machine")
    log_every: int = Field(200, gt=0)


class FeatureDiffusionConfig(StrictModel):
    """How D-OOD vectors are drawn from a trained feature diffusion model (SDEdit)."""

    strength: float = Field(0.5, gt=0, le=1, description="noise level to start from, as a fraction of T")
    steps: int = Field(50, gt=0, description="DDIM steps of the full schedule (truncated by strength)")
    capture_step: int | None = Field(
        None, ge=0, description="stop after this many denoising steps and return x_t (None: denoise to t=0)"
    )
    normalize_output: bool = Field(True, description="L2-normalise the generated vectors")
    eta: float = Field(0.0, ge=0, description="DDIM eta (0 = deterministic after the initial noising)")
    device: str = "auto"
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads while generating (None: unchanged)")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).chunk(2, dim=-1)
        x = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(F.silu(self.fc1(x))))


class FeatureDenoiser(nn.Module):
    """Residual MLP predicting the noise of x_t given the timestep (and optionally the class)."""

    def __init__(self, dim: int, cfg: FeatureDiffusionTrainConfig, num_classes: int = 0,
                 alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.dim = dim
        if alphas_cumprod is None:
            alphas_cumprod = torch.zeros(cfg.num_train_timesteps)
        # analytic skip: sqrt(1 - alpha_bar_t) * x_t is the optimal epsilon for data with
        # independent unit-variance dimensions (what standardisation makes); the MLP learns the
        # rest. Without it a width < dim bottleneck cannot even pass x_t through at large t.
        self.register_buffer("skip_coef", (1 - alphas_cumprod.float()).sqrt())
        emb = cfg.width
        self.time_proj = Timesteps(cfg.time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(cfg.time_embed_dim, emb)
        self.class_embed = nn.Embedding(num_classes, emb) if cfg.class_conditional and num_classes > 0 else None
        self.inp = nn.Linear(dim, cfg.width)
        hidden = max(1, int(round(cfg.width * cfg.mlp_ratio)))
        self.blocks = nn.ModuleList(_Block(cfg.width, hidden, emb, cfg.dropout) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_idx: torch.Tensor | None = None) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(self.time_proj(t).to(x.dtype))
        if self.class_embed is not None:
            if class_idx is None:
                raise ConfigError("this feature diffusion model is class-conditional: pass the class labels")
            emb = emb + self.class_embed(class_idx)
        emb = F.silu(emb)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        skip = self.skip_coef[t.long().clamp(0, self.skip_coef.numel() - 1)].to(x.dtype)[:, None] * x
        return skip + self.out(self.out_norm(h))


class FeatureDiffusionModel(nn.Module):
    """Denoiser + data standardisation + class list + the training scheduler's config."""

    def __init__(self, dim: int, cfg: FeatureDiffusionTrainConfig, classes: list[int] | None = None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.cfg = cfg
        self.classes = [int(c) for c in (classes or [])]
        self.meta: dict[str, Any] = dict(meta or {})
        from diffusers import DDPMScheduler

        acp = DDPMScheduler(**self.scheduler_config()).alphas_cumprod
        self.net = FeatureDenoiser(dim, cfg, num_classes=len(self.classes), alphas_cumprod=acp)
        self.register_buffer("data_mean", torch.zeros(dim))
        self.register_buffer("data_std", torch.ones(dim))

    @property
    def dim(self) -> int:
        return self.net.dim

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.cfg.num_train_timesteps,
            "beta_schedule": self.cfg.beta_schedule,
            "prediction_type": "epsilon",
            "clip_sample": False,
        }

    # --- data space -------------------------------------------------------------------------
    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ShapeError(f"feature diffusion model works on {self.dim}-d features, got {x.shape[-1]}-d vectors")
        x = x.to(self.data_mean.dtype)
        if self.cfg.normalize_input:
            x = F.normalize(x, dim=-1)
        return (x - self.data_mean) / self.data_std

    def from_model_space(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.data_std + self.data_mean

    def class_index(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if self.net.class_embed is None:
            return None
        if labels is None:
            raise ConfigError("this feature diffusion model is class-conditional: pass the class labels")
        lut = {c: i for i, c in enumerate(self.classes)}
        try:
            return torch.tensor([lut[int(v)] for v in labels.reshape(-1).tolist()], dtype=torch.long,
                                device=self.data_mean.device)
        except KeyError as exc:
            raise ConfigError(f"class {exc.args[0]} was not in the ID bank this model was trained on") from None

    # --- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sdedit(
        self,
        x0: torch.Tensor | None,
        strength: float,
        steps: int,
        generator: torch.Generator,
        labels: torch.Tensor | None = None,
        capture_step: int | None = None,
        eta: float = 0.0,
        n: int | None = None,
    ) -> torch.Tensor:
        """Noise ``x0`` (original feature space) to ``strength``, run DDIM back; returns model-space states.

        With ``x0=None`` (give ``n``) sampling starts from pure noise at the top of the schedule.
        Returns the state after ``capture_step`` denoising steps (``None``: all of them), in the
        model's standardised space; use :meth:`from_model_space` to map back.
        """
        from diffusers import DDIMScheduler

        if not 0 < strength <= 1:
            raise ConfigError(f"strength must be in (0, 1], got {strength}")
        dev = self.data_mean.device
        sched = DDIMScheduler(**self.scheduler_config(), set_alpha_to_one=True, timestep_spacing="trailing")
        sched.set_timesteps(steps, device=dev)
        n_run = min(steps, max(1, int(round(strength * steps))))
        timesteps = sched.timesteps[steps - n_run:]
        if x0 is None:
            if n is None:
                raise ConfigError("pass x0 or n")
            x = torch.randn((n, self.dim), generator=generator, device=dev)
        else:
            z0 = self.to_model_space(x0.to(dev))
            noise = torch.randn(z0.shape, generator=generator, device=dev, dtype=z0.dtype)
            x = sched.add_noise(z0, noise, timesteps[:1].repeat(z0.shape[0]))
        cls = self.class_index(labels)
        if capture_step is not None and capture_step > n_run:
            raise ConfigError(f"capture_step={capture_step} is beyond the {n_run} denoising steps that strength "
                              f"{strength} with {steps} steps runs")
        for i, t in enumerate(timesteps):
            if capture_step is not None and i == capture_step:
                break
            eps = self.net(x, t, cls)
            x = sched.step(eps, t, x, eta=eta, generator=generator).prev_sample
        if not torch.isfinite(x).all():
            raise NonFiniteError("feature diffusion produced non-finite values; retrain the model (lower lr)")
        return x

    @torch.no_grad()
    def sample(self, n: int, steps: int = 50, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` samples from pure noise, in the original (de-standardised) feature space."""
        g = torch.Generator(device=self.data_mean.device).manual_seed(seed)
        return self.from_model_space(self.sdedit(None, 1.0, steps, g, labels=labels, n=n))

    # --- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write weights + config + meta to one ``.safetensors`` file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        header = {
            "format": FORMAT,
            "dim": str(self.dim),
            "config": self.cfg.model_dump_json(),
            "classes": json.dumps(self.classes),
            "meta": json.dumps(self.meta, default=str),
        }
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "FeatureDiffusionModel":
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise BankError(f"no feature diffusion model at {path}; train one (`oaml generate --id-bank ...`)")
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        if header.get("format") != FORMAT:
            raise BankError(f"{path} is not an oaml feature diffusion model (format {header.get('format')!r})")
        cfg = FeatureDiffusionTrainConfig.model_validate_json(header["config"])
        model = cls(int(header["dim"]), cfg, json.loads(header["classes"]), json.loads(header["meta"]))
        model.load_state_dict(load_file(str(path)))
        model.meta["file"] = str(path)
        model.meta["sha256"] = sha256_file(path)
        return model.to(resolve_device(device)).eval()


def _as_tensor_and_labels(data: Any, max_n: int | None, seed: int) -> tuple[torch.Tensor, np.ndarray | None, dict]:
    if isinstance(data, (str, Path)):
        data = Bank.open(data)
    if isinstance(data, Bank):
        n = len(data)
        idx = np.arange(n)
        if max_n is not None and n > max_n:
            idx = np.sort(np.random.default_rng(seed).choice(n, size=max_n, replace=False))
        info = {"id_bank": str(data.path), "id_bank_kind": data.kind, "id_bank_count": n, "id_bank_meta": data.meta}
        return torch.from_numpy(data.gather(idx)), data.labels[idx], info
    if isinstance(data, tuple):
        x, lab = data
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
        lab = np.asarray(lab)
    else:
        x, lab = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data, dtype=torch.float32), None
    if max_n is not None and x.shape[0] > max_n:
        idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_n, replace=False))
        x = x[torch.from_numpy(idx)]
        lab = lab[idx] if lab is not None else None
    return x, lab, {"id_bank": None, "id_bank_count": int(x.shape[0])}


def train_feature_diffusion(
    id_bank_or_tensor: Bank | str | Path | torch.Tensor | np.ndarray | tuple,
    cfg: FeatureDiffusionTrainConfig | None = None,
    progress: bool = True,
) -> FeatureDiffusionModel:
    """Train a :class:`FeatureDiffusionModel` on ID features.

    ``id_bank_or_tensor``: an ID feature bank (or its path), an ``(n, D)`` tensor/array, or a
    ``(vectors, labels)`` tuple (labels needed for ``class_conditional``). The model's ``meta``
    records the config, the data source, the final loss (EMA of the batch loss) and the time.
    """
    cfg = cfg or FeatureDiffusionTrainConfig()
    with _threads(cfg.num_threads):
        return _train(id_bank_or_tensor, cfg, progress)


def _train(id_bank_or_tensor: Any, cfg: FeatureDiffusionTrainConfig, progress: bool) -> FeatureDiffusionModel:
    from diffusers import DDPMScheduler
    from ...utils.progress import progress_bar

    x, labels, info = _as_tensor_and_labels(id_bank_or_tensor, cfg.max_train_samples, cfg.seed)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ShapeError(f"training features must be (n >= 2, D), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NonFiniteError("training features contain NaN/inf")
    if info.get("id_bank_kind") not in (None, "id_features"):
        log.warning("training feature diffusion on a bank of kind %r (expected 'id_features')", info["id_bank_kind"])
    classes = None
    if cfg.class_conditional:
        if labels is None:
            raise ConfigError("class_conditional=True needs labels: pass an ID bank or a (vectors, labels) tuple")
        classes = sorted(int(c) for c in np.unique(labels))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = FeatureDiffusionModel(x.shape[1], cfg, classes)
    # standardisation statistics in model space
    xs = F.normalize(x, dim=-1) if cfg.normalize_input else x
    model.data_mean.copy_(xs.mean(0))
    model.data_std.copy_(xs.std(0).clamp_min(1e-6))
    model.to(device).train()
    data = model.to_model_space(x.to(device))
    cls_all = model.class_index(torch.as_tensor(labels)) if cfg.class_conditional else None

    sched = DDPMScheduler(**model.scheduler_config())
    sched.alphas_cumprod = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        p = (step - cfg.warmup_steps) / max(1, cfg.train_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = [p.detach().clone() for p in model.net.parameters()] if cfg.ema_decay > 0 else None
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n = data.shape[0]
    loss_ema = None
    t0 = time.time()
    bar = progress_bar(range(cfg.train_steps), desc="feature diffusion", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=g, device=device)
        z0 = data[idx]
        noise = torch.randn(z0.shape, generator=g, device=device)
        t = torch.randint(0, cfg.num_train_timesteps, (z0.shape[0],), generator=g, device=device)
        zt = sched.add_noise(z0, noise, t)
        pred = model.net(zt, t, cls_all[idx] if cls_all is not None else None)
        loss = F.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"feature diffusion loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.net.parameters(), cfg.grad_clip)
        opt.step()
        lr_sched.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in model.net.parameters()], 1 - cfg.ema_decay)
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if (step + 1) % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            log.debug("step %d loss %.4f", step + 1, loss_ema)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, model.net.parameters()):
                p.copy_(e)
    model.eval()
    model.meta.update(info)
    model.meta.update({
        "train_config": cfg.model_dump(mode="json"),
        "final_loss": loss_ema,
        "train_seconds": round(time.time() - t0, 2),
        "torch": torch.__version__,
    })
    return model


@GENERATORS.register("feature_diffusion", "feature-diffusion")
class FeatureDiffusionGenerator(Generator):
    """SDEdit from C-OOD vectors with a trained :class:`FeatureDiffusionModel`."""

    name = "feature_diffusion"

    def __init__(self, model: FeatureDiffusionModel | str | Path, cfg: FeatureDiffusionConfig | None = None):
        self.cfg = cfg or FeatureDiffusionConfig()
        device = resolve_device(self.cfg.device)
        if isinstance(model, (str, Path)):
            model = FeatureDiffusionModel.load(model, device)
        self.model = model.to(device).eval()
        self.device = device

    def output_dim(self, input_dim: int) -> int:
        if input_dim != self.model.dim:
            raise ShapeError(f"C-OOD vectors are {input_dim}-d but the feature diffusion model was trained on "
                             f"{self.model.dim}-d ID features; use a model trained on the same teacher's features")
        return self.model.dim

    def settings(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.model.meta.items() if k not in ("train_seconds",)}
        return {"config": self.cfg.model_dump(mode="json", exclude={"num_threads"}), "model": meta}

    def generate(self, cood_vectors: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
        self.output_dim(cood_vectors.shape[1])
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        with _threads(self.cfg.num_threads):
            z = self.model.sdedit(
                cood_vectors.to(self.device, torch.float32), self.cfg.strength, self.cfg.steps, g,
                labels=labels, capture_step=self.cfg.capture_step, eta=self.cfg.eta,
            )
        out = self.model.from_model_space(z)
        if self.cfg.normalize_output:
            out = F.normalize(out, dim=-1)
        return out.float().cpu()
