"""The naive baseline: the script a user writes first.

One paho-mqtt subscriber that decodes each frame and runs ONNX Runtime (default session options)
inside its message callback, then publishes the answer. It gets TCP_NODELAY like the agent, so the
comparison measures the architecture, not Nagle's algorithm.

    python -m bench.naive_subscriber --port 1883 --device-id naive
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

MODELS = Path(__file__).resolve().parent.parent / "models"


def spawn(port: int, device_id: str, model: str, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """This script as its own process (the benchmarks' naive baseline), logging into `log`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.naive_subscriber",
            "--port",
            str(port),
            "--device-id",
            device_id,
            "--model",
            model,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=MODELS.parent,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--device-id", default="naive")
    parser.add_argument("--model", default="efficientnet-lite0")
    args = parser.parse_args()

    folder = MODELS / args.model
    session = ort.InferenceSession(str(folder / "model.onnx"))
    labels = (folder / "labels.txt").read_text().splitlines()
    inp = session.get_inputs()[0]
    # The bundled detector (NHWC, raw pixels, boxes out) or a classifier (NCHW, normalised, logits).
    detector = inp.shape[-1] == 3
    size = inp.shape[1] if detector else inp.shape[2]
    result_topic = f"edge/{args.device_id}/result"

    def on_message(client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        image = Image.open(io.BytesIO(msg.payload)).convert("RGB").resize((size, size))
        if detector:
            rows = session.run(None, {inp.name: np.asarray(image, np.float32)[None]})[0][0]
            found = [{"label": labels[int(r[5])], "score": float(r[4])} for r in rows if r[4] >= 0.3]
            reply(client, msg, json.dumps({"detections": found}))
            return
        x = ((np.asarray(image, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)[None]
        logits = session.run(None, {inp.name: x})[0][0]
        best = int(logits.argmax())
        reply(
            client,
            msg,
            json.dumps({"top": [{"index": best, "label": labels[best], "score": float(logits[best])}]}),
        )

    def reply(client: mqtt.Client, msg: mqtt.MQTTMessage, body: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr:
            props.CorrelationData = corr
        client.publish(
            getattr(msg.properties, "ResponseTopic", None) or result_topic, body, qos=1, properties=props
        )

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket):  # None only before a connection exists
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(f"edge/{args.device_id}/infer", qos=1)
        client.publish(f"edge/{args.device_id}/status", json.dumps({"online": True}), qos=1, retain=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    client.on_connect = on_connect
    client.connect(args.host, args.port)
    client.loop_forever()


if __name__ == "__main__":
    main()
