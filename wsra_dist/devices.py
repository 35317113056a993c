"""`--device` values, checked before any work: a device this machine does not have, or a string torch cannot
parse, is one usage line naming the option (torch would fail later with "Torch not compiled with CUDA enabled"
or "Expected one of cpu, cuda, ... device type", reported as an internal error)."""

from __future__ import annotations

from .errors import UsageError


def check_device(value: str | None, option: str = "--device", words: tuple[str, ...] = ()) -> str | None:
    """`value` when torch can use it here; None and the command's own `words` (e.g. "auto") pass through."""
    if value is None or value in words:
        return value
    import torch

    usable = "cpu, cuda, cuda:N" + "".join(f", {w}" for w in words)
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {value}: not a device name (use {usable})") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
            raise UsageError(f"{option} {value}: no CUDA device on this machine ({why}); use {option} cpu")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"{option} {value}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"{option} {value}: no Apple MPS device on this machine; use {option} cpu")
    elif dev.type != "cpu":
        raise UsageError(f"{option} {value}: device type {dev.type!r} is not used by this tool (use {usable})")
    return value


def check_port(value: int, option: str = "--port") -> int:
    """A TCP port to listen on: 0 (any free one) to 65535 (socket.bind's "port must be 0-65535" was an internal
    error)."""
    if not 0 <= value <= 65535:
        raise UsageError(f"{option} {value}: a port is a number from 0 to 65535 (0: any free one)")
    return value
