"""What every runtime on an NVIDIA GPU needs from the device, declared once for the CUDA backends.

Desktop and data-centre GPUs appear as /dev/nvidia* (each GPU, nvidiactl, nvidia-uvm*, nvidia-caps);
a Jetson adds its host1x and memory nodes (/dev/nvhost-*, /dev/nvmap).
"""

from __future__ import annotations

DEVICE_NODES = ("/dev/nvidia*", "/dev/nvhost-*", "/dev/nvmap")
UNIT_DEVICES = ("char-nvidia*", "char-nvhost*", "char-nvmap", "/dev/nvhost-ctrl", "/dev/nvmap")
