"""Model FLOPs utilization needs the card's peak: dense (no sparsity) bf16 tensor-core FLOP/s from
NVIDIA's datasheets, by the name torch reports. A card not in the table gets a warning and no
MFU, never a guess: the H100 alone spans 756 (PCIe) to 989 (SXM) TFLOP/s."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# (every word that must be in the device name, peak). First match wins: variants before families.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),  # H200 SXM (torch: "NVIDIA H200")
    (("H100", "NVL"), 835e12),
    (("H100", "PCIe"), 756e12),
    (("H100", "HBM3"), 989e12),  # H100 SXM5 (torch: "NVIDIA H100 80GB HBM3")
    (("H100", "SXM"), 989e12),
    (("A100",), 312e12),  # SXM4 and PCIe share the dense bf16 peak
    (("L40S",), 362e12),
    (("L4",), 121e12),
]


def peak_flops(device_name: str) -> float | None:
    for words, flops in PEAK_BF16_FLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return flops
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """The peak of `device` (None on CPU, or with a warning for a card not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name)
    if peak is None:
        log.warning("no bf16 peak known for %r: MFU is not reported (add it to PEAK_BF16_FLOPS in %s)", name, __name__)
    return peak
