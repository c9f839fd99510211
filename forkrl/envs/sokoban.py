"""Sokoban as RAGEN sets it up (RAGEN-2, arXiv 2604.06268; AGENTS.md), in pure Python: the PyPI ``gym-sokoban``
needs the old ``gym`` and downloads levels for its Boxoban variant.

A 6×6 room including its walls, one box. Rooms come from reverse play, as gym-sokoban generates them: a random-walk
topology carved out of the walls, the box placed on a target and the player on a floor cell, then every state the
player can reach by moving and *pulling* the box (breadth-first over the ≤ 16 × 16 player/box states) is scored by
the box's distance from its target, and one of the farthest is kept (ties by the seed's stream); a room whose box
cannot leave its target is redrawn. So every room is solvable, and ``optimal()`` (forward breadth-first search)
gives a shortest solution. Actions Up / Down / Left / Right push the box when it is in the way (and the cell behind
it is free), else move. Reward −0.1 per action, +1 when a box reaches a target, −1 when one leaves it, +10 when all
are placed; at most ``max_actions`` (10) actions. Symbols: # wall, _ empty, O target, √ box on target, X box,
P player, S player on a target.
"""

from __future__ import annotations

from .base import StepResult, episode_rng
from .grid import MOVES, bfs, open_turn, shift

ACTIONS = ("Up", "Down", "Left", "Right")


def carve(size: int, rng, *, steps: int = 25, turn: float = 0.35) -> frozenset:
    """gym-sokoban's room topology: a random walk inside the border that turns with probability ``turn``."""
    cell = (rng.randrange(1, size - 1), rng.randrange(1, size - 1))
    direction, floor = rng.choice(ACTIONS), {cell}
    for _ in range(steps):
        if rng.random() < turn:
            direction = rng.choice(ACTIONS)
        nxt = shift(cell, direction)
        if 1 <= nxt[0] < size - 1 and 1 <= nxt[1] < size - 1:
            cell = nxt
            floor.add(cell)
    return frozenset(floor)


def pulls(floor: frozenset, state):
    """Reverse moves from (player, box): the player steps to a free floor cell, pulling the box along when the box
    is right behind it."""
    player, box = state
    for a in ACTIONS:
        nxt = shift(player, a)
        if nxt in floor and nxt != box:
            yield a, (nxt, box)
            dr, dc = MOVES[a]
            if box == (player[0] - dr, player[1] - dc):
                yield a, (nxt, player)


def generate_room(size: int, seed: int, depth: int = 10):
    """(floor, target, player, box) of the room ``seed``, solvable in at most ``depth`` actions (the reverse search
    goes that deep)."""
    rng = episode_rng(seed, f"sokoban-{size}")
    while True:
        floor = carve(size, rng)
        if len(floor) < 4:
            continue
        target, player = rng.sample(sorted(floor), 2)
        reached, frontier = {(player, target)}, [(player, target)]
        for _ in range(depth):
            frontier = [nxt for s in frontier for _, nxt in pulls(floor, s) if nxt not in reached]
            reached.update(frontier)
        far = max(abs(b[0] - target[0]) + abs(b[1] - target[1]) for _, b in reached)
        if far == 0:
            continue
        best = sorted(s for s in reached if abs(s[1][0] - target[0]) + abs(s[1][1] - target[1]) == far)
        player, box = rng.choice(best)
        return floor, target, player, box


class Sokoban:
    ACTIONS = ACTIONS
    INSTRUCTION = ("Sokoban. Push the box X onto the target O. P is you, # is a wall, _ is floor. Answer with up to "
                   "two actions, e.g. <answer>Up || Left</answer> (Up, Down, Left, Right).")

    def __init__(self, size: int = 6, *, max_actions: int = 10, actions_per_turn: int = 2,
                 invalid_penalty: float = 0.1, step_penalty: float = 0.1):
        self.size, self.max_actions, self.actions_per_turn = size, max_actions, actions_per_turn
        self.invalid_penalty, self.step_penalty = invalid_penalty, step_penalty
        self.done = True

    def reset(self, seed: int) -> str:
        self.floor, self.target, self.player, self.box = generate_room(self.size, seed, self.max_actions)
        self.actions_taken, self.done = 0, False
        return self.render()

    def _forward(self, state, action: str):
        """The state after ``action`` from (player, box): push when the box is in the way, else move, else stay."""
        player, box = state
        nxt = shift(player, action)
        if nxt == box:
            behind = shift(box, action)
            return (nxt, behind) if behind in self.floor else state
        return (nxt, box) if nxt in self.floor else state

    def step(self, action: str) -> StepResult:
        actions = open_turn(self, action)
        if isinstance(actions, StepResult):
            return actions
        reward = 0.0
        for a in actions:
            was_on = self.box == self.target
            self.player, self.box = self._forward((self.player, self.box), a)
            self.actions_taken += 1
            reward -= self.step_penalty
            on = self.box == self.target
            reward += 1.0 if on and not was_on else -1.0 if was_on and not on else 0.0
            if on:
                reward += 10.0  # every box (the one) placed
                self.done = True
            elif self.actions_taken >= self.max_actions:
                self.done = True
            if self.done:
                break
        return StepResult(self.render(), round(reward, 10), self.done, self.info(valid=True))

    def info(self, *, valid: bool) -> dict[str, float]:
        return {"success": float(self.box == self.target), "action_valid": float(valid),
                "actions": float(self.actions_taken)}

    def symbol(self, cell) -> str:
        if cell not in self.floor:
            return "#"
        if cell == self.player:
            return "S" if cell == self.target else "P"
        if cell == self.box:
            return "√" if cell == self.target else "X"
        return "O" if cell == self.target else "_"

    def render(self) -> str:
        return "\n".join("".join(self.symbol((r, c)) for c in range(self.size)) for r in range(self.size))

    def optimal(self) -> list[str] | None:
        """A shortest action list that puts the box on its target from here (None once done or when stuck)."""
        if self.done:
            return None
        return bfs((self.player, self.box), lambda s: s[1] == self.target,
                   lambda s: ((a, self._forward(s, a)) for a in ACTIONS))

    def random_action(self, rng) -> str:
        return rng.choice(ACTIONS)

    def reason(self) -> str:
        """Where the box is from the player and the target from the box, in words."""
        def way(a, b):
            parts = (["down"] if b[0] > a[0] else ["up"] if b[0] < a[0] else []) + (
                ["right"] if b[1] > a[1] else ["left"] if b[1] < a[1] else [])
            return " ".join(parts) or "here"
        return f"box {way(self.player, self.box)}, target {way(self.box, self.target)}"
