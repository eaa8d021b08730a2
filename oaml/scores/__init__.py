"""Post-hoc OOD scores (higher = more in-distribution). Importing this package fills ``SCORES``.

Fit splits: MSP, MLS, EBO, ODIN, GEN, GradNorm, Entropy, WEBO, LTS: none; MDS, ViM, KNN, Gram,
RMD, GMM, OpenMax, pNML: ID train; ReAct, KLM, TScaling: ID val (``Score.fit_on``).

Each class docstring gives the formula, paper, defaults, fit split and the differences from
OpenOOD (HEAD 3c35632) and pytorch-ood (0.2.0, the snapshot in docs/notes, and 0.4.0, the
version installed for the benchmark, which fixed several of 0.2.0's deviations).
"""

from .base import SCORES, FeatureSet, Score, create_score
from .ash import ASHB, ASHP, ASHS
from .dice import DICE
from .ebo import EBO
from .entropy import Entropy
from .fdbd import FDBD
from .gen import GEN
from .gmm import GMM
from .gradnorm import GradNorm
from .grad_uncertainty import GradUncertainty
from .gram import Gram
from .klm import KLM
from .knn import KNN
from .lts import LTS
from .mds import MDS
from .mds_multi import MDSMulti
from .mds_odin import MahalanobisODIN
from .mls import MLS
from .msp import MSP
from .nac import NAC
from .nci import NCI
from .nnguide import NNGuide
from .odin import ODIN
from .openmax import OpenMax
from .pnml import PNML
from .rankfeat import RankFeat
from .react import ReAct
from .relation import Relation
from .residual import Residual
from .rmd import RMD
from .scale import SCALE
from .she import SHE
from .tscaling import TemperatureScaling
from .vim import ViM
from .vra import VRA
from .webo import WeightedEBO

__all__ = [
    "SCORES", "FeatureSet", "Score", "create_score",
    "MSP", "MLS", "EBO", "ODIN", "MDS", "KLM", "Gram", "ReAct", "GradNorm", "ViM", "KNN", "GEN",
    "Entropy", "WeightedEBO", "TemperatureScaling", "LTS", "GMM", "OpenMax", "RMD", "PNML",
    "ASHP", "ASHB", "ASHS", "SCALE", "DICE", "SHE", "NNGuide", "NCI", "FDBD", "Relation", "Residual",
    "MDSMulti", "MahalanobisODIN", "RankFeat", "VRA", "GradUncertainty", "NAC",
]
