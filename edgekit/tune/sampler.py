"""The sampler of `edgekit tune`: Optuna's multi-objective TPE, asked again instead of re-running a repeat.

Imported only when Ray Tune and Optuna are installed (the optional `tune` extra).
"""
from __future__ import annotations

import json

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

# How many times a repeated configuration is answered from what was measured before asking TPE again;
# after that (a small space nearly exhausted) the repeat runs as a trial of its own.
REASK = 25


class FreshOptunaSearch(OptunaSearch):
    """Optuna's TPE (through Ray's OptunaSearch) that spends no trial on a configuration already measured.

    TPE draws categorical choices and asks again for ones it has seen (3 of 24 trials in each benchmark
    before this). A repeat is answered from the measured objectives (told to the sampler as a trial of
    its own: what the trial would have measured) and the sampler asked again; a configuration still
    running is told as failed (the sampler ignores it) and asked again. Deterministic, so a seed still
    repeats a search; saved with the searcher, so a resumed search keeps what it measured."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._measured: dict[str, list] = {}  # configuration -> objectives measured
        self._running: dict[str, str] = {}    # Ray trial id -> configuration
        self.repeats_skipped = 0

    def suggest(self, trial_id):
        params = super().suggest(trial_id)
        for _ in range(REASK):
            key = json.dumps(params, sort_keys=True, default=str)
            known = self._measured.get(key)
            if known is None and key not in self._running.values():
                break
            ot_trial = self._ot_trials.pop(trial_id)
            if known is not None:
                self._ot_study.tell(ot_trial, known)
            else:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            self.repeats_skipped += 1
            params = super().suggest(trial_id)
        if params is not None:
            self._running[trial_id] = json.dumps(params, sort_keys=True, default=str)
        return params

    def on_trial_complete(self, trial_id, result=None, error=False):
        super().on_trial_complete(trial_id, result=result, error=error)
        key = self._running.pop(trial_id, None)
        if key is not None and result and not error and all(m in result for m in self.metric):
            self._measured[key] = [result[m] for m in self.metric]
