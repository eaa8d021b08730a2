"""Base API of post-hoc OOD scores: :class:`FeatureSet`, :class:`Score`, the ``SCORES`` registry.

Convention: every score returns a float64 numpy array, **higher = more in-distribution**.

A score is used in two steps, uniformly for every score::

    s = create_score("vim", dim=256)
    s.fit(train_features, head=model.fc_weights(), model=model, loader=train_loader)
    conf = s.score(test_features, model=model, loader=test_loader)

``fit_on`` names the ID split ``fit`` wants ("none", "train" or "val"); scores with
``fit_on == "none"`` accept and ignore the fit call. Feature scores read only ``data`` (and
``head``); only scores with ``requires_model = True`` (ODIN, Gram) use ``model`` and ``loader``.
"""

from __future__ import annotations

import inspect
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError, ShapeError
from ..registry import Registry

__all__ = ["FeatureSet", "Score", "SCORES", "create_score", "Head", "pool_activation", "find_modules",
           "resnet_modules", "tap_layers", "check_ran_once", "frozen", "loader_batches"]

SCORES: Registry = Registry("score")

Head = Tuple[torch.Tensor, Optional[torch.Tensor]]


@dataclass
class FeatureSet:
    """Cached network outputs of one split: what every feature score fits on and scores.

    ``logits`` (N, C) float, ``features`` (N, D) penultimate features, ``labels`` (N,) int64
    with -1 for OOD samples (or None). ``layers`` (optional): activations of inner modules by
    their ``model.named_modules()`` name, each globally average-pooled to (N, C_l) (what
    :func:`~oaml.evaluation.features.extract_features` stores with ``layers=``; multi-layer
    scores read them). Shapes are checked on construction; finiteness is checked by each score
    (so a cache may hold what it was given). Scores compute on the CPU (tensors elsewhere are
    copied there), except KNN, which takes a ``device`` argument.
    """

    logits: torch.Tensor
    features: torch.Tensor
    labels: Optional[torch.Tensor] = None
    layers: Optional[Dict[str, torch.Tensor]] = None

    def __post_init__(self) -> None:
        for name in ("logits", "features", "labels"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, torch.Tensor):
                setattr(self, name, torch.as_tensor(np.asarray(v)))
        if self.logits.ndim != 2:
            raise ShapeError(f"FeatureSet.logits must be (N, C), got shape {tuple(self.logits.shape)}")
        if self.features.ndim != 2:
            raise ShapeError(
                f"FeatureSet.features must be (N, D) pooled penultimate features, got shape "
                f"{tuple(self.features.shape)}"
            )
        n = self.logits.shape[0]
        if self.features.shape[0] != n:
            raise ShapeError(f"FeatureSet: {n} logit rows but {self.features.shape[0]} feature rows")
        if self.labels is not None:
            if self.labels.ndim != 1 or self.labels.shape[0] != n:
                raise ShapeError(f"FeatureSet.labels must be ({n},), got shape {tuple(self.labels.shape)}")
            if self.labels.dtype.is_floating_point or self.labels.dtype == torch.bool:
                raise ShapeError(f"FeatureSet.labels must be integer class indices, got {self.labels.dtype}")
        if self.layers is not None:
            if not isinstance(self.layers, Mapping):
                raise ShapeError(f"FeatureSet.layers must be a dict {{module name: (N, C) tensor}}, got {type(self.layers).__name__}")
            layers = {}
            for k, v in self.layers.items():
                if not isinstance(k, str) or not k:
                    raise ShapeError(f"FeatureSet.layers keys must be module names (non-empty str), got {k!r}")
                v = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
                if v.ndim != 2 or v.shape[0] != n or not v.dtype.is_floating_point:
                    raise ShapeError(
                        f"FeatureSet.layers[{k!r}] must be ({n}, C) pooled float activations, got shape "
                        f"{tuple(v.shape)} ({v.dtype})"
                    )
                layers[k] = v
            self.layers = layers

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def cpu(self) -> "FeatureSet":
        """This set with every tensor on the CPU (``self`` when they already are)."""
        ts = [self.logits, self.features] + ([self.labels] if self.labels is not None else [])
        ts += list((self.layers or {}).values())
        if all(t.is_cpu for t in ts):
            return self
        layers = None if self.layers is None else {k: v.cpu() for k, v in self.layers.items()}
        return FeatureSet(self.logits.cpu(), self.features.cpu(), None if self.labels is None else self.labels.cpu(), layers)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])


