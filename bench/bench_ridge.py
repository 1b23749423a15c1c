"""Benchmark llmvem's voxelwise RidgeCV against himalaya's RidgeCV: time, peak memory, agreement.

Each (method, size) runs in its own subprocess so its peak resident memory (``ru_maxrss``) is its own. Both
methods get the same synthetic data (seeded), the same 10 alphas, the same 5 unshuffled folds and R² scoring
(himalaya: ``solver_params=dict(score_func=r2_score)`` on its torch backend when available, on CPU).

Usage::

    python bench/bench_ridge.py                       # default sizes, about 1-3 minutes on 2 cores
    python bench/bench_ridge.py --sizes 2000x20000x512 --sizes 5000x20000x1024
    python bench/bench_ridge.py --nsd                 # adds 9841 x 39548 x 2048 (llmvem only; slow on CPU)
    python bench/bench_ridge.py --nsd --nsd-himalaya  # ... and himalaya at NSD size too (very slow on CPU)

Sizes are ``n_samples x n_voxels x n_features``. Columns: seconds to fit (and predict 200 samples), peak RSS of
the whole process (GiB; includes ~0.4 GiB of Python/torch and the data), peak RSS divided by the size of the
float32 response matrix, the rise of RSS during the fit (peak minus RSS just before it), the himalaya/llmvem time
ratio, the largest absolute difference between the two models' predictions on 200 held-out samples (responses
have unit noise variance), the fraction of voxels where both chose the same alpha, and the largest prediction
difference over those voxels (where a float32 near-tie made them pick different alphas, predictions differ more).
Writes ``bench/results/ridge.json`` (``--out``; strict JSON with the provenance header, one record per method and
size).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmvem.provenance import result_header, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "ridge.json"
#: Not the package's ``DEFAULT_ALPHAS``: a 10-value grid both libraries get, so that timings compare like for like.
ALPHAS = np.logspace(-2, 7, 10)
N_TEST = 200
DEFAULT_SIZES = ["1000x5000x256", "3000x10000x512"]
NSD_SIZE = "9841x39548x2048"


def parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected n_samples x n_voxels x n_features like 1000x5000x256, got {text!r}")
    n, v, p = (int(x) for x in parts)
    return n, v, p


def make_data(n: int, v: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 features (n + N_TEST, p) and responses (n, v) = X W + noise, built block-wise to spare memory."""
    rng = np.random.default_rng(seed)
    X_all = rng.standard_normal((n + N_TEST, p), dtype=np.float32)
    X, X_test = X_all[:n], X_all[n:]
    Y = np.empty((n, v), dtype=np.float32)
    step = 4096
    for s in range(0, v, step):
        e = min(s + step, v)
        # voxel signal strength varies so that different voxels pick different alphas
        W = rng.standard_normal((p, e - s), dtype=np.float32) * (
            rng.uniform(0.0, 1.0, e - s).astype(np.float32) ** 2 / np.sqrt(p))
        Y[:, s:e] = X @ W
        Y[:, s:e] += rng.standard_normal((n, e - s), dtype=np.float32)
    return X, Y, X_test


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(method: str, size: str, out_dir: str, device: str = "cpu") -> None:
    import torch

    n, v, p = parse_size(size)
    X, Y, X_test = make_data(n, v, p)
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if method == "llmvem":
        from llmvem.model.ridge import RidgeCV

        model = RidgeCV(alphas=ALPHAS, cv=5, fit_intercept=True, device=device, progress_bar=False).fit(X, Y)
        pred = model.predict(X_test)
        best = model.best_alphas_
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    else:
        from himalaya.backend import set_backend
        from himalaya.ridge import RidgeCV as HimalayaRidgeCV
        from himalaya.scoring import r2_score

        try:
            backend = set_backend("torch_cuda" if device.startswith("cuda") else "torch", on_error="raise")
        except Exception:  # noqa: BLE001 - fall back to numpy when himalaya has no torch backend here
            backend = set_backend("numpy")
        model = HimalayaRidgeCV(alphas=ALPHAS, cv=5, fit_intercept=True,
                                solver_params=dict(score_func=r2_score)).fit(X, Y)
        pred = backend.to_numpy(model.predict(X_test))
        best = backend.to_numpy(model.best_alphas_)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(Path(out_dir) / f"{method}_pred.npy", np.asarray(pred, dtype=np.float32))
    np.save(Path(out_dir) / f"{method}_alphas.npy", np.asarray(best, dtype=np.float64))
    info = {"seconds": seconds, "peak_rss": peak, "rss_before_fit": rss_before, "y_bytes": Y.nbytes,
            "threads": torch.get_num_threads()}
    (Path(out_dir) / f"{method}.json").write_text(json.dumps(info))


