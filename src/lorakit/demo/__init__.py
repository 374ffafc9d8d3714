"""`lorakit demo`: the generated date task (`lorakit.demo.task`) and the run that teaches it
(`lorakit.demo.run`).

The demo is a room of its own above the core: it may use `train/`, `data/` and `models/`; nothing in the
core imports it.
"""

from lorakit.demo.run import DemoRecipe, DemoResult, run_demo

__all__ = ["DemoRecipe", "DemoResult", "run_demo"]
