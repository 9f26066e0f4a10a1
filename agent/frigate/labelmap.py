"""The class ids Frigate expects: a repository model's labels mapped, by name, onto Frigate's labelmap.

Frigate reads a detector's `class_id` through its own labelmap, so the ids answered must be that
map's. Its default `labelmap.txt` numbers COCO the way the COCO paper does (91 ids, 11 of them unused)
minus one: person 0, dog 17. Its `coco-80` map is the contiguous COCO-80 order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# COCO's 91 category ids minus one (the unused ones included, so the ids line up).
_COCO91_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant street_sign "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe hat backpack "
    "umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle plate wine_glass cup fork knife spoon bowl "
    "banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch potted_plant bed "
    "mirror dining_table window desk toilet door tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator blender book clock vase scissors teddy_bear hair_drier toothbrush "
    "hair_brush"
)
COCO91 = _COCO91_NAMES.split()
_UNUSED = {
    "street_sign",
    "hat",
    "shoe",
    "eye_glasses",
    "plate",
    "mirror",
    "window",
    "desk",
    "door",
    "blender",
    "hair_brush",
}
COCO80 = [name for name in COCO91 if name not in _UNUSED]

_LINE = re.compile(r"^\s*(\d+)\s+(.+?)\s*$")


class LabelmapError(ValueError):
    """A labelmap file that cannot be read or holds no labels."""


def normalise(label: str) -> str:
    """'traffic_light', 'Traffic Light' and 'traffic-light' name the same class."""
    return re.sub(r"[\s_-]+", " ", label.strip().lower())


def load(spec: str) -> dict[int, str]:
    """id -> label for "coco91", "coco80", or a file in Frigate's format ("<id> <label>" a line, or one
    label a line numbered from 0). Blocking (reads a file): call at start."""
    if spec == "coco91":
        return dict(enumerate(COCO91))
    if spec == "coco80":
        return dict(enumerate(COCO80))
    try:
        text = Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelmapError(f"labelmap {spec}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    numbered = [_LINE.match(line) for line in lines]
    if lines and all(numbered):
        out = {int(m.group(1)): m.group(2) for m in numbered if m}
    else:
        out = {index: line.strip() for index, line in enumerate(lines)}
    if not out:
        raise LabelmapError(f"labelmap {spec}: no labels in it")
    return out


def class_ids(model_labels: tuple[str, ...], labelmap: dict[int, str]) -> tuple[np.ndarray, list[str]]:
    """For each class of the model, the id Frigate knows it by (-1: not in the labelmap, never
    answered), and the model's labels that found no id. The first id of a name wins: Frigate's
    default map names id 7 "car" as well as id 2, and a model's "car" is answered 2."""
    first: dict[str, int] = {}
    for index in sorted(labelmap):
        first.setdefault(normalise(labelmap[index]), index)
    ids = np.array([first.get(normalise(label), -1) for label in model_labels], dtype=np.int64)
    missing = [label for label, found in zip(model_labels, ids, strict=True) if found < 0]
    return ids, missing
