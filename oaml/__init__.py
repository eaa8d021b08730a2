"""oaml: Outlier Aware Metric Learning for out-of-distribution detection.

The package follows the pipeline's data flow:

    data -> models (teacher, student) -> outliers (feature bank, C-OOD, D-OOD)
         -> losses + training -> scores -> evaluation -> cli

Convention used everywhere: a post-hoc OOD score is *higher for more in-distribution* inputs.

``oaml.evaluate(model, benchmark_or_datasets, scores=[...])`` evaluates any torch classifier
(:func:`oaml.evaluation.evaluate`); it is imported on first use, so ``import oaml`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["evaluate", "__version__"]


def __getattr__(name: str):
    if name == "evaluate":
        from .evaluation.api import evaluate

        return evaluate
    raise AttributeError(f"module 'oaml' has no attribute {name!r}")
