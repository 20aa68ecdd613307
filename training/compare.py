"""Paired comparison of two models on the same patients: is a difference more than noise?

    python -m training.compare training/results/validation-A.json training/results/validation-B.json \\
        --model hn_oar [--json training/results/compare-A-vs-B.json]

Reads the per-patient headline Dice that ``training.evaluate --json`` records (partial-length
organs on the reference's slices) and reports, per structure and for the headline mean over
structures, the mean difference B - A with a 95 % paired bootstrap interval: patients are
resampled with replacement and both models keep their own figures for each drawn patient,
so what varies between patients (how hard they are) cancels and what remains is the models'
difference.  With the 33 validation patients the headline's interval was +-0.004-0.006 wide:
a release decision on a smaller gain is a decision on noise.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from training.evaluate import PER_PATIENT as KEY  # the field training.evaluate --json writes


def paired_bootstrap(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], resamples: int = 10000, seed: int = 0
) -> dict:
    """``a``, ``b``: patient -> structure -> Dice.  Only (patient, structure) pairs both have
    are compared.  Returns per structure and for the headline (mean over structures of the
    per-structure means) the mean difference b - a, its 95 % bootstrap interval, and how many
    patients are better / worse with b."""
    patients = sorted(set(a) & set(b))
    if not patients:
        raise ValueError("the two results share no patient: were they measured on the same data?")
    structures = sorted({s for p in patients for s in a[p] if s in b[p]})
    # (patients, structures) arrays of differences, NaN where a patient lacks the structure
    diff = np.full((len(patients), len(structures)), np.nan)
    for i, p in enumerate(patients):
        for j, s in enumerate(structures):
            if s in a[p] and s in b[p]:
                diff[i, j] = b[p][s] - a[p][s]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(resamples, len(patients)))
    boot = np.empty((resamples, len(structures)))
    with warnings.catch_warnings():  # a structure that no drawn patient has: NaN, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        for r in range(resamples):
            boot[r] = np.nanmean(diff[draws[r]], axis=0)
        headline = np.nanmean(boot, axis=1)
    out: dict = {"patients": len(patients), "resamples": resamples, "structures": {}}
    for j, s in enumerate(structures):
        d = diff[:, j][np.isfinite(diff[:, j])]
        lo, hi = np.nanpercentile(boot[:, j], [2.5, 97.5])
        out["structures"][s] = {
            "cases": int(d.size), "mean_difference": round(float(d.mean()), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "better": int((d > 0).sum()), "worse": int((d < 0).sum()),
        }
    observed = float(np.mean([out["structures"][s]["mean_difference"] for s in structures]))
    lo, hi = np.percentile(headline, [2.5, 97.5])
    out["headline"] = {"mean_difference": round(observed, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)]}
    return out


def verdict(result: dict) -> str:
    """One line: which model the interval favours, and any structure reliably worse with B."""
    lo, hi = result["headline"]["ci95"]
    head = ("B is better" if lo > 0 else "B is worse" if hi < 0 else "no difference beyond noise")
    worse = [s for s, r in result["structures"].items() if r["ci95"][1] < 0]
    better = [s for s, r in result["structures"].items() if r["ci95"][0] > 0]
    return (f"headline {result['headline']['mean_difference']:+.4f} (95 % CI {lo:+.4f} to {hi:+.4f}): {head}; "
            f"reliably better with B: {', '.join(better) or 'none'}; reliably worse with B: {', '.join(worse) or 'none'}")


def load(path: Path, model: str) -> dict[str, dict[str, float]]:
    result = json.loads(path.read_text())
    if model not in result:
        raise SystemExit(f"{path}: no result for model {model!r} (has {', '.join(result)})")
    if KEY not in result[model]:
        raise SystemExit(f"{path}: no per-patient figures; measure it again with python -m training.evaluate --json")
    return result[model][KEY]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="training.evaluate --json of model A (the baseline)")
    ap.add_argument("b", type=Path, help="training.evaluate --json of model B (the candidate)")
    ap.add_argument("--model", default="hn_oar")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = paired_bootstrap(load(args.a, args.model), load(args.b, args.model), args.resamples)
    result = {"a": str(args.a), "b": str(args.b), "model": args.model, **result, "verdict": verdict(result)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    for s, r in result["structures"].items():
        print(f"{s:14s} {r['mean_difference']:+.4f}  [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]  "  # noqa: T201
              f"better {r['better']:2d} worse {r['worse']:2d} of {r['cases']}")
    print(result["verdict"])  # noqa: T201 - a command-line report


if __name__ == "__main__":
    main()
