"""Loss modules of OAML and of the OOD baselines that share its training loop.

- :mod:`oaml.losses.distill`: logit KD, feature KD, the domain-transfer MLP (DT).
- :mod:`oaml.losses.club`: CLUB MI upper bound (fitted / reference modes) and outlier pairing.
- :mod:`oaml.losses.outlier`: OE, energy margin, LogitNorm, VOS, MixOE, class feature queue.

The weighted sum of the terms lives in the one training loop (:class:`oaml.training.Trainer`,
each term a registered :class:`oaml.training.Term`), not here.
"""

from .club import CLUB, OutlierPairer, club_negative_term, gaussian_log_likelihood, pair_outliers, pool_outliers
from .distill import TransferMLP, feature_kd, logit_kd
from .outlier import (
    ClassFeatureQueue,
    LogitNormLoss,
    VOSUncertaintyLoss,
    energy,
    energy_margin_loss,
    mixoe_loss,
    mixoe_targets,
    oe_loss,
    vos_uncertainty_loss,
    weighted_energy,
)

__all__ = [
    "CLUB", "OutlierPairer", "club_negative_term", "gaussian_log_likelihood", "pair_outliers", "pool_outliers",
    "TransferMLP", "feature_kd", "logit_kd",
    "ClassFeatureQueue", "LogitNormLoss", "VOSUncertaintyLoss", "energy", "energy_margin_loss", "mixoe_loss",
    "mixoe_targets", "oe_loss", "vos_uncertainty_loss", "weighted_energy",
]