def run_one(method: str, size: str, out_dir: str, timeout: float, device: str = "cpu") -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--size", size, "--worker-dir", out_dir, "--device", device]
    try:
        subprocess.run(cmd, check=True, timeout=timeout, env={**os.environ, "LLMVEM_NO_PROGRESS": "1"})
    except subprocess.TimeoutExpired:
        return {"failed": "timeout"}
    except subprocess.CalledProcessError as exc:  # e.g. killed for memory: report it, keep the other rows
        return {"failed": f"exit {exc.returncode}"}
    return json.loads((Path(out_dir) / f"{method}.json").read_text())


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", action="append", help="n_samples x n_voxels x n_features (repeatable)")
    ap.add_argument("--nsd", action="store_true", help=f"also run NSD size {NSD_SIZE} (llmvem only)")
    ap.add_argument("--nsd-himalaya", action="store_true", help="with --nsd, run himalaya at NSD size too")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and size")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both libraries run on it; GPU timings)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size, args.worker_dir, args.device)
        return None

    sizes = list(args.sizes or DEFAULT_SIZES)
    for s in sizes:
        parse_size(s)
    if args.nsd:
        sizes.append(NSD_SIZE)
    header = (f"{'size (n x vox x feat)':<24}{'method':<10}{'fit s':>9}{'peak GiB':>10}{'peak/Y':>8}"
              f"{'+fit GiB':>10}{'him/ours':>10}{'max|Δpred|':>12}{'same α':>8}{'Δ(same α)':>11}")
    print(header)
    print("-" * len(header))
    records: list[dict] = []
    ours = None
    for size in sizes:
        methods = ["llmvem", "himalaya"]
        if size == NSD_SIZE and not args.nsd_himalaya:
            methods = ["llmvem"]
        with tempfile.TemporaryDirectory() as tmp:
            res = {m: run_one(m, size, tmp, args.timeout, args.device) for m in methods}
            ours = res["llmvem"] if "failed" not in res["llmvem"] else None
            for m in methods:
                r = res[m]
                records.append({"size": size, "method": m, **r})
                if "failed" in r:
                    print(f"{size:<24}{m:<10}{r['failed']:>9}", flush=True)
                    continue
                ratio = diff = same = diff_same = ""
                if m == "himalaya" and ours is not None:
                    ratio = f"{r['seconds'] / ours['seconds']:.2f}"
                    d = np.abs(np.load(Path(tmp) / "himalaya_pred.npy") - np.load(Path(tmp) / "llmvem_pred.npy"))
                    a, b = (np.load(Path(tmp) / f"{k}_alphas.npy") for k in ("himalaya", "llmvem"))
                    agree = np.isclose(a, b, rtol=1e-4)
                    diff = f"{d.max():.2e}"
                    same = f"{np.mean(agree):.4f}"
                    diff_same = f"{d[:, agree].max():.2e}" if agree.any() else "-"
                    records[-1].update(himalaya_over_llmvem=r["seconds"] / ours["seconds"], max_abs_diff=float(d.max()),
                                       same_alpha=float(np.mean(agree)),
                                       max_abs_diff_same_alpha=float(d[:, agree].max()) if agree.any() else None)
                extra = (r["peak_rss"] - r["rss_before_fit"]) / 2**30
                print(f"{size:<24}{m:<10}{r['seconds']:>9.2f}{r['peak_rss'] / 2**30:>10.2f}"
                      f"{r['peak_rss'] / r['y_bytes']:>8.2f}{extra:>10.2f}{ratio:>10}{diff:>12}{same:>8}"
                      f"{diff_same:>11}", flush=True)
    print(f"\n{os.cpu_count()} CPU cores visible; torch threads {ours['threads'] if ours else '?'}; "
          "alphas = logspace(-2, 7, 10); 5 unshuffled folds; R² scoring; float32.")
    results = {**result_header("ridge_vs_himalaya", "bench/bench_ridge.py", argv, seeds=[0]),
               "settings": {"alphas": ALPHAS.tolist(), "folds": 5, "n_test": N_TEST, "device": args.device},
               "rows": records}
    write_results(args.out, results)
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
