"""Peak memory of one training step: CUDA's allocator high-water mark on a GPU, the process's peak RSS on a CPU."""
from __future__ import annotations

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Resets the high-water mark on construction; ``megabytes()`` is the peak since then (0.0 where the platform
    cannot tell: no /proc)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM restarts from the current RSS
                f.write("5")
        except OSError:
            pass

    def megabytes(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            return _status_kib("VmHWM") / 1024
        except OSError:
            return 0.0
