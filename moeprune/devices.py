"""Where models run: `--device cpu|cuda|cuda:N|auto`, resolved once into a `torch.device`.

`auto` means the first CUDA GPU when one is visible, else the CPU; with two or more visible GPUs,
an in-memory model is loaded spread over all of them (`device_map_for`: accelerate's
`device_map="auto"`, balanced; its hooks move activations between GPUs, `move_model` leaves such a
model where it is and inputs go to the first GPU, which holds the embeddings). A CUDA device that is not
there is a one-line error naming what is (never a silent fall back to the CPU). Statistics are
accumulated on the CPU in float64 whatever the device (`calibration.observer`), so results do
not depend on where the forward ran beyond the forward's own arithmetic.
"""

from __future__ import annotations

import re

import torch
from torch import nn

DEVICE_HELP = "Device that runs the model: cpu, cuda, cuda:N or auto (CUDA when available, else CPU)."
_PATTERN = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")


def check_device_spec(spec: str) -> str:
    """Validate the syntax of a device string (no CUDA query); returns it normalised."""
    value = str(spec).strip().lower()
    match = _PATTERN.match(value)
    if not match or (match.group(2) and match.group(1) != "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    return value


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` for `spec` (None means auto); refuses CUDA devices that are not visible."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    value = check_device_spec(spec or "auto")
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if value == "auto":
        return torch.device("cuda", 0) if available and count else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    index = int(value.split(":")[1]) if ":" in value else 0
    if not available or count == 0:
        raise ValueError(f"--device {value}: no CUDA GPU is visible to torch (torch {torch.__version__}); use --device cpu")
    if index >= count:
        raise ValueError(f"--device {value}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_map_for(spec: str | torch.device | None = "auto") -> str | None:
    """`"auto"` (accelerate's balanced `device_map` for `from_pretrained`) when `spec` is auto and
    two or more CUDA GPUs are visible; None (load on one device, then `move_model`) otherwise.
    `cuda` / `cuda:N` always mean that one GPU."""
    value = check_device_spec(str(spec) if spec is not None else "auto")
    if value != "auto" or not torch.cuda.is_available():
        return None
    return "auto" if torch.cuda.device_count() >= 2 else None


def is_spread(model: nn.Module) -> bool:
    """True when `model` was dispatched over several devices (`hf_device_map` names more than one)."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len({str(d) for d in device_map.values()}) > 1


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def move_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move `model` to `device` (no copy when it is already there; a model spread over several
    devices by a `device_map` stays as dispatched); returns it."""
    if is_spread(model):
        return model
    return model if model_device(model) == device else model.to(device)
