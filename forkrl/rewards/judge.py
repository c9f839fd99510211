"""LLM-judge rewards (``{judge: {...}}``): a local causal LM or an OpenAI-compatible endpoint.

(Being written: the config below is the contract with ``api.load``.)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class JudgeCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str


def build_judge(cfg: JudgeCfg, *, task, device, where: str, run_dir):
    raise NotImplementedError
