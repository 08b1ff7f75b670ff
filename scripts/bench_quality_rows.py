"""The recipe rows of `scripts/bench_quality.py`: PruneRecipe fields per named row, run per seed.

Kept apart from the benchmark's measuring and rendering code so that each file has one job; every
row a README table shows is here under the name the table prints.
"""

from __future__ import annotations

from typing import Any

KD = {"steps": 100, "lr": 1e-3}  # global Router KD as measured in scripts/bench_router_kd.py
# Extra rows: PruneRecipe fields (model and calibration seed are filled in per run). "pick": "auto"
# runs `auto` restricted to the strategy the row named "auto" picked for that seed (same planning /
# validation split, so the same plan) instead of comparing every candidate again; "group_ratio" files a
# row under another ratio (slimming half of the channels removes as many weights as dropping half of
# the experts); "tasks" scores the tasks whatever --task-ratios says.
RECIPE_ROWS: list[dict[str, Any]] = [
    {"name": "auto", "strategy": "auto", "ratio": 0.5},
    {"name": "auto + router-kd", "pick": "auto", "strategy": "auto", "ratio": 0.5, "router_kd": KD},
    {"name": "auto, 3p validation", "strategy": "auto", "ratio": 0.5,
     "auto": {"val_source": "builtin:third-party-mixed"}},
    {"name": "auto, 3p validation + router-kd", "pick": "auto, 3p validation", "strategy": "auto", "ratio": 0.5,
     "auto": {"val_source": "builtin:third-party-mixed"}, "router_kd": KD},
    {"name": "soft-frequency + router-kd", "strategy": "soft-frequency", "ratio": 0.5, "router_kd": KD},
    {"name": "mone + router-kd", "strategy": "mone", "ratio": 0.5, "router_kd": KD},
    {"name": "mone + router-kd on 3p text", "strategy": "mone", "ratio": 0.5,  # what auto (3p validation) picked
     "router_kd": {**KD, "source": "builtin:third-party-mixed"}},
    {"name": "mone, soft-frequency survivors", "strategy": "mone", "ratio": 0.5, "params": {"rank": "soft-frequency"}},
    {"name": "mone, soft-frequency survivors + router-kd", "strategy": "mone", "ratio": 0.5,
     "params": {"rank": "soft-frequency"}, "router_kd": KD},
    {"name": "mone + router-kd, lr 3e-4", "strategy": "mone", "ratio": 0.5, "router_kd": {**KD, "lr": 3e-4}},
    {"name": "mone + router-kd, lr 3e-4 on 3p text", "strategy": "mone", "ratio": 0.5,
     "router_kd": {**KD, "lr": 3e-4, "source": "builtin:third-party-mixed"}},
    {"name": "mone + router-kd, lr 3e-4 on broad text", "strategy": "mone", "ratio": 0.5,  # own + 3p text, half each
     "router_kd": {**KD, "lr": 3e-4, "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 300 steps, lr 3e-4 on broad text", "strategy": "mone", "ratio": 0.5,
     "router_kd": {**KD, "steps": 300, "lr": 3e-4, "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 1000 steps, lr 3e-4 on broad text", "strategy": "mone", "ratio": 0.5,
     "router_kd": {**KD, "steps": 1000, "lr": 3e-4, "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 1000 steps, 512 samples, lr 3e-4 on broad text", "strategy": "mone", "ratio": 0.5,
     "router_kd": {**KD, "steps": 1000, "lr": 3e-4, "samples": 512, "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 1000 steps, 64 or 512 samples by KL on held-out documents, lr 3e-4 on broad text",
     "strategy": "mone", "ratio": 0.5,  # moeprune.recover.choose: one recipe, the count chosen per model and seed
     "router_kd": {**KD, "steps": 1000, "lr": 3e-4, "samples": [64, 512], "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 1000 steps, 64 or 512 samples or their mean by KL on held-out documents, lr 3e-4 on broad text",
     "strategy": "mone", "ratio": 0.5,  # the same two candidates, and the mean of their routers as a third
     "router_kd": {**KD, "steps": 1000, "lr": 3e-4, "samples": [64, 512], "average": True, "source": "builtin:broad-mixed"}},
    {"name": "mone + router-kd, 30 steps", "strategy": "mone", "ratio": 0.5, "router_kd": {**KD, "steps": 30}},
    {"name": "reap + sparsegpt 50%", "strategy": "reap", "ratio": 0.5,
     "sparsify": {"method": "sparsegpt", "sparsity": 0.5}},
    {"name": "auto + sparsegpt 50% + router-kd", "pick": "auto", "strategy": "auto", "ratio": 0.5,
     "sparsify": {"method": "sparsegpt", "sparsity": 0.5}, "router_kd": KD},
    {"name": "premoe, code-task calibration", "strategy": "premoe", "ratio": 0.5,
     "calibration": {"source": "builtin:code"}},
    {"name": "camera slim 50% of channels", "strategy": "frequency", "ratio": 0.0,
     "slim": {"ratio": 0.5, "method": "camera"}, "group_ratio": 0.5},
    {"name": "dynamic skip (all experts kept)", "strategy": "frequency", "ratio": 0.0, "dynamic_skip": True,
     "tasks": True},
]
