"""Helpers shared by the commands: the ``--set`` option, output folders. The config readers
themselves are in :mod:`oaml.config`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import ConfigError


def add_set_argument(parser: argparse.ArgumentParser, example: str = "optim.lr=0.01") -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable; VALUE is YAML)",
    )


def prepare_out(out: str | Path, resume: bool, overwrite: bool, marker: str, need_bytes: int = 0,
                resumable: bool = True) -> Path:
    """Refuse to write over earlier results unless --resume or --overwrite says what to do; fail
    at once if ``out`` cannot be written or lacks ``need_bytes`` of free space."""
    from ..utils.io import check_writable

    out = Path(out)
    if (out / marker).exists() and not resume:
        if not overwrite:
            how = "pass --resume to continue or --overwrite to replace them" if resumable else \
                "pass --overwrite to replace them or choose another --out"
            raise ConfigError(f"{out} already holds results ({marker}); {how}")
        check_writable(out, need_bytes)  # before deleting anything
        remove_outputs(out, TRAIN_OUTPUTS)
    return check_writable(out, need_bytes)


#: what each command writes into its --out; --overwrite removes these and nothing else
TRAIN_OUTPUTS = ("last.pt", "best.pt", "log.csv", "summary.json", "config.yaml", "tensorboard")
PIPELINE_OUTPUTS = ("config.yaml", "report.md", "report.json", "teacher", "banks", "students", "eval")
BENCH_OUTPUTS = ("config.yaml", "results.md", "results.json", "plots", "shared", "runs")


def remove_outputs(out: str | Path, names) -> None:
    """``--overwrite``: delete the entries of ``out`` that the command writes (``names``), and only
    those; anything else in the folder (the user's own files) is kept and listed in the log."""
    import logging

    out = Path(out)
    if not out.is_dir():
        return
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    kept = sorted(q.name for q in out.iterdir())
    if kept:
        logging.getLogger(__name__).info("--overwrite kept what oaml did not write in %s: %s", out, ", ".join(kept))


DATA_ROOT_HELP = "data root (default: $OAML_DATA or ~/.cache/oaml/data)"
DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)"

# The registered post-hoc scores (oaml.scores.SCORES, checked by tests/test_cli_ux.py), listed here
# so that `oaml eval --help` does not import torch.
SCORE_HELP = {
    "msp": "max softmax probability, no fit",
    "mls": "max logit, no fit",
    "ebo": "energy, no fit",
    "odin": "tempered, input-perturbed softmax, no fit",
    "gen": "generalized entropy, no fit",
    "gradnorm": "gradient norm of KL to uniform, no fit",
    "mds": "Mahalanobis distance, fits on ID train",
    "vim": "virtual logit matching, fits on ID train",
    "knn": "K-th neighbour distance, fits on ID train",
    "gram": "Gram-matrix deviations, fits on ID train",
    "react": "energy of clipped features, fits on ID val",
    "klm": "KL matching, fits on ID val",
    "entropy": "negative softmax entropy, no fit",
    "webo": "weighted energy (VOS class weights; all ones = energy), no fit",
    "tscaling": "softmax at the NLL-fitted temperature, fits on ID val",
    "lts": "energy of logits scaled by the activation shape, no fit",
    "gmm": "class-conditional Gaussian mixture likelihood, fits on ID train",
    "openmax": "OpenMax known-vs-unknown log-odds, fits on ID train",
    "rmd": "relative Mahalanobis distance, fits on ID train",
    "pnml": "negative pNML regret of the last layer, fits on ID train",
    "ash_p": "energy after pruning the smallest activations (ASH-P), no fit",
    "ash_b": "energy after binarising the top activations (ASH-B), no fit",
    "ash_s": "energy after pruning and exponential scaling (ASH-S), no fit",
    "scale": "energy of logits scaled by the top-activation share (SCALE), no fit",
    "dice": "energy through a sparsified last layer, fits on ID train",
    "she": "similarity to class-mean stored patterns, fits on ID train",
    "nnguide": "energy guided by nearest ID neighbours, fits on ID train",
    "nci": "neural-collapse alignment to the class weight, fits on ID train",
    "fdbd": "feature distance to decision boundaries, fits on ID train",
    "relation": "neural relation graph similarity to ID, fits on ID train",
    "residual": "norm of the feature outside the principal subspace, fits on ID train",
    "mds_multi": "Mahalanobis summed over inner layers, fits on ID train",
    "mds_odin": "Mahalanobis after input perturbation (needs the model), fits on ID train",
    "rankfeat": "energy after removing the rank-1 feature-map component (needs the model), no fit",
    "vra": "energy of variationally rectified inner activations (needs the model), fits on ID train",
    "grad_uncertainty": "gradient norm of the predicted-class loss (needs the model), no fit",
    "nac": "neuron activation coverage of inner layers (needs the model), fits on ID train",
}


def scores_help() -> str:
    """Help text for a ``--scores`` option: the score names, what each is, and 'all'."""
    return ("comma-separated score names; 'default' (the paper's 11 and mls: msp, odin, mds, klm, gram, react, gradnorm, vim, "
            "knn, gen, ebo, mls) or 'all' (every score below): " + ", ".join(f"{k} ({v})" for k, v in SCORE_HELP.items()))


def add_progress_argument(parser: argparse.ArgumentParser, default: bool | None = True) -> None:
    """``--no-progress``: main() turns every progress bar and stage line off (oaml.utils.progress)."""
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=default,
                        help="no progress bars or stage lines (without a terminal they are plain lines every 30 s)")
