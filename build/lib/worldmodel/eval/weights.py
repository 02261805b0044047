"""Loading user-supplied network weights (I3D for FVD, AlexNet + LPIPS layers) with clear errors."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable

import torch
from torch import nn


def load_weights(
    network: nn.Module,
    path: str | os.PathLike,
    what: str,
    adapt: Callable[[dict], dict] = lambda state: state,
) -> nn.Module:
    """Load `path` into `network` (in eval mode); `what` names the weights in errors.
    `adapt` reshapes the file's entries where its layout differs from the module's."""
    try:
        state = adapt(torch.load(path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, pickle.UnpicklingError, AttributeError) as error:
        raise ValueError(f"{path}: cannot read {what} weights ({error})") from error
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not fit
        missing, unexpected = [str(error).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise ValueError(
            f"{path}: not {what} weights in the expected layout; "
            f"missing {missing[:3]}..., unexpected {unexpected[:3]}..."
        )
    return network.eval()
