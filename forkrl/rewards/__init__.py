"""Rewards: the built-ins and the user's own, under one API (``api``: where a reward comes from, what it is given;
``scoring``: how a batch is scored; ``isolation``: rewards in worker processes; ``sandbox``: running code answers).

A reward call that raises, returns None, NaN or inf, or runs past its time limit makes that row *unscorable*:
``Scored.valid_N`` is False, the row is left out of its group's baseline and gets advantage 0, and the failure is
counted (with its first message) in the step's metrics. It is never a silent 0 (METHODS §2).
"""

from .api import PARAMETERS, Reward, RewardError, available, fingerprint, load
from .builtin import REWARDS
from .scoring import RewardCallError, RewardFailures, RewardTimeout, score_rollouts, time_limit

__all__ = ["PARAMETERS", "REWARDS", "Reward", "RewardCallError", "RewardError", "RewardFailures", "RewardTimeout",
           "available", "fingerprint", "load", "score_rollouts", "time_limit"]
