"""Environments for multi-turn agent RL (AGENTS.md): the protocol (``base``), RAGEN's FrozenLake and Sokoban in pure
Python (``frozenlake``, ``sokoban``), demonstrations replayed through them (``grid``), and the token-in-token-out
episode codec and runner (``episodes``)."""

from .base import Demo, Env, StepResult, parse_actions, split_seeds
from .frozenlake import FrozenLake
from .sokoban import Sokoban

ENVS = {
    "frozenlake": FrozenLake,
    "sokoban": Sokoban,
}

__all__ = ["ENVS", "Demo", "Env", "FrozenLake", "Sokoban", "StepResult", "parse_actions", "split_seeds"]
