"""The console's model store refuses what `edge-agent models add` would refuse, and unsafe archives
(docs/fleet.md "Uploading"); it keeps one copy of each file and forgets files no version uses."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest

from cloud_console.model_store import ModelRejected, ModelStore
from tests.conftest import MODELS

NAME = "efficientnet-lite0"


def folder_of(tmp: Path, version: str = "1.1.0") -> Path:
    folder = tmp / f"src-{version}" / NAME
    folder.mkdir(parents=True)
    for file in ("model.toml", "model.onnx", "labels.txt"):
        shutil.copy(MODELS / NAME / file, folder / file)
    toml = (folder / "model.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"')
    (folder / "model.toml").write_text(toml)
    return folder


def tar_path(tmp: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path = tmp / "upload.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_valid_version_is_kept_once_per_file(tmp_path):
    store = ModelStore(tmp_path / "store")
    a = store.add_archive(tar_path(tmp_path, files_of(folder_of(tmp_path, "1.1.0"))), "alice")
    b = store.add_archive(tar_path(tmp_path, files_of(folder_of(tmp_path, "1.2.0"))), "alice")
    assert (a["version"], b["version"]) == ("1.1.0", "1.2.0")
    onnx = {f["sha256"] for e in (a, b) for f in e["files"] if f["name"] == "model.onnx"}
    assert len(onnx) == 1 and store.blob(onnx.pop()) is not None  # one copy for both versions
    assert store.newest(NAME) == "1.2.0"
    manifest = store.manifest(NAME, "1.1.0", "https://console.example:8443/")
    assert manifest.artifacts[0].url.startswith("https://console.example:8443/api/blobs/")
    store.delete(NAME, "1.1.0")
    store.delete(NAME, "1.2.0")
    assert list(store.blobs.iterdir()) == [] and store.list() == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f.pop("labels.txt"), "labels file 'labels.txt' is missing"),
        (lambda f: f.pop("model.toml"), "no model.toml"),
        (lambda f: f.pop("model.onnx"), "none of the artifacts"),
        (lambda f: f.update({"model.onnx": f["model.onnx"][:-1] + b"x"}), "sha256"),
        (lambda f: f.update({"labels.txt": b"\n\n"}), "is empty"),
        (lambda f: f.update({"model.toml": b"name = 'x'"}), "model.toml"),
        (lambda f: f.update({"model.toml": f["model.toml"].replace(b'"1.1.0"', b'"../up"')}), "version"),
    ],
)
def test_an_invalid_model_is_refused_with_the_reason(tmp_path, change, reason):
    files = files_of(folder_of(tmp_path))
    change(files)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelRejected, match=reason):
        store.add_archive(tar_path(tmp_path, files), "alice")
    assert store.list() == [] and list(store.blobs.iterdir()) == []


@pytest.mark.parametrize(
    ("members", "links", "reason"),
    [
        ({"../model.toml": b"x"}, None, "no '..'"),
        ({"/etc/model.toml": b"x"}, None, "no '..'"),
        ({"a/b/model.toml": b"x"}, None, "one folder"),
        ({".hidden": b"x"}, None, "plain file name"),
        ({}, {"model.toml": "/etc/passwd"}, "only plain files"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path, members, links, reason):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelRejected, match=reason):
        store.add_archive(tar_path(tmp_path, members, links), "alice")


def test_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ModelRejected, match="not a tar archive"):
        ModelStore(tmp_path / "store").add_archive(path, "alice")


def test_an_upload_of_the_same_version_replaces_it_and_its_old_files(tmp_path):
    store = ModelStore(tmp_path / "store")
    files = files_of(folder_of(tmp_path))
    first = store.add_archive(tar_path(tmp_path, files), "alice")
    files["labels.txt"] = b"".join(b"renamed " + line + b"\n" for line in files["labels.txt"].splitlines())
    second = store.add_archive(tar_path(tmp_path, files), "bob")
    old_labels = next(f["sha256"] for f in first["files"] if f["name"] == "labels.txt")
    assert [e["by"] for e in store.list()] == ["bob"]
    assert store.blob(old_labels) is None  # no version lists it any more
    assert all(store.blob(f["sha256"]) is not None for f in second["files"])