# --------------------------------------------------------------------------- validation helpers


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    score: str = "",
) -> Any:
    """sklearn-style hyperparameter check; raises ConfigError naming parameter, value, range."""
    where = f"{score}: " if score else ""
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    rng = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    if integer:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{where}{name} must be an integer in {rng}, got {value!r}")
        value = int(value)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ConfigError(f"{where}{name} must be a number in {rng}, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}{name} must be a finite number in {rng}, got {value!r}")
    bad = (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and (value >= high if high_open else value > high))
    )
    if bad:
        raise ConfigError(f"{where}{name}={value!r} is out of range; allowed: {rng}")
    return value


def check_choice(name: str, value: Any, choices: tuple, score: str = "") -> Any:
    if value not in choices:
        where = f"{score}: " if score else ""
        raise ConfigError(f"{where}{name}={value!r} is not allowed; choose one of {list(choices)}")
    return value


def check_finite(t: torch.Tensor, what: str) -> None:
    if t.dtype.is_floating_point and t.numel():
        # fast path (native dtype): a finite sum means every entry is finite (NaN/inf propagate); a sum that
        # overflows from finite values falls through to the exact count, which is then 0
        if bool(torch.isfinite(t.sum())):
            return
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise NonFiniteError(
                f"{what} contains {bad} non-finite value(s) (NaN or inf) out of {t.numel()}"
            )


