"""Compare two runs' loss curves the way AscendSpeed judged NPU against GPU: mean and max
relative and absolute error over the iterations both runs logged; pass when the mean
relative error is within ``--rel-threshold`` (2 %) and the mean absolute error within
``--abs-threshold`` (0.005).

    python -m recipes.compare_loss RUN_A.jsonl RUN_B.jsonl [--plot out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipes.errors import ArgumentParser, BadInput, MissingInput


def read_losses(path) -> dict:
    out = {}
    p = Path(path)
    if not p.is_file():
        raise MissingInput(f"metrics file not found: {path}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not a text metrics file (byte {e.start} is not UTF-8); give the run's "
                       "metrics.jsonl") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            it, loss = int(rec["iteration"]), rec["loss"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(f"{path}:{n}: not a metrics record with iteration and loss ({e})") from None
        if loss is None:
            continue
        out[it] = float(loss)  # a resumed run may log an iteration twice: the last one wins
    if not out:
        raise BadInput(f"{path}: no losses")
    return out


def compare(a: dict, b: dict) -> dict:
    common = sorted(set(a) & set(b))
    if not common:
        raise BadInput("the two runs share no logged iteration")
    abs_err = [abs(a[i] - b[i]) for i in common]
    rel_err = [abs(a[i] - b[i]) / abs(b[i]) if b[i] else float("inf") for i in common]
    return {"iterations": len(common), "first": common[0], "last": common[-1],
            "mean_abs": sum(abs_err) / len(abs_err), "max_abs": max(abs_err),
            "mean_rel": sum(rel_err) / len(rel_err), "max_rel": max(rel_err),
            "max_abs_at": common[abs_err.index(max(abs_err))], "common": common}


def plot(a: dict, b: dict, result: dict, out: str, names=("A", "B")):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = result["common"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(sorted(a), [a[i] for i in sorted(a)], label=names[0], linewidth=1.5)
    ax1.plot(sorted(b), [b[i] for i in sorted(b)], label=names[1], linewidth=1.0, linestyle="--")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title(f"mean rel err {100 * result['mean_rel']:.3f}%, mean abs err {result['mean_abs']:.5f}")
    ax2.plot(its, [abs(a[i] - b[i]) for i in its], color="tab:red", label="|A - B|")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("abs error")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_a", help="metrics.jsonl of the first run")
    p.add_argument("run_b", help="metrics.jsonl of the second run")
    p.add_argument("--rel-threshold", type=float, default=0.02, help="largest relative loss difference that passes")
    p.add_argument("--abs-threshold", type=float, default=0.005, help="largest absolute loss difference that passes")
    p.add_argument("--plot", default=None, help="write both loss curves to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        a, b = read_losses(args.run_a), read_losses(args.run_b)
        r = compare(a, b)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = r["mean_rel"] <= args.rel_threshold and r["mean_abs"] <= args.abs_threshold
    print(f"{r['iterations']} common iterations ({r['first']}..{r['last']})")
    print(f"relative error: mean {100 * r['mean_rel']:.4f}%  max {100 * r['max_rel']:.4f}%  (threshold {100 * args.rel_threshold:g}%)")
    print(f"absolute error: mean {r['mean_abs']:.6f}  max {r['max_abs']:.6f} at iteration {r['max_abs_at']}  "
          f"(threshold {args.abs_threshold:g})")
    if args.plot:
        names = [Path(args.run_a).stem, Path(args.run_b).stem]
        if names[0] == names[1]:  # e.g. two runs' metrics.jsonl: name them by folder
            names = [f"{Path(x).parent.name}/{Path(x).stem}" for x in (args.run_a, args.run_b)]
        plot(a, b, r, args.plot, names)
        print(f"plot: {args.plot}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
