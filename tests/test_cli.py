"""``python -m glmm_jax demo`` and ``fit``."""

from __future__ import annotations

from glmm_jax.__main__ import main


def test_demo_prints_the_seed_summary(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "success ~ schavg + (1 | school)" in out
    assert "-2658.3" in out and "school (Intercept)" in " ".join(out.split())


def test_fit_a_csv(tmp_path, capsys):
    from glmm_jax import datasets

    path = tmp_path / "cbpp.csv"
    datasets.load_cbpp().to_csv(path, index=False)
    code = main(["fit", str(path), "cbind(incidence, size - incidence) ~ C(period) + (1 | herd)"])
    out = capsys.readouterr().out
    assert code == 0
    assert "-92.0" in out and "Number of obs: 56, groups:  herd, 15" in out


def test_fit_reports_errors_without_a_trace(tmp_path, capsys):
    from glmm_jax import datasets

    path = tmp_path / "cbpp.csv"
    datasets.load_cbpp().to_csv(path, index=False)
    assert main(["fit", str(path), "incidence ~ nope + (1 | herd)", "--family", "poisson"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "Traceback" not in err
    assert main(["fit", str(tmp_path / "missing.csv"), "y ~ (1 | g)"]) == 2