def mean64(x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Column means of a (N, D) tensor in float64, without a float64 copy of it: row chunks are
    upcast and summed (a 50,000 x 512 float32 train set would otherwise be copied to 205 MB)."""
    x = x.detach().cpu()
    out = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        out += x[i : i + chunk].to(torch.float64).sum(dim=0)
    return out / max(x.shape[0], 1)


def checked_mean32(x: torch.Tensor, what: str) -> torch.Tensor:
    """Column means of a (N, D) tensor in float32 (torch's cascaded sum), and the finiteness check of
    ``x`` from them (:func:`check_finite` of ``x``, NonFiniteError, only where a mean is not finite)."""
    mean = x.detach().cpu().to(torch.float32).mean(dim=0)
    if not bool(torch.isfinite(mean).all()):
        check_finite(x, what)  # raises, unless a sum merely overflowed
    return mean


def class_sums(x: torch.Tensor, y: torch.Tensor, num_classes: int, chunk: int = 2048) -> torch.Tensor:
    """Per-class sums (C, D) in float64 of the rows of ``x`` with labels ``y``: each chunk of ``chunk``
    rows is summed per class in the features' precision (float32 at least; ``index_add_``, in cache),
    and the chunks' sums are added in float64. A class's float32 partial sum adds at most ``chunk``
    rows, so its error is at most about ``chunk * 2^-24`` times the class's sum of ``|x|`` (a tenth
    of the time of upcasting every chunk to float64, 50,000 x 512 at C = 10: 6 vs 21 ms)."""
    x, y = x.detach().cpu(), y.detach().cpu().long()
    out = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    part = torch.empty(num_classes, x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
    for i in range(0, x.shape[0], chunk):
        part.zero_().index_add_(0, y[i : i + chunk], x[i : i + chunk].to(part.dtype))
        out += part
    return out


#: Elements (rows x D) per row chunk of the scoring loops: a chunk's float64 temporaries
#: (2^17 x 8 bytes = 1 MiB, 256 rows at D = 512) stay in cache and their memory is reused, where
#: whole-set temporaries (20,000 x 512 in float64 = 80 MB) would each be fresh pages.
CHUNK_ELEMS = 1 << 17


def chunk_rows(d: int, elems: int = CHUNK_ELEMS) -> int:
    """Rows of width ``d`` in a chunk of about ``elems`` elements (at least 1)."""
    return max(1, elems // max(d, 1))


def row_chunks(n: int, d: int) -> Iterator[slice]:
    """Slices of ``n`` rows of width ``d`` in chunks of :func:`chunk_rows` rows."""
    step = chunk_rows(d)
    for i in range(0, n, step):
        yield slice(i, min(i + step, n))


def cast_chunks(X: torch.Tensor, dtype: torch.dtype, elems: int = CHUNK_ELEMS) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, chunk)`` over row chunks of ``X`` (n, D) of about ``elems`` elements: the chunk is
    ``X[rows]`` cast to ``dtype`` into one reused buffer (so it is overwritten by the next chunk, and
    free to change in place)."""
    n, D = X.shape
    step = chunk_rows(D, elems)
    buf = torch.empty(min(step, n), D, dtype=dtype)
    for i in range(0, n, step):
        c = buf[: min(step, n - i)]
        c.copy_(X[i : i + step])
        yield slice(i, i + c.shape[0]), c


def float64_chunks(X: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """:func:`cast_chunks` to float64, in chunks of :data:`CHUNK_ELEMS` elements."""
    return cast_chunks(X, torch.float64)


#: Elements per row chunk of the float32 scoring loops (fDBD, NCI): 4 MiB, 2,048 rows at D = 512;
#: each chunk's ops then run long enough to use every thread, where 256-row chunks spent as long
#: in per-op overhead as in arithmetic (fDBD over 20,000 x 512: 2.0 ms vs 3.8 ms at 2^17)
FLOAT32_CHUNK_ELEMS = 1 << 20


def to_numpy64(t: torch.Tensor) -> np.ndarray:
    out = t.detach().to("cpu", torch.float64).numpy()
    return np.ascontiguousarray(out)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------ inner layers
# Shared by feature extraction (``extract_features(..., layers=)``) and the scores that read or
# edit inner activations (mds_multi, mds_odin, rankfeat, vra, nac, grad_uncertainty).

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def pool_activation(t: Any, what: str = "activation") -> torch.Tensor:
    """Global average pool of a channel-first activation: (B, C, *spatial) -> (B, C); (B, C) as is."""
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{what} must be a tensor, got {type(t).__name__}")
    if t.ndim < 2:
        raise ShapeError(f"{what} must be (B, C, ...), got shape {tuple(t.shape)}")
    return t if t.ndim == 2 else t.flatten(2).mean(dim=2)


def find_modules(model: torch.nn.Module, names: Sequence[str], score: str = "") -> Dict[str, torch.nn.Module]:
    """``{name: module}`` for ``names`` of ``model.named_modules()``; ConfigError (listing a few
    valid names) for an unknown one."""
    where = f"{score}: " if score else ""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if not isinstance(n, str) or not n or n not in mods:
            valid = [k for k in mods if k and "." not in k] + [k for k in mods if "." in k]
            more = f" and {len(valid) - 12} more" if len(valid) > 12 else ""
            raise ConfigError(
                f"{where}{type(model).__name__} has no module {n!r}; valid names (model.named_modules()) "
                f"include {', '.join(valid[:12])}{more}"
            )
        out[n] = mods[n]
    return out


def resnet_modules(model: torch.nn.Module, score: str = "") -> Dict[str, str]:
    """Full module names of ``layer1``..``layer4`` and ``avgpool`` of a ResNet-layout model (oaml
    students, torchvision ResNets, also wrapped, e.g. ``model.layer4`` inside a HookedClassifier),
    the default inner layers of the multi-layer scores. NotImplementedError (the evaluator then
    skips the score, with this reason) for a HeadAdapter (an opaque backbone) or another layout."""
    where = f"{score}: " if score else ""
    adapter = sys.modules.get("oaml.models.adapter")  # loaded whenever a HeadAdapter exists
    if adapter is not None and isinstance(model, adapter.HeadAdapter):
        raise NotImplementedError(
            f"{where}the model is a HeadAdapter around an opaque backbone, so its inner layers are "
            "unknown; pass layers=(...) naming modules of model.named_modules()"
        )
    want = RESNET_STAGES + ("avgpool",)
    for prefix, m in model.named_modules():
        kids = dict(m.named_children())
        if all(k in kids for k in want):
            return {k: f"{prefix}.{k}" if prefix else k for k in want}
    raise NotImplementedError(
        f"{where}{type(model).__name__} does not have the ResNet layout (modules layer1..layer4 and "
        "avgpool), so its inner layers are unknown; pass layers=(...) naming modules of model.named_modules()"
    )


@contextmanager
def tap_layers(
    model: torch.nn.Module, names: Sequence[str], fn: Callable[[str, torch.Tensor], Optional[torch.Tensor]], score: str = ""
) -> Iterator[Dict[str, int]]:
    """Forward hooks on the modules ``names`` of ``model`` while the context is open: each time
    one runs, ``fn(name, output)`` is called; a tensor it returns replaces the module's output for
    the rest of the network (how RankFeat and VRA edit activations). Yields the per-module call
    counts; :func:`check_ran_once` checks (and resets) them after each forward pass."""
    where = f"{score}: " if score else ""
    mods = find_modules(model, names, score)
    counts = {n: 0 for n in mods}

    def make(n: str):
        def hook(module, args, out):
            counts[n] += 1
            if not isinstance(out, torch.Tensor):
                raise ShapeError(
                    f"{where}module {n!r} returned {type(out).__name__}, not one tensor; name another module"
                )
            return fn(n, out)

        return hook

    handles = []
    try:
        for n, m in mods.items():
            handles.append(m.register_forward_hook(make(n)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def check_ran_once(counts: Dict[str, int], score: str = "") -> None:
    """Each tapped module ran exactly once in the last forward pass (then reset the counts)."""
    where = f"{score}: " if score else ""
    for n, c in counts.items():
        if c != 1:
            why = "did not run in" if c == 0 else f"ran {c} times in"
            raise ConfigError(
                f"{where}module {n!r} {why} one forward pass; name modules that run exactly once per "
                "forward (not a shared module such as a reused ReLU)"
            )
        counts[n] = 0


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode with parameter gradients off while the context is open (both
    restored after): for scores that differentiate w.r.t. inputs or activations only."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


def loader_batches(loader: Any, device: torch.device, score: str) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(x on device, y or None)`` of each batch of ``loader`` (``(x, y)`` tuples or bare
    inputs), inputs checked finite; ConfigError when it yields nothing."""
    n = 0
    for batch in loader:
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.to(device)
        check_finite(x, f"{score}: input batch")
        n += 1
        yield x, (None if y is None else torch.as_tensor(y))
    if n == 0:
        raise ConfigError(f"{score}: the loader yielded no batches")


# --------------------------------------------------------------------------------- base class


class Score:
    """Base of all post-hoc scores. Subclasses implement ``_fit`` (if ``fit_on != "none"``)
    and ``_score``; the public ``fit``/``score`` validate inputs first.

    Subclasses set ``needs_features`` / ``needs_logits`` / ``needs_labels`` (for fit) and
    ``needs_head``; the matching inputs are validated (shape, finiteness) before use.
    """

    name: ClassVar[str]
    fit_on: ClassVar[str] = "none"
    requires_model: ClassVar[bool] = False
    needs_head: ClassVar[bool] = False
    needs_fit_labels: ClassVar[bool] = False
    uses: ClassVar[tuple] = ("logits", "features")  # which FeatureSet fields are read (and checked)
    #: fields of ``uses`` whose finiteness ``_score`` checks itself, chunk by chunk while the data is
    #: in cache (``check=`` of :func:`exp_shifted` / :func:`energy64`; the same NonFiniteError), not
    #: in a separate pass over the whole tensor first; only in ``score`` (``fit`` still checks them)
    checks_inline: ClassVar[tuple] = ()
    #: the fields ``fit`` reads (None: ``uses``), and those of them whose finiteness ``_fit`` checks
    #: itself (e.g. from the column sums it computes anyway: a finite sum means finite entries)
    fit_uses: ClassVar[Optional[tuple]] = None
    fit_checks_inline: ClassVar[tuple] = ()

    def __init__(self) -> None:
        self._fitted = self.fit_on == "none"
        self._dims: tuple[int, int] | None = None  # (C, D) seen at fit

    # -- introspection ------------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments and their current values (what the search varies)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def needed_layers(self, model: Any) -> Tuple[str, ...]:
        """Names of ``model.named_modules()`` whose pooled activations this score reads from
        ``FeatureSet.layers`` (the evaluator extracts the union over its scores once per split);
        ``()`` for scores that read none. NotImplementedError when ``model`` lacks them."""
        return ()

    # -- public API ---------------------------------------------------------------------------
    def fit(
        self,
        data: FeatureSet | None = None,
        *,
        model: Any = None,
        loader: Any = None,
        head: Head | None = None,
    ) -> "Score":
        """Fit the score's state on the ID split named by ``fit_on``; returns ``self``.

        Scores that need no fitting ignore every argument. Feature scores need ``data``;
        ``head=(W, b)`` (``model.fc_weights()``) is needed by ViM, ReAct and GradNorm. Model
        scores (``requires_model``) need ``model`` and ``loader``.
        """
        if self.fit_on == "none":
            self._fitted = True
            return self
        if self.requires_model:
            self._check_model_args(model, loader, "fit")
            self._fit_model(model, loader)
        else:
            self._check_data(data, "fit", need_labels=self.needs_fit_labels)
            data = data.cpu()
            W, b = self._check_head(head, data) if self.needs_head else (None, None)
            self._dims = (data.num_classes, data.feature_dim)
            self._fit(data, W, b)
        self._fitted = True
        return self

    def score(self, data: FeatureSet | None = None, *, model: Any = None, loader: Any = None) -> np.ndarray:
        """Scores of ``data`` (or of ``loader`` through ``model`` for model scores): float64,
        shape (N,), higher = more in-distribution."""
        if not self._fitted:
            raise ConfigError(
                f"{self.name}: call fit() on the ID {self.fit_on} split before score()"
            )
        if self.requires_model:
            self._check_model_args(model, loader, "score")
            out = self._score_model(model, loader)
        else:
            self._check_data(data, "score")
            data = data.cpu()
            if self._dims is not None:
                c, d = self._dims
                if data.num_classes != c or data.feature_dim != d:
                    raise ShapeError(
                        f"{self.name}: fitted on C={c} classes and D={d} features, but got "
                        f"C={data.num_classes}, D={data.feature_dim}"
                    )
            out = self._score(data)
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        # a finite sum means every score is finite (one pass); else count them exactly (a sum
        # of finite scores may overflow: then the count is 0)
        with np.errstate(over="ignore", invalid="ignore"):
            total = float(np.add.reduce(out))
        if not math.isfinite(total):
            bad = int(np.count_nonzero(~np.isfinite(out)))
            if bad:
                raise NonFiniteError(f"{self.name} produced {bad} non-finite score(s) out of {out.size}")
        return out

    def __call__(self, data: FeatureSet | None = None, **kw: Any) -> np.ndarray:
        return self.score(data, **kw)

    # -- for subclasses -----------------------------------------------------------------------
    def _fit(self, data: FeatureSet, W: torch.Tensor | None, b: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _score(self, data: FeatureSet) -> np.ndarray:
        raise NotImplementedError

    def _fit_model(self, model: Any, loader: Any) -> None:
        raise NotImplementedError

    def _score_model(self, model: Any, loader: Any) -> np.ndarray:
        raise NotImplementedError

    # -- checks -------------------------------------------------------------------------------
    def _check_data(self, data: Any, stage: str, need_labels: bool = False) -> None:
        if not isinstance(data, FeatureSet):
            raise ShapeError(
                f"{self.name}.{stage}() needs a FeatureSet (logits, features, labels), got "
                f"{type(data).__name__}"
            )
        if len(data) == 0:
            raise ShapeError(f"{self.name}.{stage}(): the FeatureSet is empty")
        fields = self.uses if stage == "score" or self.fit_uses is None else self.fit_uses
        inline = self.checks_inline if stage == "score" else self.fit_checks_inline
        for field in fields:
            if field not in inline:
                check_finite(getattr(data, field), f"{self.name}.{stage}(): {field}")
        if need_labels:
            if data.labels is None:
                raise ShapeError(f"{self.name}.fit() needs labels in the FeatureSet")
            lab = data.labels
            if int(lab.min()) < 0 or int(lab.max()) >= data.num_classes:
                raise ShapeError(
                    f"{self.name}.fit(): labels must be ID class indices in [0, {data.num_classes - 1}], "
                    f"got range [{int(lab.min())}, {int(lab.max())}] (drop OOD samples, marked -1)"
                )

    def _check_head(self, head: Any, data: FeatureSet) -> tuple[torch.Tensor, torch.Tensor | None]:
        if head is None:
            raise ConfigError(
                f"{self.name}.fit() needs head=(W, b), the last linear layer "
                "(pass head=model.fc_weights())"
            )
        if not isinstance(head, (tuple, list)) or len(head) != 2:
            raise ShapeError(f"{self.name}: head must be a tuple (W, b), got {type(head).__name__}")
        W, b = head
        W = torch.as_tensor(W).detach().to("cpu", torch.float64)
        C, D = data.num_classes, data.feature_dim
        if W.shape != (C, D):
            raise ShapeError(f"{self.name}: head W must be (C, D) = ({C}, {D}), got {tuple(W.shape)}")
        check_finite(W, f"{self.name}: head weight W")
        if b is not None:
            b = torch.as_tensor(b).detach().to("cpu", torch.float64)
            if b.shape != (C,):
                raise ShapeError(f"{self.name}: head bias b must be ({C},), got {tuple(b.shape)}")
            check_finite(b, f"{self.name}: head bias b")
        return W, b

    def _check_model_args(self, model: Any, loader: Any, stage: str) -> None:
        if model is None or loader is None:
            raise ConfigError(
                f"{self.name}.{stage}() needs model= (a Classifier) and loader= (yielding "
                "preprocessed (x, y) batches)"
            )


def create_score(name: str, **kwargs: Any) -> Score:
    """Build a registered score by name; unknown keyword arguments are a ConfigError."""
    cls = SCORES.get(name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ConfigError(
            f"score {name!r} has no parameter(s) {unknown}; allowed: {params or 'none'}"
        )
    return cls(**kwargs)


#: log2(e): exp(x) is computed as exp2(x log2 e); torch's float64 exp2 is about 3x faster than its exp
#: (both within ~1e-16 of the true value for the x <= 0 used here; see :func:`exp_shifted`)
LOG2E = 1.4426950408889634
#: elements per row chunk of :func:`exp_shifted` and :func:`energy64`: their float64 work buffer
#: (2 MiB) is reused across chunks and stays in cache (a whole (N, C) float64 temporary costs
#: memory traffic and page faults); fewer, larger chunks cost fewer tensor operations
EXP_CHUNK = 1 << 18


def log_(t: torch.Tensor) -> torch.Tensor:
    """In-place natural log of a float64 CPU tensor, returned: numpy's (vectorised, ~3x faster
    than torch's float64 log; both within an ulp) on a contiguous tensor, torch's otherwise."""
    if t.dtype == torch.float64 and t.is_cpu and t.is_contiguous():
        a = t.numpy()
        with np.errstate(divide="ignore", invalid="ignore"):  # log(0) = -inf silently, as torch's
            np.log(a, out=a)
        return t
    return t.log_()


def row_sums(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row sums (N,) of a 2-D float64 tensor; a matrix-vector product for narrow rows (C < 32),
    where torch's row reduction is about twice slower."""
    if x.shape[1] < 32 and x.dtype == torch.float64:
        ones = _ones64(x.shape[1])
        return torch.mv(x, ones) if out is None else torch.mv(x, ones, out=out)
    return x.sum(dim=1) if out is None else torch.sum(x, dim=1, out=out)


def exp_shifted(
    logits: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    offset: torch.Tensor | None = None,
    exponent: bool = False,
    check: str | None = None,
) -> Iterator[tuple]:
    r"""The max-shifted exponentials of the logits that softmax-type scores are made of, in float64,
    over row chunks: yields ``(rows, m, e)`` per chunk (``rows`` a slice), where for
    :math:`y = z + o` (``offset`` :math:`o`, (C,) float64, may hold -inf; none by default)

    .. math:: m = \max_c y_c, \qquad e_c = \exp\big((y_c - m)\, s\big) \in [0, 1],

    ``scale`` :math:`s > 0` a number (1/T) or an (N,) float64 tensor (one per row); so
    :math:`\sum_c e_c \ge 1` (the max entry is exactly 1) and
    :math:`\log\sum_c e^{s y_c} = s m + \log\sum_c e_c`, softmax :math:`= e / \sum_c e_c`.
    With ``exponent=True`` yields ``(rows, m, e, d2)``, ``d2`` :math:`= (y - m)\, s \log_2 e`
    (so :math:`e = 2^{d_2}`).

    Float64 for any finite logits (~1e4 included, no overflow): for float32 (or narrower)
    logits without offset, :math:`z - m` is exact in float64; the one multiplication by
    :math:`s \log_2 e` rounds once (relative 2^-53) and ``exp2`` is accurate to ~1e-16, so
    :math:`e_c` is within ~(1 + |d_c|) 2^-53 of :math:`e^{d_c}` relative (the entries that matter,
    :math:`d_c` near 0, to an ulp or two): the float64 ``softmax`` / ``logsumexp`` of
    ``torch.softmax(z.double())`` to a few ulps. The largest entry is exactly 1 (``d2`` is -inf
    where an offset is). ``m``, ``e`` and ``d2`` are views of reused buffers: use them before
    taking the next chunk.

    ``check`` (a name for the message): each chunk is checked finite before it is used
    (:func:`check_finite` of the whole tensor, NonFiniteError, if its sum is not finite), the
    inline form of :meth:`Score._check_data`'s pass (``Score.checks_inline``).
    """
    z = logits.detach()
    n, C = z.shape
    rows = max(1, min(n, chunk_rows(C, EXP_CHUNK)))
    buf = torch.empty(rows, C, dtype=torch.float64)
    ebuf = torch.empty_like(buf) if exponent else None
    per_row = isinstance(scale, torch.Tensor)
    f = None if per_row else float(scale) * LOG2E
    for i in range(0, n, rows):
        zc = z[i : i + rows]
        k = zc.shape[0]
        b = buf[:k]
        b.copy_(zc)
        if check is not None and not bool(torch.isfinite(zc.sum())):
            check_finite(z, check)  # raises unless the sum merely overflowed: then all are finite
            check = None
        if offset is not None:
            b.add_(offset)
            m = b.amax(dim=1, keepdim=True)
        else:  # the max of the logits in their own dtype (exact, half the memory traffic)
            m = zc.amax(dim=1, keepdim=True).to(torch.float64)
        b.sub_(m).mul_(scale[i : i + k, None] * LOG2E if per_row else f)
        if exponent:
            yield slice(i, i + k), m[:, 0], torch.exp2(b, out=ebuf[:k]), b
        else:
            yield slice(i, i + k), m[:, 0], b.exp2_()


def softmax64(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits.to(torch.float64) / temperature, dim=1)


#: :func:`energy64` takes row sums S of exp(y/T) unshifted when log S lies in this range (S in
#: [2^-900, 2^1000]: all terms that matter are normal floats, no overflow), else redoes the row
#: with its maximum as the shift
_UNSHIFTED_LOG_RANGE = (-900 * math.log(2.0), 1000 * math.log(2.0))
_ONES: Dict[int, torch.Tensor] = {}


def _ones64(C: int) -> torch.Tensor:
    if C not in _ONES:
        _ONES[C] = torch.ones(C, dtype=torch.float64)
    return _ONES[C]


def energy64(
    logits: torch.Tensor, temperature: float = 1.0, offset: torch.Tensor | None = None, check: str | None = None
) -> torch.Tensor:
    r""":math:`T \log \sum_c \exp(y_c / T)`, :math:`y = z + o` (N,) float64 (EBO's score;
    ``offset`` :math:`o` (C,) float64, may hold -inf, none by default); no overflow for logits
    ~1e4 or larger.

    Row chunks of :data:`EXP_CHUNK` elements, in a reused float64 buffer: first without any shift,
    :math:`S = \sum_c 2^{y_c \log_2(e)/T}`, each term within a relative :math:`(|y_c|/T)\, 2^{-53}`
    (the rounding of its exponent) plus ~1e-16 (``exp2``) of :math:`e^{y_c/T}`: in the result
    :math:`T \log S`, about half an ulp of the largest :math:`|y_c|`. This saves the per-row
    maximum (a slow reduction for small C) and the shift, and keeps the number of tensor
    operations small (for small N·C their fixed cost dominates).
    Rows whose :math:`S` leaves :data:`_UNSHIFTED_LOG_RANGE` (an overflow, or terms that would
    lose precision as subnormals) are redone with their own maximum as the shift
    (:func:`exp_shifted`: :math:`m + T \log \sum_c e_c`). Either way the result agrees with
    float64 ``logsumexp`` to about one ulp of :math:`\max_c |y_c|`. ``check``: as in
    :func:`exp_shifted` (the chunk sums are added up and checked once, before any result is used).
    """
    z = logits.detach()
    n, C = z.shape
    rows = max(1, min(n, chunk_rows(C, EXP_CHUNK)))
    buf = torch.empty(rows, C, dtype=torch.float64)
    out = torch.empty(n, dtype=torch.float64)
    f = LOG2E / temperature
    ones = _ones64(C) if C < 32 else None
    total = 0.0
    for zc, oc in zip(z.split(rows), out.split(rows)) if n > rows else ((z, out),):
        b = buf if zc.shape[0] == rows else buf[: zc.shape[0]]
        b.copy_(zc)
        if check is not None:  # NaN / inf propagate into the sum (-inf too, unlike into exp)
            total += float(zc.sum())
        if offset is not None:
            b.add_(offset)
        b.mul_(f).exp2_()
        if ones is not None:
            torch.mv(b, ones, out=oc)
        else:
            torch.sum(b, dim=1, out=oc)
    if not math.isfinite(total):
        check_finite(z, check)  # raises unless the sum merely overflowed
    o = log_(out).numpy()  # a sum that underflowed to 0 gives -inf: out of range, redone below
    lo, hi = _UNSHIFTED_LOG_RANGE
    if not (o.min() >= lo and o.max() <= hi):  # (NaN fails too)
        idx = torch.from_numpy(np.flatnonzero(~((o >= lo) & (o <= hi))))
        for r, m, e in exp_shifted(z[idx], 1.0 / temperature, offset):
            o[idx[r].numpy()] = log_(row_sums(e)).add_(m / temperature).numpy()  # (times T below)
    if temperature != 1.0:
        o *= temperature
    return out


def check_rcond(rcond: Any, score: str) -> float | None:
    """The relative eigenvalue cut of a covariance or Gram inverse: None (the default: D * float64
    eps) or a number in [0, 1)."""
    if rcond is None:
        return None
    return check_number("rcond", rcond, low=0.0, high=1.0, high_open=True, score=score)
