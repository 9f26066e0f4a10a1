"""A real RTSP server for tests and demos: GStreamer's gst-rtsp-server serving JPEG photos in a loop.

Run with the system Python (Debian's python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-good):

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --frames-dir DIR --fps 5

serves rtsp://127.0.0.1:8554/cam: the JPEG files of DIR (all the same size), in name order, looped,
as RTP/JPEG. It prints "ready" once it listens.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--frames-dir", required=True, help="JPEG files named 000.jpg, 001.jpg, ...")
    parser.add_argument("--fps", type=int, default=5)
    parser.add_argument("--path", default="/cam")
    args = parser.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f'( multifilesrc location="{args.frames_dir}/%03d.jpg" loop=true '
        f'caps="image/jpeg,framerate={args.fps}/1" ! jpegdec ! videoconvert ! '
        "jpegenc quality=90 ! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory(args.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on port {args.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    print("ready", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
