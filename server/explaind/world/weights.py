"""Save and load module weights as (fp16) safetensors; shared by every world model."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def save_weights(module: nn.Module, path: str | Path, *, half: bool = True) -> Path:
    """Write ``module``'s state dict; floating tensors are stored fp16 when ``half``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    save_file(state, path)
    return path


def load_weights(module: nn.Module, path: str | Path) -> nn.Module:
    """Load fp16/fp32 safetensors into ``module`` (cast to its fp32 parameters)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file missing: {path}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    module.load_state_dict(state)
    return module
