"""Environments for multi-turn agent RL (AGENTS.md): the protocol (``base``), RAGEN's FrozenLake and Sokoban in pure
Python (``frozenlake``, ``sokoban``), a Python tool in the sandbox before a task's answer (``tool``), text-rendered
gymnasium environments (``gym``), demonstrations replayed through them (``grid``), and the token-in-token-out
episode codec and runner (``episodes``)."""

from .base import Demo, Env, StepResult, parse_actions, split_seeds
from .frozenlake import FrozenLake
from .gym import GymText
from .sokoban import Sokoban
from .tool import PythonTool

ENVS = {
    "frozenlake": FrozenLake,
    "sokoban": Sokoban,
    "python_tool": PythonTool,
    "gym": GymText,  # a text-rendered gymnasium environment (the optional extra forkrl[gym])
}

__all__ = ["ENVS", "Demo", "Env", "FrozenLake", "GymText", "PythonTool", "Sokoban", "StepResult", "parse_actions", "split_seeds"]
