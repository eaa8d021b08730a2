"""Where do the outliers sit in the teacher's feature space? ID train (the bank), held-out ID
(ID val), C-OOD, D-OOD, the teacher-selected image outliers and the benchmark's OOD-val sets,
through :func:`oaml.outliers.analysis.analyze_outliers` (k-NN distance quantiles to the ID bank,
fraction beyond the held-out ID's 95% quantile, linear-probe AUROC).

    .venv/bin/python benchmarks/outlier_geometry.py --shared runs/bench-fmnist/shared --out benchmarks/results/outlier_geometry

``--shared`` is an ``oaml bench`` (or ``oaml run``) output folder holding ``teacher/teacher.pt``
and ``banks/{id_features,cood,dood,image_outliers}``. Writes the analysis (JSON, Markdown, plots)
into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", required=True)
    ap.add_argument("--benchmark", default="fmnist")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--max-samples", type=int, default=2000)
    a = ap.parse_args()

    from oaml.data import get_benchmark
    from oaml.models.teachers import compute_teacher_outputs, load_teacher_checkpoint
    from oaml.outliers.analysis import analyze_outliers, markdown_table
    from oaml.outliers.images import ImageOutlierSet

    shared = Path(a.shared)
    teacher = load_teacher_checkpoint(shared / "teacher" / "teacher.pt")
    bench = get_benchmark(a.benchmark)
    g = torch.Generator().manual_seed(0)

    def feats(ds):
        n = len(ds)
        if n > a.max_samples and hasattr(ds, "subset"):
            ds = ds.subset(torch.randperm(n, generator=g)[: a.max_samples].sort().values.numpy())
        return compute_teacher_outputs(teacher, ds, batch_size=256)[1]

    sets = {"id_val": feats(bench.id_val())}
    for kind in ("cood", "dood"):
        if (shared / "banks" / kind / "manifest.json").is_file():
            sets[kind] = str(shared / "banks" / kind)
    img = shared / "banks" / "image_outliers"
    if (img / "manifest.json").is_file():
        images = ImageOutlierSet(img).images[: a.max_samples]
        sets["image_outliers"] = torch.cat([teacher.outputs(images[i:i + 256])[1] for i in range(0, len(images), 256)])
    for name, ds in bench.ood_sets(("val",)).items():
        sets[name] = feats(ds)
    result = analyze_outliers(str(shared / "banks" / "id_features"), sets, k=a.k, max_samples=a.max_samples, out_dir=a.out)
    print(markdown_table(result))


if __name__ == "__main__":
    main()
