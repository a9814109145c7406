"""Command line: ``python -m glmm_jax demo`` and ``python -m glmm_jax fit DATA.csv FORMULA``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

SEED_FORMULA = "success ~ schavg + (1 | school)"


def _demo(args) -> int:
    from . import datasets, glmer

    df = datasets.load_exam()
    print(f"Fitting the seed model on the bundled Exam data ({len(df)} students):")
    print(f"  glmer({SEED_FORMULA!r}, family='binomial')\n")
    t0 = time.perf_counter()
    m = glmer(SEED_FORMULA, df, family="binomial")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = glmer(SEED_FORMULA, df, family="binomial")
    warm = time.perf_counter() - t0
    print(m.summary())
    print(f"\nfirst fit {first:.2f} s (compilation included), second fit {warm * 1000:.1f} ms")
    return 0


def _fit(args) -> int:
    import pandas as pd

    from . import glmer

    try:
        df = pd.read_csv(args.data)
    except (OSError, pd.errors.ParserError) as exc:
        print(f"error: cannot read {args.data}: {exc}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = glmer(
                args.formula,
                df,
                family=args.family,
                link=args.link,
                weights=args.weights,
                offset=args.offset,
            )
    except (ValueError, KeyError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    print(m.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m glmm_jax`` and the ``glmm-jax`` script."""
    parser = argparse.ArgumentParser(prog="python -m glmm_jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help=f"fit the seed model {SEED_FORMULA!r} on the bundled Exam data")
    fit = sub.add_parser("fit", help="fit a model to a CSV file and print its summary")
    fit.add_argument("data", help="CSV file with a header row")
    fit.add_argument("formula", help='lme4 formula, e.g. "y ~ x + (1 | g)"')
    fit.add_argument("--family", default="binomial", help="binomial (default) or poisson")
    fit.add_argument("--link", default=None, help="link function (default: canonical)")
    fit.add_argument("--weights", default=None, help="column of prior weights / binomial trials")
    fit.add_argument("--offset", default=None, help="column added to the linear predictor")
    args = parser.parse_args(argv)
    return _demo(args) if args.command == "demo" else _fit(args)


if __name__ == "__main__":
    sys.exit(main())
