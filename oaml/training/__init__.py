"""One training loop for every method: a method is a set of loss terms plus outlier sources."""

from . import oaml_method  # noqa: F401  (registers the OAML terms and methods)
from . import baselines  # noqa: F401  (registers OE, energy-OE, MixOE, LogitNorm, VOS, NPOS, MCD)
from . import udg  # noqa: F401  (registers UDG)
from .methods import METHODS, Method, MethodConfig, register_method  # noqa: F401
from .terms import TERMS, Term, TermConfig  # noqa: F401
from .trainer import Trainer  # noqa: F401
