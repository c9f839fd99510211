"""FrozenLake as RAGEN sets it up (RAGEN-2, arXiv 2604.06268; AGENTS.md), in pure Python.

The map of seed s: each cell frozen with probability ``p`` (0.9 in RAGEN's main table), start and goal at random
distinct cells, redrawn until the goal is reachable from the start avoiding holes (breadth-first search). Actions
Left / Down / Right / Up; reward 1 on reaching the goal, else 0; the episode ends in a hole, at the goal or after
``max_actions`` (10) actions. Deterministic by default; ``slippery`` moves as intended with probability
``success_rate`` and to each perpendicular side with half the rest, as gymnasium's ``FrozenLakeEnv``. Symbols:
P player, _ frozen, O hole, G goal, X player in a hole, √ player on the goal.

``view: 1`` is the partially observable variant (for exploration training, METHODS §8): the policy sees only the
cells it has had within that radius (a 3×3 neighbourhood), the rest drawn ``?``, so the goal is hidden until seen;
``info["coverage"]`` is the fraction of the map seen, the exploration reward. An action the environment cannot
parse costs ``invalid_penalty`` and leaves the state unchanged.
"""

from __future__ import annotations

from .base import StepResult, episode_rng
from .grid import MOVES, bfs, open_turn, shift

ACTIONS = tuple(MOVES)


def generate_map(size: int, p: float, seed: int):
    """(holes, start, goal) of the map ``seed``: RAGEN's generator (random cells, random distinct start and goal,
    reachability by search; redrawn until reachable)."""
    rng = episode_rng(seed, f"frozenlake-{size}-{p}")
    cells = [(r, c) for r in range(size) for c in range(size)]
    while True:
        holes = {cell for cell in cells if rng.random() >= p}
        start, goal = rng.sample(cells, 2)
        holes -= {start, goal}
        inside = lambda cell: 0 <= cell[0] < size and 0 <= cell[1] < size  # noqa: E731
        path = bfs(start, lambda cell: cell == goal, lambda cell: (
            (a, shift(cell, a)) for a in ACTIONS if inside(shift(cell, a)) and shift(cell, a) not in holes))
        if path is not None:
            return frozenset(holes), start, goal


class FrozenLake:
    ACTIONS = ACTIONS
    INSTRUCTION = ("FrozenLake. Reach the goal G without falling into a hole O. P is you, _ is ice, ? is unseen. "
                   "Answer with <answer>Left</answer>, Down, Right or Up.")

    def __init__(self, size: int = 4, p: float = 0.9, *, slippery: bool = False, success_rate: float = 1 / 3,
                 max_actions: int = 10, actions_per_turn: int = 1, invalid_penalty: float = 0.1,
                 view: int | None = None):
        self.size, self.p, self.slippery, self.success_rate = size, p, slippery, success_rate
        self.max_actions, self.actions_per_turn, self.invalid_penalty, self.view = (
            max_actions, actions_per_turn, invalid_penalty, view)
        self.done = True

    def reset(self, seed: int) -> str:
        self.holes, self.start, self.goal = generate_map(self.size, self.p, seed)
        self.player, self.actions_taken, self.done = self.start, 0, False
        self.slips = episode_rng(seed, "frozenlake-slip")
        self.seen: set[tuple[int, int]] = set()
        self._look()
        return self.render()

    # the rules

    def _inside(self, cell) -> bool:
        return 0 <= cell[0] < self.size and 0 <= cell[1] < self.size

    def _move(self, cell, action: str):
        nxt = shift(cell, action)
        return nxt if self._inside(nxt) else cell  # a move off the map stays put, as gymnasium's

    def _slip(self, action: str) -> str:
        if not self.slippery or self.slips.random() < self.success_rate:
            return action
        i = ACTIONS.index(action)
        return ACTIONS[(i + self.slips.choice((1, 3))) % 4]  # one of the two perpendicular directions

    def _look(self) -> None:
        r0, c0 = self.player
        k = self.size if self.view is None else self.view
        self.seen |= {(r, c) for r in range(r0 - k, r0 + k + 1) for c in range(c0 - k, c0 + k + 1)
                      if self._inside((r, c))}

    def step(self, action: str) -> StepResult:
        actions = open_turn(self, action)
        if isinstance(actions, StepResult):
            return actions
        reward = 0.0
        for a in actions:
            self.player = self._move(self.player, self._slip(a))
            self.actions_taken += 1
            self._look()
            if self.player == self.goal:
                reward, self.done = 1.0, True
            elif self.player in self.holes or self.actions_taken >= self.max_actions:
                self.done = True
            if self.done:
                break
        return StepResult(self.render(), reward, self.done, self.info(valid=True))

    def info(self, *, valid: bool) -> dict[str, float]:
        return {"success": float(self.player == self.goal), "action_valid": float(valid),
                "actions": float(self.actions_taken), "coverage": len(self.seen) / self.size ** 2}

    # rendering and demonstrations

    def symbol(self, cell) -> str:
        if cell not in self.seen:
            return "?"
        if cell == self.player:
            return "X" if cell in self.holes else "√" if cell == self.goal else "P"
        return "O" if cell in self.holes else "G" if cell == self.goal else "_"

    def render(self) -> str:
        return "\n".join("".join(self.symbol((r, c)) for c in range(self.size)) for r in range(self.size))

    def optimal(self) -> list[str] | None:
        """The shortest action list to the goal from here, avoiding holes, on the deterministic dynamics."""
        if self.done:
            return None
        return bfs(self.player, lambda cell: cell == self.goal, lambda cell: (
            (a, self._move(cell, a)) for a in ACTIONS if self._move(cell, a) not in self.holes))

    def greedy_action(self, rng) -> str:
        """A step toward the goal that ignores the holes (a random one of the two when both axes differ)."""
        (r, c), (gr, gc) = self.player, self.goal
        options = ([("Down" if gr > r else "Up")] if gr != r else []) + ([("Right" if gc > c else "Left")]
                                                                          if gc != c else [])
        return rng.choice(options) if options else rng.choice(ACTIONS)

    def random_action(self, rng) -> str:
        return rng.choice(ACTIONS)

    def reason(self) -> str:
        """Where the goal is from the player, in words (the short reasoning a demonstration writes)."""
        (r, c), (gr, gc) = self.player, self.goal
        if self.goal not in self.seen:
            return "goal unseen"
        parts = (["down"] if gr > r else ["up"] if gr < r else []) + (["right"] if gc > c else ["left"]
                                                                         if gc < c else [])
        return "goal " + " ".join(parts or ["here"])
