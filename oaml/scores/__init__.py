"""Post-hoc OOD scores (higher = more in-distribution). Importing this package fills ``SCORES``.

Fit splits: MSP, MLS, EBO, ODIN, GEN, GradNorm: none; MDS, ViM, KNN, Gram: ID train;
ReAct, KLM: ID val (``Score.fit_on``).

Each class docstring gives the formula, paper, defaults, fit split and the differences from
OpenOOD (HEAD 3c35632) and pytorch-ood (0.2.0, the snapshot in docs/notes, and 0.4.0, the
version installed for the benchmark, which fixed several of 0.2.0's deviations).
"""

from .base import SCORES, FeatureSet, Score, create_score
from .ebo import EBO
from .gen import GEN
from .gradnorm import GradNorm
from .gram import Gram
from .klm import KLM
from .knn import KNN
from .mds import MDS
from .mls import MLS
from .msp import MSP
from .odin import ODIN
from .react import ReAct
from .vim import ViM

__all__ = [
    "SCORES", "FeatureSet", "Score", "create_score",
    "MSP", "MLS", "EBO", "ODIN", "MDS", "KLM", "Gram", "ReAct", "GradNorm", "ViM", "KNN", "GEN",
]
