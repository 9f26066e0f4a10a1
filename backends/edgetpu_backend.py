"""Coral Edge TPU: the libedgetpu delegate loaded into the TFLite interpreter, as pycoral does.

(The PyPI package named `pycoral` is an unrelated project: the Coral runtime is the `libedgetpu1-std`
Debian package from Coral's repository plus a TFLite interpreter.) Devices: PCIe/M.2 TPUs appear as
/dev/apex_N (`pci:N`), USB accelerators by their USB ids (`usb:N`). One interpreter per TPU;
models must be compiled for the TPU (`*_edgetpu.tflite`, artifact format `edgetpu`).
"""

from __future__ import annotations

import ctypes.util
import glob
import os
from collections.abc import Mapping
from typing import Any

from backends.base import (
    Backend,
    BackendInfo,
    BackendUnavailable,
    ModelArtifacts,
    ModelLoadError,
    usb_devices,
)
from backends.tflite_backend import RUNTIME_PACKAGES, TfliteSession, interpreter_module

# USB ids of the Coral USB Accelerator: before (Global Unichip) and after (Google) firmware load.
CORAL_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}


def usb_tpus() -> list[str]:
    return [f"usb:{i}" for i, _ in enumerate(usb_devices(CORAL_USB_IDS))]


def pci_tpus() -> list[str]:
    return [f"pci:{i}" for i, _ in enumerate(sorted(glob.glob("/dev/apex_*")))]


def find_libedgetpu() -> str | None:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/libedgetpu.so.1",
        "/usr/lib/aarch64-linux-gnu/libedgetpu.so.1",
        "/usr/lib/arm-linux-gnueabihf/libedgetpu.so.1",
    ):
        if os.path.exists(candidate):
            return candidate
    found = ctypes.util.find_library("edgetpu")
    return found


class EdgeTpuBackend(Backend):
    name = "edgetpu"
    formats = ("edgetpu",)
    crash_prone = True  # a delegate built against other library versions segfaults at load
    info = BackendInfo(
        devices=("usb:N", "pci:N"),
        device_nodes=("/dev/apex_*",),
        usb_ids=frozenset(CORAL_USB_IDS),
        shared={},  # each TPU is its own resource
        packages=RUNTIME_PACKAGES,
        extra="tflite",
        install="apt-get install libedgetpu1-std from Coral's repository, and a TFLite runtime",
        # PCIe/M.2 TPUs (/dev/apex_*), USB accelerators (/dev/bus/usb/*).
        unit_devices=("char-apex", "char-usb_device"),
    )

    def available(self) -> tuple[bool, str]:
        if interpreter_module() is None:
            return False, f"no TFLite runtime ({self.info.install_hint()}, or tflite-runtime)"
        if find_libedgetpu() is None:
            return False, "libedgetpu not installed (apt-get install libedgetpu1-std from Coral's repository)"
        if not self.devices_present():
            return False, "no Edge TPU found (no /dev/apex_* and no Coral USB device)"
        return True, ""

    @staticmethod
    def devices_present() -> list[str]:
        return pci_tpus() + usb_tpus()

    def devices(self) -> list[str]:
        return self.devices_present() if self.available()[0] else []

    def load(self, model: ModelArtifacts, device: str, options: Mapping[str, Any]) -> TfliteSession:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(reason)
        device = self.canonical_device(device)
        path = self.artifact(model)
        module = interpreter_module()
        try:
            delegate = module.load_delegate(find_libedgetpu(), {"device": device})
            interpreter = module.Interpreter(model_path=os.fspath(path), experimental_delegates=[delegate])
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelLoadError(f"edgetpu could not load {path.name} on {device}: {exc}") from exc
        return TfliteSession(interpreter, model.layouts.get("edgetpu", "NHWC"))
