"""Tests run offline: nothing may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
