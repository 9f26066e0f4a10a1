"""The built-in inference runtimes and the device names each may offer (`N` stands for an index).

A status names backends and devices as strings (docs/protocol.md#status); this table is for readers
that import no backend, such as the console's fleet simulator. It is the backends' own declarations
(`info.devices` in backends/*.py), copied here because the console may import only this package;
tests/test_backend_declarations.py fails, printing the table to paste, when the two differ.
"""

from __future__ import annotations

import re

BACKEND_DEVICES: dict[str, tuple[str, ...]] = {
    "edgetpu": ("usb:N", "pci:N"),
    "onnxruntime": ("cpu", "cuda:N", "tensorrt:N"),
    "openvino": ("CPU", "GPU", "GPU.N", "NPU", "AUTO"),
    "tensorrt": ("cuda:N",),
    "tflite": ("cpu",),
    "torch": ("cpu", "cuda:N"),
}


def device_declared(backend: str, device: str) -> bool:
    """Whether `device` is a name `backend` may offer (case-insensitive, `N` any index)."""
    wanted = device.lower()
    for pattern in BACKEND_DEVICES.get(backend, ()):
        if pattern.endswith("N"):
            if re.fullmatch(re.escape(pattern[:-1].lower()) + "[0-9]+", wanted):
                return True
        elif pattern.lower() == wanted:
            return True
    return False
