"""`edgekit tune`: search compression choices, each trial compiled, run as C and measured on the board.

    space.py   the choices a trial draws (defaults + a TOML override) and the recipe they make
    trial.py   one trial: run_recipe, then per weight encoding: C on the held-out split -> instructions,
               flash, RAM on the board
    search.py  Ray Tune + Optuna's multi-objective sampler, locally or on a cluster, resumable
    sampler.py TPE that asks again instead of re-running a configuration already measured
    pareto.py  the Pareto front, the best trial within the constraints, the files written
"""
from .search import run_search

__all__ = ["run_search"]
