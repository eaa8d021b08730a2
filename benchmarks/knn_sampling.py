"""Benchmark: oaml's k-NN boundary sampler (torch and faiss backends) against the authors' algorithm.

    .venv/bin/python benchmarks/knn_sampling.py [--sizes ref,large] [--R-ref 2] [--R-large 1]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/knn_sampling.py --sizes imagenet   # ImageNet-size run

Sizes (paper defaults K=300, S=50, N=1500, sigma=0.07, m=2; every contender gets the same R, so
the output sizes are equal: classes * R * S * m vectors of dim 768):
  ref    10 classes x   500 x 768  (the authors' CIFAR-10 bank shape; they used R=10)
  large  10 classes x 5,000 x 768  (all 5,000 vectors of each class are used)
  imagenet  1,000 classes x 1,281 x 768 (ImageNet-1k's train set shape; a 3.9 GB bank of random
         data), faiss flat backend only, R=1, every class's 1,281 vectors used unless
         --fpc-imagenet says otherwise. The authors' algorithm is not run at this size: their
         driver loads the whole (1000, 1281, 768) feature file (3.9 GB) into memory at once.

Contenders, each in a FRESH worker process (so that peak memory is its own):
  oaml-torch  sample_outliers(backend="torch"): reads the ID bank class by class, writes a C-OOD bank
  oaml-faiss  sample_outliers(backend="faiss", faiss_index="flat")
  authors     the authors' release re-implemented faithfully on the CPU (their code is CUDA-only):
              DreamOOD/NPOS KNN.py `generate_outliers` with a faiss IndexFlatL2, their driver loop
              (MultivariateNormal noise of 1500 draws shared by the 50 boundary points, the
              `view(length, -1)` scrambled selection, index reset per call), the whole (C, n, 768)
              feature file loaded in memory, outputs kept in a list, scaled by the anchor norm,
              stacked and np.save'd at the end.

Time: wall clock of the sampling call in the worker (input already on disk; output written).
Memory: peak resident set size of the worker, VmHWM from /proc/self/status (the same number as
resource.getrusage(RUSAGE_SELF).ru_maxrss), in MiB; it includes about 0.5 GB of torch/faiss
libraries, so the script also reports `working_mib` = peak minus the RSS just before sampling, and
the peak after the first class (`hwm_first_class_mib`): a sampler whose memory does not depend on
the number of classes has the same peak after 1 class as after all of them.

Roofline: the candidates' distances are C*R*S*N*n*768*2 FLOP (1.15 TFLOP at the ref size with R=2; the
boundary pass adds n/(R*S*N) of that). Each worker also measures, in its own process after the run (and
after its memory figures were read), the fp32 GEMM peak on the same shapes: a plain torch.mm of (rows, 768)
queries by the (768, n) class matrix for rows 256/1024/4096 on torch's threads, and with T threads also T
single-thread GEMMs at once (how oaml's workers run); the best is `gemm_peak_gflops`. Each run reports
`gflops_achieved` (candidate FLOP / wall seconds), `roofline_seconds` (candidate FLOP / peak) and
`roofline_ratio` (wall seconds / roofline seconds; 1.0 = every cycle a GEMM), and `roofline_ratio_cpu`, the same
in CPU seconds (peak per CPU second; less sensitive to other jobs). --no-roofline skips this.

The float32 roofline is the bound of a float32 search. oaml-torch screens most candidates with a bfloat16
GEMM where the CPU has native bfloat16 (``bf16_screen`` in its run; exact output all the same, see
oaml.outliers.knn), so it can run below that roofline; ``bf16_mm_1024_gflops`` is the bfloat16 rate
on the same shape, for reference.

Results: printed, and written to benchmarks/results/knn_sampling.json (sizes not rerun are kept).
Measured at the imagenet size on this project's 2-core machine (one thread, shared with other
jobs): 4,634 s wall (77 min), 4,373 s CPU, i.e. 4.4 s per class and repeat; peak RSS 1,093 MiB
(560 MiB above the libraries), reached after about 330 classes and flat from there (the per-class
working set plus one output shard of up to 32k vectors; the 3.9 GB bank is never in memory).
The paper's R=25 would take 25 times as long on one core; faiss uses every core it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = dict(K=300, S=50, N=1500, sigma=0.07, m=2)
SIZES = {"ref": (10, 500, 768), "large": (10, 5000, 768), "imagenet": (1000, 1281, 768),
         "tiny": (2, 400, 768)}  # tiny: smoke test


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def make_data(folder: Path, classes: int, n: int, d: int, seed: int = 0, authors_file: bool = True) -> None:
    """Synthetic 'teacher features': per class a mean direction, a low-rank spread and isotropic noise.

    Writes the oaml bank and, with ``authors_file``, the same data as the authors' (C, n, d) .npy file."""
    from oaml.outliers.bank import BankWriter

    rng = np.random.default_rng(seed)
    arr = np.lib.format.open_memmap(folder / "id_feat.npy", mode="w+", dtype=np.float32, shape=(classes, n, d)) \
        if authors_file else None
    with BankWriter(folder / "id_bank", "id_features", d, {"teacher": "synthetic", "dataset": f"bench-{classes}x{n}x{d}"},
                    resume=False, overwrite=True) as w:
        for c in range(classes):
            mu = rng.normal(size=d) * 0.6
            basis = rng.normal(size=(16, d))
            x = mu + rng.normal(size=(n, 16)) @ basis * 0.25 + rng.normal(size=(n, d))
            x = x.astype(np.float32)
            if arr is not None:
                arr[c] = x
            w.add(x, np.full(n, c, np.int64))
    if arr is not None:
        arr.flush()
        del arr
    np.save(folder / "anchors.npy", rng.normal(size=(classes, d)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# the authors' algorithm (DreamOOD/NPOS KNN.py + get_embed_*.py driver), CPU, faithful
# ----------------------------------------------------------------------------------------------
def authors_run(data: Path, out: Path, R: int, hwm: list) -> None:
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401  (as in their KNN.py: faiss on torch tensors)
    import torch
    import torch.nn.functional as F
    from torch.distributions import MultivariateNormal

    def KNN_dis_search_decrease(target, index, K=50, select=1, shift=0):
        target_norm = torch.norm(target, p=2, dim=1, keepdim=True)
        normed_target = target / target_norm
        distance, output_index = index.search(normed_target, K)
        k_th_distance = distance[:, -1]
        if shift:
            k_th_distance, minD_idx = torch.topk(-k_th_distance, select)
        else:
            k_th_distance, minD_idx = torch.topk(k_th_distance, select)
        return minD_idx, k_th_distance

    def KNN_dis_search_distance(target, index, K=50, num_points=10, length=2000, depth=342, shift=0):
        target_norm = torch.norm(target, p=2, dim=1, keepdim=True)
        normed_target = target / target_norm
        distance, output_index = index.search(normed_target, K)
        k_th_distance = distance[:, -1]
        k_th = k_th_distance.view(length, -1)  # the scramble: blocks are (pic_nums, length), not (length, -1)
        if shift:
            k_th_distance, minD_idx = torch.topk(-k_th, num_points, dim=0)
        else:
            k_th_distance, minD_idx = torch.topk(k_th, num_points, dim=0)
        minD_idx = minD_idx.squeeze()
        point_list = []
        if len(minD_idx.size()) == 1:
            minD_idx = minD_idx.reshape(-1, 1)
        for i in range(minD_idx.shape[1]):
            point_list.append(i * length + minD_idx[:, i])
        return target[torch.cat(point_list)]

    def generate_outliers(ID, input_index, negative_samples, ID_points_num=2, K=20, select=1, cov_mat=0.1,
                          sampling_ratio=1.0, pic_nums=30, depth=342, shift=0):
        length = negative_samples.shape[0]
        data_norm = torch.norm(ID, p=2, dim=1, keepdim=True)
        normed_data = ID / data_norm
        rand_ind = np.random.choice(normed_data.shape[0], int(normed_data.shape[0] * sampling_ratio), replace=False)
        index = input_index
        index.add(normed_data[rand_ind])
        minD_idx, k_th = KNN_dis_search_decrease(ID, index, K, select, shift=shift)
        boundary_data = ID[minD_idx]
        minD_idx = minD_idx[np.random.choice(select, int(pic_nums), replace=False)]
        data_point_list = torch.cat([ID[i:i + 1].repeat(length, 1) for i in minD_idx])
        negative_sample_cov = cov_mat * negative_samples.repeat(pic_nums, 1)  # .cuda() dropped: CPU run
        negative_sample_list = F.normalize(negative_sample_cov + data_point_list, p=2, dim=1)
        point = KNN_dis_search_distance(negative_sample_list, index, K, ID_points_num, length, depth, shift=shift)
        index.reset()
        return point, boundary_data

    np.random.seed(0)
    torch.manual_seed(0)
    KNN_index = faiss.IndexFlatL2(768)
    anchor = torch.from_numpy(np.load(data / "anchors.npy"))
    data_dict = torch.from_numpy(np.load(data / "id_feat.npy"))  # the whole feature file in memory
    num_classes = data_dict.shape[0]
    ood_samples = []
    for index in range(num_classes):
        ID = F.normalize(data_dict[index], p=2, dim=1)
        for index1 in range(R):
            new_dis = MultivariateNormal(torch.zeros(768), torch.eye(768))
            negative_samples = new_dis.rsample((1500,))
            sample_point1, boundary_point = generate_outliers(
                ID, input_index=KNN_index, negative_samples=negative_samples, ID_points_num=PAPER["m"],
                K=PAPER["K"], select=PAPER["S"], cov_mat=PAPER["sigma"], sampling_ratio=1.0, pic_nums=PAPER["S"],
                depth=768, shift=0)
            sample_point = sample_point1 if index1 == 0 else torch.cat([sample_point, sample_point1], 0)
        ood_samples.append(sample_point * anchor[index].norm())
        hwm.append(_status_mib("VmHWM"))
    np.save(out / "authors_outliers.npy", torch.stack(ood_samples).cpu().data.numpy())


def oaml_run(data: Path, out: Path, R: int, backend: str, hwm: list, fpc: int | None = None) -> None:
    import oaml.outliers.knn as knn

    real = knn.sample_class_outliers

    t0 = time.perf_counter()

    def tracked(*a, **k):
        v = real(*a, **k)
        hwm.append(_status_mib("VmHWM"))
        if len(hwm) % 50 == 0:  # progress of long runs, on stderr
            print(f"  {len(hwm)} classes, {time.perf_counter() - t0:.0f} s, peak RSS {hwm[-1]:.0f} MiB",
                  file=sys.stderr, flush=True)
        return v

    knn.sample_class_outliers = tracked
    cfg = knn.KNNSamplerConfig(**PAPER, R=R, features_per_class=fpc, backend=backend, faiss_index="flat",
                               device="cpu", seed=0)
    knn.sample_outliers(data / "id_bank", out / f"cood_{backend}", cfg, progress=False, resume=False, overwrite=True)


def roofline(C: int, R: int, n: int, d: int, seconds: float, cpu_seconds: float, gemm: dict | None) -> dict:
    """FLOP count of the candidates' distances, C*R*S*N*n*d*2 (the issue's ~1.15 TFLOP at the ref size; the
    boundary pass, C*n*n*d*2, is left out: n/(R*S*N) of it), the rate achieved and the ratio to the roofline,
    in wall time (peak: GFLOP per wall second) and in CPU time (peak: GFLOP per CPU second of the GEMM threads,
    less sensitive to other jobs on a shared machine)."""
    flop = 2.0 * C * R * PAPER["S"] * PAPER["N"] * n * d
    out = {"candidate_gflop": flop / 1e9, "gflops_achieved": flop / seconds / 1e9}
    if gemm:
        out["roofline_seconds"] = flop / (gemm["peak"] * 1e9)
        out["roofline_ratio"] = seconds / out["roofline_seconds"]
        out["roofline_cpu_seconds"] = flop / (gemm["peak_per_cpu_second"] * 1e9)
        out["roofline_ratio_cpu"] = cpu_seconds / out["roofline_cpu_seconds"]
    return out


def gemm_peak(n: int, d: int, seconds: float = 1.5) -> dict:
    """The fp32 GEMM rate this process reaches on the search's shapes: a plain torch.mm of a (rows, d) block
    of queries by the (d, n) class matrix, rows in 256, 1024, 4096 (the sampler's similarity blocks are
    256-1024 rows), on torch's intra-op threads; and, with T > 1 threads, T such GEMMs at once on T Python
    threads of one intra-op thread each (how the sampler's workers run). ``peak``: the best GFLOP per wall
    second; ``peak_per_cpu_second``: the best GFLOP per CPU second (user+sys of the process)."""
    import threading

    import torch

    def rate(rows: int, stop: float) -> tuple[float, float]:  # (GFLOP done, wall seconds)
        q, zt, o = torch.randn(rows, d), torch.randn(d, n), torch.empty(rows, n)
        torch.mm(q, zt, out=o)  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < stop:
            torch.mm(q, zt, out=o)
            reps += 1
        return 2.0 * rows * d * n * reps / 1e9, time.perf_counter() - t0

    def timed(fn) -> tuple[float, float]:
        c0 = time.process_time()
        gflop, wall = fn()
        return gflop / wall, gflop / max(time.process_time() - c0, 1e-9)

    threads = torch.get_num_threads()
    res = {f"mm_{rows}x{d}x{n}_{threads}thr": timed(lambda: rate(rows, seconds / 4)) for rows in (256, 1024, 4096)}
    if threads > 1:
        torch.set_num_threads(1)
        done = [(0.0, 1.0)] * threads

        def one(i: int) -> None:
            torch.set_num_threads(1)
            done[i] = rate(1024, seconds / 4)

        def together() -> tuple[float, float]:
            ts = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            return sum(g for g, _ in done), time.perf_counter() - t0

        res[f"mm_1024x{d}x{n}_{threads}x1thr_concurrent"] = timed(together)
        torch.set_num_threads(threads)
    out = {"peak": max(w for w, _ in res.values()), "peak_per_cpu_second": max(c for _, c in res.values()),
           "shapes_gflops_wall_cpu": res, "threads": threads}
    # for reference: the bfloat16 GEMM rate on the same shape (the torch sampler's screen, where the CPU has it)
    qb, zb = torch.randn(1024, d).bfloat16(), torch.randn(d, n).bfloat16()
    torch.mm(qb, zb)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4:
        torch.mm(qb, zb)
        reps += 1
    out["bf16_mm_1024_gflops"] = 2.0 * 1024 * d * n * reps / 1e9 / (time.perf_counter() - t0)
    return out


def worker(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (libraries loaded before the baseline is taken)
    import faiss  # noqa: F401
    import oaml.outliers.knn  # noqa: F401

    import resource

    data, out = Path(args.data), Path(args.out_dir)
    hwm: list = []
    base = _status_mib("VmRSS")
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if args.worker == "authors":
        authors_run(data, out, args.R, hwm)
    else:
        oaml_run(data, out, args.R, args.worker.split("-", 1)[1], hwm, args.fpc)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    peak = _status_mib("VmHWM")
    hwm_per_class = [round(h, 1) for i, h in enumerate(hwm) if len(hwm) <= 50 or (i + 1) % 50 == 0 or i == len(hwm) - 1]
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    gemm = None
    if args.n_used:  # in this process, after the memory figures were read; twice, the better (the load varies)
        gemm = max(gemm_peak(args.n_used, args.dim), gemm_peak(args.n_used, args.dim), key=lambda g: g["peak"])
    import oaml.outliers.knn as knn

    screen = args.worker == "oaml-torch" and (knn._bf16_gemm_native() if knn.BF16_SCREEN == "auto" else bool(knn.BF16_SCREEN))
    print(json.dumps({
        "bf16_screen": screen,
        "gemm_peak_gflops": gemm["peak"] if gemm else None, "gemm_peak_detail": gemm,
        "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak, "baseline_rss_mib": base, "working_mib": peak - base,
        "ru_maxrss_mib": maxrss,
        "hwm_first_class_mib": hwm[0] if hwm else None,
        # every class up to 50; beyond, every 50th class and the last
        "hwm_per_class_mib": hwm_per_class,
    }))


# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="ref,large")
    ap.add_argument("--R-ref", type=int, default=2, help="repeats at the ref size (paper: 10), same for all")
    ap.add_argument("--R-large", type=int, default=1, help="repeats at the large size, same for all")
    ap.add_argument("--classes-large", type=int, default=10,
                    help="classes at the large size (default 10; fewer only to fit a slow shared machine, reported)")
    ap.add_argument("--classes-imagenet", type=int, default=1000,
                    help="classes at the imagenet size (default 1000; fewer to time a part and extrapolate, reported)")
    ap.add_argument("--R-imagenet", type=int, default=1, help="repeats at the imagenet size (paper: 25)")
    ap.add_argument("--fpc-imagenet", type=int, default=None,
                    help="ID vectors used per class at the imagenet size (default: all 1,281; the authors used 500)")
    ap.add_argument("--contenders", default="authors,oaml-torch,oaml-faiss",
                    help="for ref/large; the imagenet size runs oaml-faiss only")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knn_sampling.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    ap.add_argument("--R", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fpc", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n-used", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-roofline", action="store_true",
                    help="skip the GEMM peak measurement (a few seconds per contender) and the roofline ratios")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    results = {
        "what": "k-NN boundary sampling (C-OOD): oaml vs the authors' algorithm, equal output size",
        "settings": PAPER,
        "memory": "peak RSS = VmHWM of a fresh worker process per contender (== getrusage ru_maxrss), MiB; "
                  "working = peak - RSS before sampling (libraries loaded)",
        "time": "wall seconds of the sampling call, input on disk, output written to disk; cpu_seconds = "
                "user+sys CPU time of the same call (less sensitive to other jobs on the shared machine)",
        "roofline": "candidate_gflop = C*R*S*N*n*d*2 (the candidates' distances); gflops_achieved = that / wall "
                    "seconds; gemm_peak_gflops = best plain torch.mm rate on the same shapes in the contender's own "
                    "process (after its run); roofline_ratio = wall seconds / (candidate_gflop / peak); "
                    "roofline_ratio_cpu = the same in CPU seconds (peak per CPU second of the GEMM)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_avg_start": os.getloadavg(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "runs": [],
    }
    sizes = args.sizes.split(",")
    if "imagenet" in sizes:
        results["imagenet_note"] = (
            "imagenet size: oaml-faiss only (flat index, exact), paper settings K=300 S=50 N=1500 sigma=0.07 m=2 "
            "with R=1 (paper: 25), all 1,281 vectors per class, one thread (OMP_NUM_THREADS=1). The authors' "
            "algorithm is not run at this size: their driver loads the whole (1000, 1281, 768) feature file, "
            "3.9 GB, into memory. The cost is linear in classes and R: R=25 takes 25 times as long."
        )
    out_file = Path(args.out)
    if out_file.is_file():  # keep earlier results of the sizes not rerun now
        old = json.loads(out_file.read_text())
        results["runs"] = [r for r in old.get("runs", []) if r.get("size") not in sizes]
        results["earlier_machine"] = old.get("machine")
        for key in ("imagenet_note",):
            if key in old:
                results[key] = old[key]
    for size in sizes:
        C, n, d = SIZES[size]
        if size == "large":
            C = args.classes_large
        if size == "imagenet":
            C = args.classes_imagenet
        R = {"large": args.R_large, "imagenet": args.R_imagenet}.get(size, args.R_ref)
        fpc = args.fpc_imagenet if size == "imagenet" else None
        contenders = ["oaml-faiss"] if size == "imagenet" else args.contenders.split(",")
        with tempfile.TemporaryDirectory(prefix=f"knnbench-{size}-") as tmp:
            tmp = Path(tmp)
            t_data = time.perf_counter()
            make_data(tmp, C, n, d, authors_file="authors" in contenders)
            print(f"[{size}] data: {C} x {n} x {d} written in {time.perf_counter() - t_data:.0f} s", flush=True)
            rows = {}
            for name in contenders:
                n_used = min(n, fpc) if fpc else n
                cmd = [sys.executable, __file__, "--worker", name, "--data", str(tmp), "--out-dir", str(tmp),
                       "--R", str(R)] + (["--fpc", str(fpc)] if fpc else []) + \
                      ([] if args.no_roofline else ["--n-used", str(n_used), "--dim", str(d)])
                p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # stderr: progress, errors
                if p.returncode != 0:
                    raise SystemExit(f"{name} failed (see its stderr above)")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r.update(contender=name, size=size, classes=C, n_per_class=n, dim=d, R=R,
                         features_per_class_used=fpc or n, omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                         output_vectors=C * R * PAPER["S"] * PAPER["m"], load_avg_after=os.getloadavg())
                r.update(roofline(C, R, n_used, d, r["seconds"], r["cpu_seconds"], r["gemm_peak_detail"]))
                rows[name] = r
                print(f"[{size} {C}x{n}x{d} R={R}] {name:11s} {r['seconds']:8.1f} s wall {r['cpu_seconds']:8.1f} s CPU   peak RSS {r['peak_rss_mib']:7.0f} MiB"
                      f"   working {r['working_mib']:6.0f} MiB   HWM after class 1 {r['hwm_first_class_mib']:.0f} MiB",
                      flush=True)
                if r["gemm_peak_gflops"]:
                    print(f"    {'':11s} {r['candidate_gflop']:.0f} GFLOP of candidate distances: {r['gflops_achieved']:.1f} "
                          f"GFLOP/s achieved, GEMM peak {r['gemm_peak_gflops']:.1f} GFLOP/s in the same process "
                          f"({r['gemm_peak_detail']['threads']} threads) -> roofline {r['roofline_seconds']:.1f} s, "
                          f"run = x{r['roofline_ratio']:.2f} of it (in CPU time: x{r['roofline_ratio_cpu']:.2f})",
                          flush=True)
            if "authors" in rows:
                ref = rows["authors"]
                for r in rows.values():
                    r["time_ratio_vs_authors"] = r["seconds"] / ref["seconds"]
                    r["speedup_vs_authors"] = ref["seconds"] / r["seconds"]
                    r["cpu_speedup_vs_authors"] = ref["cpu_seconds"] / r["cpu_seconds"]
                    r["working_mem_ratio_vs_authors"] = r["working_mib"] / ref["working_mib"]
                    print(f"    {r['contender']:11s} speed-up x{r['speedup_vs_authors']:.2f} wall, "
                          f"x{r['cpu_speedup_vs_authors']:.2f} CPU   "
                          f"working memory x{r['working_mem_ratio_vs_authors']:.2f} of the authors'")
            results["runs"].extend(rows.values())
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # after every size
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
