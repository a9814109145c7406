"""Speed of glmer against the PyPI ``glmm`` package (Rust) and lme4, measured in the same run.

    python bench/bench_glmer.py            # all cases
    python bench/bench_glmer.py --quick    # skip the 10^6-row and 10^5-row crossed cases
    python bench/bench_glmer.py --only crossed   # only the cases whose name contains "crossed"
    python bench/bench_glmer.py --record   # also append the table to bench/RESULTS.md

Each case times warm fits (compilation excluded for glmm_jax: the first fit is discarded) in
three alternating rounds of both Python packages (so that a burst of load on a shared machine
falls on both), each the median of a third of the case's repeats, and reports the median of
each package's rounds and of the rounds' ratios ``peer / glmm_jax`` (above 1: glmm_jax is
faster) with their range, and the log-likelihood difference to show both reached the same
optimum. The
fresh-process rows time ``python -c "glmer(seed model)"`` end to end, with an empty and with a
warm persistent compilation cache. The peak-memory rows fit the synthetic crossed model once
in a fresh process per package and report its peak resident set size. lme4 runs through
``Rscript`` when it is installed (``apt-get install r-cran-lme4``); otherwise the table says it
was not measured.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
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

import numpy as np
import pandas as pd

import glmm_jax as gj

HERE = Path(__file__).parent
SEED = "success ~ schavg + (1 | school)"
#: Alternating rounds of glmm_jax and glmm per case: at least this many, and more for fast
#: cases, whose rounds hold at most ROUND_CALLS calls (sleepstudy's ratio over 3 rounds of 20
#: calls ranged 0.23-0.49 on this 2-core VM; its median over 20 rounds is steadier).
ROUNDS = 3
ROUND_CALLS = 20


def median_time(fn, repeats: int, warmup: int = 3) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones: the first calls after
    a compilation run at about twice the steady-state time for a small fit (sleepstudy:
    3.4 ms against 1.7 ms), and a warm fit is what the table reports, for every package."""
    for _ in range(warmup):
        fn()
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def simulated_logit(n: int, groups: int, seed: int = 42) -> pd.DataFrame:
    """Random-intercept logit: y ~ x + (1 | g), sd of the intercepts 0.7."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    eta = -0.3 + 0.5 * x + rng.normal(scale=0.7, size=groups)[g]
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "g": g})


def crossed_logit(n: int, G1: int, G2: int, seed: int = 7) -> pd.DataFrame:
    """Crossed random intercepts: y ~ x + (1 | a) + (1 | b), sds 0.8 and 0.5."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, G1, n), rng.integers(0, G2, n)
    x = rng.normal(size=n)
    eta = -0.5 + 0.4 * x + rng.normal(scale=0.8, size=G1)[a] + rng.normal(scale=0.5, size=G2)[b]
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame({"y": y, "x": x, "a": a, "b": b})


def glmm_fit(df, formula, family="binomial", reml=None):
    try:
        import glmm
    except ImportError:
        return None
    kw = {} if reml is None else {"reml": reml}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return glmm.fit(df, formula, family=family, **kw)


def lme4_seconds(
    csv: Path, formula: str, repeats: int, family: str = "binomial", factors=(), reml=None
) -> tuple[float, float] | None:
    """Median lme4 fit time and loglik via Rscript, or None without R/lme4."""
    if shutil.which("Rscript") is None:
        return None
    columns = ", ".join(f'"{c}"' for c in ("school", "g", "a", "b", *factors))
    if reml is None:
        fit_call = f"glmer(f, data = d, family = {family})"
    else:
        fit_call = f"lmer(f, data = d, REML = {'TRUE' if reml else 'FALSE'})"
    script = f"""
suppressMessages(library(lme4))
d <- read.csv("{csv}")
for (v in c({columns})) if (v %in% names(d)) d[[v]] <- factor(d[[v]])
f <- {formula}
fit <- function() {fit_call}
m <- fit()
t <- replicate({repeats}, system.time(fit())[["elapsed"]])
cat(median(t), as.numeric(logLik(m)), "\\n")
"""
    res = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    sec, ll = res.stdout.split()[-2:]
    return float(sec), float(ll)


