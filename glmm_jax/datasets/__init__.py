"""Datasets bundled with glmm_jax, with R's factor level order (no downloads).

Each loader returns a fresh pandas DataFrame. Factor columns are pandas Categoricals whose
categories follow the level order of the R data set, so treatment contrasts pick the same
reference level as lme4. Sources: lme4 (cbpp, sleepstudy, Dyestuff, Penicillin, InstEval, cake,
grouseticks), mlmRev (Exam, Contraception, VerbAgg, mmmec), glmmTMB (Salamanders).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import pandas as pd

__all__ = [
    "load",
    "list_datasets",
    "load_exam",
    "load_cbpp",
    "load_contraception",
    "load_salamanders",
    "load_mmmec",
    "load_sleepstudy",
    "load_grouseticks",
    "load_verbagg",
]

_DATA = resources.files(__name__) / "data"


@cache
def _levels() -> dict:
    return json.loads((_DATA / "levels.json").read_text())


def list_datasets() -> list[str]:
    """Names of the bundled datasets."""
    return sorted(p.name[:-4] for p in _DATA.iterdir() if p.name.endswith(".csv"))


def load(name: str) -> pd.DataFrame:
    """Load a bundled dataset by name (see :func:`list_datasets`).

    Raises
    ------
    ValueError
        If there is no such dataset; the message lists the available ones.
    """
    path = _DATA / f"{name}.csv"
    if not path.is_file():
        raise ValueError(f"no bundled dataset {name!r}; available: {', '.join(list_datasets())}")
    with path.open() as f:
        df = pd.read_csv(f)
    for col, levels in _levels().get(name, {}).items():
        if col in df.columns:
            df[col] = pd.Categorical(df[col].astype(str), categories=[str(v) for v in levels])
    return df


def load_exam() -> pd.DataFrame:
    """mlmRev's Exam: 4,059 students in 65 London schools.

    Adds ``success`` = 1 where ``normexam >= 0`` (the seed model's binary response).
    """
    df = load("exam")
    df["success"] = (df["normexam"] >= 0).astype(int)
    return df


def load_cbpp() -> pd.DataFrame:
    """lme4's cbpp: contagious bovine pleuropneumonia, 15 herds over 4 periods."""
    return load("cbpp")


def load_contraception() -> pd.DataFrame:
    """mlmRev's Contraception: 1,934 women in 60 Bangladeshi districts; ``use`` as 0/1."""
    df = load("contraception")
    df["use"] = (df["use"] == "Y").astype(int)
    return df


def load_salamanders() -> pd.DataFrame:
    """glmmTMB's Salamanders: counts at 23 sites, by species and mining."""
    return load("salamanders")


def load_mmmec() -> pd.DataFrame:
    """mlmRev's mmmec: melanoma mortality by EC county, with expected deaths for an offset."""
    return load("mmmec")


def load_sleepstudy() -> pd.DataFrame:
    """lme4's sleepstudy: reaction times of 18 subjects over 10 days of sleep deprivation."""
    return load("sleepstudy")


def load_grouseticks() -> pd.DataFrame:
    """lme4's grouseticks: ticks on red grouse chicks (adds centred ``cHEIGHT``)."""
    df = load("grouseticks")
    df["cHEIGHT"] = df["HEIGHT"] - df["HEIGHT"].mean()
    return df


def load_verbagg() -> pd.DataFrame:
    """lme4's VerbAgg: verbal aggression items; adds ``r2`` as 0/1."""
    df = load("verbagg")
    df["r2"] = (df["r2"] == "Y").astype(int)
    return df
