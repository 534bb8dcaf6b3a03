"""Model FLOPs utilization (MFU): the model's training FLOPs at the measured throughput over
the device's peak, as nanoGPT's ``estimate_mfu`` and the PaLM paper (appendix B) count it.

A model that knows its FLOPs per training unit (``flops_per_token()``: the GPT's 6 N + 12 L T d
per token, forward and backward) gets an MFU; the peak is ``trainer.peak_tflops`` or, on a GPU
in :data:`PEAK_TFLOPS`, its datasheet's dense 16-bit tensor peak (nanoGPT counts against the
bf16 peak whatever the precision: so does this). Elsewhere (a CPU, an unlisted GPU): none.
"""

from __future__ import annotations

from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core TFLOPS from NVIDIA's datasheets (V100: fp16), matched
# in order against torch.cuda.get_device_name: the first substring found wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("V100", 125.0), ("RTX 4090", 165.0),
)


def peak_tflops(device: torch.device, override: float = 0.0) -> float | None:
    """One device's peak for the MFU: ``override`` when > 0, else the table's entry for this
    GPU, else None."""
    if override > 0:
        return float(override)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def model_flops(model: Any) -> float | None:
    """The model's training FLOPs per throughput unit, when it says (``flops_per_token``)."""
    fn = getattr(model, "flops_per_token", None)
    return float(fn()) if callable(fn) else None


def mfu(flops_per_unit: float | None, units_per_s: float, peak: float | None,
        devices: int = 1) -> float | None:
    """The fraction of ``devices`` x ``peak`` TFLOPS that ``units_per_s`` (all devices
    together) uses; None without FLOPs or a peak."""
    if not flops_per_unit or not peak or units_per_s <= 0:
        return None
    return flops_per_unit * units_per_s / (peak * 1e12 * devices)
