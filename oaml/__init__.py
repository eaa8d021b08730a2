"""oaml: Outlier Aware Metric Learning for out-of-distribution detection.

The package follows the pipeline's data flow:

    data -> models (teacher, student) -> outliers (feature bank, C-OOD, D-OOD)
         -> losses + training -> scores -> evaluation -> cli

Convention used everywhere: a post-hoc OOD score is *higher for more in-distribution* inputs.
"""

__version__ = "0.1.0"