def case(
    name, df, formula, repeats, rows, lme4_repeats=0, family="binomial", factors=(), reml=None
):
    """Time one case; ``reml`` not None makes it a linear mixed model (``lmer``)."""
    if reml is None:
        ours = lambda: gj.glmer(formula, df, family=family)  # noqa: E731
    else:
        family = "gaussian"
        ours = lambda: gj.lmer(formula, df, reml=reml)  # noqa: E731
    ours()  # compile (or load from the persistent cache)
    peer = None
    if glmm_fit(df, formula, family, reml) is not None:
        peer = lambda: glmm_fit(df, formula, family, reml)  # noqa: E731
    # Alternating rounds, so that a burst of load on a shared machine falls on both packages;
    # the warm-up calls only before the first.
    rounds = max(ROUNDS, -(-repeats // ROUND_CALLS))
    per_round = max(1, -(-repeats // rounds))
    ours_rounds, peer_rounds = [], []
    for i in range(rounds):
        warmup = 3 if i == 0 else 0
        t, m = median_time(ours, per_round, warmup)
        ours_rounds.append(t)
        if peer is not None:
            t, f = median_time(peer, per_round, warmup)
            peer_rounds.append(t)
    t_ours = statistics.median(ours_rounds)
    row = {"case": name, "glmm_jax_s": t_ours, "loglik": m.loglik}
    if peer is not None:
        ratios = [p / o for p, o in zip(peer_rounds, ours_rounds, strict=True)]
        row.update(
            glmm_s=statistics.median(peer_rounds),
            ratio_glmm=statistics.median(ratios),
            ratio_range=(min(ratios), max(ratios)),
            dll_glmm=m.loglik - f.loglik,
        )
    if lme4_repeats:
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "d.csv"
            df.to_csv(csv, index=False)
            r = lme4_seconds(csv, formula, lme4_repeats, family, factors, reml)
        if r is not None:
            row.update(lme4_s=r[0], ratio_lme4=r[0] / t_ours, dll_lme4=m.loglik - r[1])
    rows.append(row)
    print(_fmt_row(row), flush=True)


def fresh_process(rows, repeats: int):
    code = (
        "import time; t=time.perf_counter(); import glmm_jax as gj; "
        f"gj.glmer({SEED!r}, gj.datasets.load_exam()); print(time.perf_counter()-t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "GLMM_JAX_CACHE_DIR": cache}
        cold, warm = [], []
        for _ in range(repeats):
            shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(cache)
            cold.append(float(subprocess.check_output([sys.executable, "-c", code], env=env)))
            warm.append(float(subprocess.check_output([sys.executable, "-c", code], env=env)))
    for name, ts in (
        ("first fit, fresh process, empty cache", cold),
        ("first fit, fresh process, warm cache", warm),
    ):
        row = {"case": name, "glmm_jax_s": statistics.median(ts)}
        rows.append(row)
        print(_fmt_row(row), flush=True)


MEMORY_PROBE = """
import sys, warnings
import numpy as np
import pandas as pd

def peak_mib():
    # VmHWM is this process's own high-water mark; ru_maxrss would carry the parent's across
    # fork and exec.
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

{source}
df = crossed_logit({n}, {G1}, {G2})
data_mib = peak_mib()
if {package!r} == "glmm_jax":
    import glmm_jax
    glmm_jax.glmer({formula!r}, df)
else:
    import glmm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        glmm.fit(df, {formula!r}, family="binomial")
print(data_mib, peak_mib())
"""


def peak_memory(rows, n: int, G1: int, G2: int, formula: str):
    """Peak resident memory (MiB) of one fit in a fresh process, per package (Linux)."""
    source = inspect.getsource(crossed_logit)
    for package in ("glmm_jax", "glmm"):
        code = MEMORY_PROBE.format(
            source=source, n=n, G1=G1, G2=G2, package=package, formula=formula
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode != 0:
            continue
        data_mib, peak = map(float, res.stdout.split()[-2:])
        row = {
            "case": f"peak memory (MiB) of that crossed fit in a fresh process, {package} "
            f"(the data alone: {data_mib:.0f} MiB)",
            "glmm_jax_s" if package == "glmm_jax" else "glmm_s": peak,
        }
        rows.append(row)
        print(_fmt_row(row), flush=True)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _fmt_row(r) -> str:
    ratio = _fmt(r.get("ratio_glmm"), ".2f")
    if "ratio_range" in r:
        ratio += " ({:.2f}-{:.2f})".format(*r["ratio_range"])
    return (
        f"| {r['case']} | {_fmt(r.get('glmm_jax_s'), '.4f')} | {_fmt(r.get('glmm_s'), '.4f')} | "
        f"{ratio} | {_fmt(r.get('dll_glmm'), '+.1e')} | "
        f"{_fmt(r.get('lme4_s'), '.3f')} | {_fmt(r.get('ratio_lme4'), '.1f')} |"
    )


HEADER = (
    "| case | glmm_jax s | glmm s | glmm / glmm_jax (range over rounds) | loglik - glmm's "
    "| lme4 s | lme4 / glmm_jax |\n"
    "| --- | --- | --- | --- | --- | --- | --- |"
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="skip the 10^6-row and 10^5-row crossed cases"
    )
    ap.add_argument("--only", default="", help="run only cases whose name contains this text")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    import jax

    has_r = shutil.which("Rscript") is not None
    try:
        import glmm  # noqa: F401

        has_glmm = True
    except ImportError:
        has_glmm = False
    info = (
        f"{datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | "
        f"jax {jax.__version__} on {jax.default_backend()} | glmm_jax {gj.__version__} | "
        f"peer glmm {'installed' if has_glmm else 'NOT installed (pip install glmm)'} | "
        f"lme4 {'via Rscript' if has_r else 'not measured: Rscript not found'}"
    )
    print(info)
    print(HEADER)
    rows: list[dict] = []
    exam = gj.datasets.load_exam
    sim = simulated_logit
    cases = [
        ("seed model, Exam (4,059 rows, 65 schools), warm", exam, SEED, 30, 5, {}),
        (
            "random-intercept logit, 10^5 rows, 10^3 groups, warm",
            lambda: sim(10**5, 10**3),
            "y ~ x + (1 | g)",
            5,
            3,
            {},
        ),
        (
            "random-intercept logit, 10^6 rows, 10^4 groups, warm",
            lambda: sim(10**6, 10**4),
            "y ~ x + (1 | g)",
            3,
            0,
            {"slow": True},
        ),
        (
            "crossed: VerbAgg (7,584 rows, 316 x 24), warm",
            gj.datasets.load_verbagg,
            "r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)",
            7,
            3,
            {"factors": ("id", "item")},
        ),
        (
            "crossed: sim_pois_crossed_offset (14,400 rows, 300 x 12), warm",
            lambda: gj.datasets.load("sim_pois_crossed"),
            "count ~ z + offset(log(exposure)) + (1 | site) + (1 | year)",
            5,
            3,
            {"family": "poisson", "factors": ("site", "year")},
        ),
        (
            "lmer: sleepstudy (180 rows), REML, warm",
            gj.datasets.load_sleepstudy,
            "Reaction ~ Days + (Days | Subject)",
            400,
            5,
            {"reml": True, "factors": ("Subject",)},
        ),
        (
            "lmer: InstEval (73,421 rows, s x d x dept crossed), ML, warm",
            lambda: gj.datasets.load("insteval"),
            "y ~ service + (1 | s) + (1 | d) + (1 | dept)",
            3,
            1,
            {"reml": False, "factors": ("s", "d", "dept", "service"), "slow": True},
        ),
        (
            "crossed: synthetic logit, 10^5 rows, 5,000 x 500, warm",
            lambda: crossed_logit(10**5, 5000, 500),
            "y ~ x + (1 | a) + (1 | b)",
            3,
            0,
            {"slow": True},
        ),
    ]
    for name, load, formula, repeats, lme4_repeats, opts in cases:
        if args.only not in name or (args.quick and opts.get("slow")):
            continue
        kw = {k: v for k, v in opts.items() if k != "slow"}
        case(name, load(), formula, repeats, rows, lme4_repeats, **kw)
    # Peak memory of the synthetic crossed fit, whenever that case ran.
    if any(r["case"].startswith("crossed: synthetic") for r in rows):
        peak_memory(rows, 10**5, 5000, 500, "y ~ x + (1 | a) + (1 | b)")
    if not args.only:
        fresh_process(rows, 3)
    if args.record:
        with open(HERE / "RESULTS.md", "a") as f:
            f.write(
                f"\n### {info}\n\n"
                f"`python bench/bench_glmer.py{' --quick' if args.quick else ''}"
                f"{' --only ' + repr(args.only) if args.only else ''}`\n\n"
            )
            f.write(HEADER + "\n" + "\n".join(_fmt_row(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
