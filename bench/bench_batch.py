"""Batches of fits (issue 5): simulated responses on the seed model's design, refitted by
``refit_batch`` against a loop of the PyPI ``glmm`` package and lme4's ``refit``, in one run.

    python bench/bench_batch.py                 # 200 replicates on CPU (10,000 on a GPU)
    python bench/bench_batch.py --nsim 1000
    python bench/bench_batch.py --record        # also append the table to bench/RESULTS.md

The two Python packages are timed in alternating rounds (``--rounds``, default 5), so that a
burst of load on a shared machine falls on both: in each round, one warm ``refit_batch`` call
over all replicates (compilation excluded: a first call is discarded), divided by the number of
replicates, and a Python loop of ``glmm.fit`` over the first ``--peer-fits`` replicates (median
per fit). The table gives the median of each over the rounds and the median of the rounds'
ratios ``glmm seconds per fit / glmm_jax seconds per fit``, with their range; the target is at
least 3. lme4: ``refit`` of the fitted model to ``--peer-fits`` of its own ``simulate``-d
responses (median per fit), once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import glmm_jax as gj

HERE = Path(__file__).parent
SEED = "success ~ schavg + (1 | school)"


def glmm_per_fit(exam, Y, fits: int) -> float | None:
    try:
        import glmm
    except ImportError:
        return None
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(fits):
            df = exam.assign(success=Y[:, i])
            t0 = time.perf_counter()
            glmm.fit(df, SEED, family="binomial")
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lme4_per_fit(exam, fits: int) -> float | None:
    if shutil.which("Rscript") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "exam.csv"
        exam.to_csv(csv, index=False)
        script = f"""
suppressMessages(library(lme4))
d <- read.csv("{csv}")
d$school <- factor(d$school)
m <- glmer(success ~ schavg + (1 | school), data = d, family = binomial)
sims <- simulate(m, nsim = {fits}, seed = 1)
t <- sapply(seq_len({fits}), function(i) system.time(refit(m, sims[[i]]))[["elapsed"]])
cat(median(t), "\\n")
"""
        res = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return float(res.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--nsim", type=int, default=None, help="replicates (200 CPU, 10,000 GPU)")
    ap.add_argument("--peer-fits", type=int, default=30, help="fits timed for each peer")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of both")
    ap.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = ap.parse_args(argv)

    import jax

    backend = jax.default_backend()
    nsim = args.nsim or (200 if backend == "cpu" else 10_000)
    info = (
        f"{datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | "
        f"jax {jax.__version__} on {backend} ({len(jax.devices())} device(s)) | "
        f"glmm_jax {gj.__version__}"
    )
    exam = gj.datasets.load_exam()
    m = gj.glmer(SEED, exam)
    Y = m.simulate(nsim=nsim, seed=2026).to_numpy()
    m.refit_batch(Y, progress=False)  # compile
    fits = min(args.peer_fits, nsim)
    ours_rounds, peer_rounds = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        batch = m.refit_batch(Y, progress=False)
        ours_rounds.append((time.perf_counter() - t0) / nsim)
        p = glmm_per_fit(exam, Y, fits)
        if p is not None:
            peer_rounds.append(p)
    ours = statistics.median(ours_rounds)
    peer = statistics.median(peer_rounds) if peer_rounds else None
    ratios = [p / o for p, o in zip(peer_rounds, ours_rounds, strict=True)]
    r = lme4_per_fit(exam, fits)
    header = (
        "| case | glmm_jax s/fit | fits/s | converged | glmm s/fit | glmm / glmm_jax "
        "(range over rounds) | lme4 refit s/fit | lme4 / glmm_jax |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    ratio = (
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""
    )
    row = (
        f"| {nsim} simulated responses, seed model's design, {backend} | {ours:.5f} | "
        f"{1 / ours:.0f} | {batch.converged.mean():.3f} | {fmt(peer, '.4f')} | {ratio} | "
        f"{fmt(r, '.3f')} | {fmt(r and r / ours, '.0f')} |"
    )
    notes = []
    if peer is None:
        notes.append("glmm not measured: pip install glmm")
    if r is None:
        notes.append("lme4 not measured: Rscript with lme4 not found")
    print(info)
    print(header)
    print(row)
    for n in notes:
        print(n)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as f:
            cmd = "python bench/bench_batch.py" + (f" --nsim {args.nsim}" if args.nsim else "")
            cmd += f" --rounds {args.rounds}" if args.rounds != 5 else ""
            f.write(f"\n### {info}\n\n`{cmd}`\n\n{header}\n{row}\n")
            for n in notes:
                f.write(f"\n{n}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
