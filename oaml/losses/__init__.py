"""Loss modules of OAML and of the OOD baselines that share its training loop.

- :mod:`oaml.losses.distill`: logit KD, feature KD, the domain-transfer MLP (DT).
- :mod:`oaml.losses.club`: CLUB MI upper bound (fitted / reference modes) and outlier pairing.
- :mod:`oaml.losses.outlier`: OE, energy margin, LogitNorm, VOS, MixOE, class feature queue.
- :mod:`oaml.losses.total`: :class:`OAMLLossConfig`, :class:`LossCombiner`, :class:`OAMLCriterion`.
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
from .total import TERM_NAMES, LossCombiner, OAMLCriterion, OAMLLossConfig

__all__ = [
    "CLUB", "OutlierPairer", "club_negative_term", "gaussian_log_likelihood", "pair_outliers", "pool_outliers",
    "TransferMLP", "feature_kd", "logit_kd",
    "ClassFeatureQueue", "LogitNormLoss", "VOSUncertaintyLoss", "energy", "energy_margin_loss", "mixoe_loss",
    "mixoe_targets", "oe_loss", "vos_uncertainty_loss", "weighted_energy",
    "TERM_NAMES", "LossCombiner", "OAMLCriterion", "OAMLLossConfig",
]
