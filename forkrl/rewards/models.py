"""A Hugging Face sequence-classification model as a reward (``{reward_model: {path: ...}}``).

(Being written: the config below is the contract with ``api.load``.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class RewardModelCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str


def build_reward_model(cfg: RewardModelCfg, *, device, where: str):
    raise NotImplementedError
