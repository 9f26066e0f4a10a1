"""The model repository refuses what it cannot trust: bad checksums, paths and names."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.service.model_repo import ModelError, ModelRepository
from tests.conftest import MODELS


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(MODELS / "efficientnet-lite0", root / "efficientnet-lite0")
    return ModelRepository(root)


def test_bundled_models_verify():
    repo = ModelRepository(MODELS)
    assert {"efficientnet-lite0", "efficientnet-lite1"} <= set(repo.names())
    model = repo.load("efficientnet-lite0")
    assert len(model.labels) == 1000 and model.labels[967] == "espresso"
    assert model.input.size == (224, 224)


def test_checksum_mismatch_refused(repo):
    onnx = repo.root / "efficientnet-lite0" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        repo.load("efficientnet-lite0")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "a/b", "UPPER", "", "x" * 80])
def test_bad_names_refused(repo, name):
    with pytest.raises(ModelError):
        repo.load(name)


def test_unknown_model_lists_available(repo):
    with pytest.raises(ModelError, match="efficientnet-lite0"):
        repo.load("nope")


def test_artifact_path_escaping_folder_refused(repo, tmp_path):
    manifest = repo.root / "efficientnet-lite0" / "model.toml"
    manifest.write_text(manifest.read_text().replace('file = "model.onnx"', 'file = "../../secret.onnx"'))
    with pytest.raises(ModelError, match="inside"):
        repo.load("efficientnet-lite0")
    manifest.write_text(manifest.read_text().replace('file = "../../secret.onnx"', 'file = "/etc/passwd"'))
    with pytest.raises(ModelError, match="inside"):
        repo.load("efficientnet-lite0")


def test_symlink_out_of_repository_refused(repo, tmp_path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"not yours")
    target = repo.root / "efficientnet-lite0" / "model.onnx"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(ModelError, match="outside"):
        repo.load("efficientnet-lite0")


def test_symlinked_model_folder_out_of_repository_refused(repo, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(repo.root / "efficientnet-lite0", elsewhere)
    (repo.root / "sneaky").symlink_to(elsewhere)
    with pytest.raises(ModelError, match="outside"):
        repo.load("sneaky")


def test_manifest_with_unknown_keys_refused(repo):
    manifest = repo.root / "efficientnet-lite0" / "model.toml"
    manifest.write_text("surprise = 1\n" + manifest.read_text())
    with pytest.raises(ModelError, match="bad manifest"):
        repo.load("efficientnet-lite0")


def test_device_may_hold_only_the_artifacts_it_uses(repo):
    """A model folder with only model.onnx serves ONNX Runtime; a backend that needs a missing
    artifact says which one and how to install it; a present artifact is still verified."""
    from backends import registry
    from backends.base import ModelLoadError

    folder = repo.root / "efficientnet-lite0"
    for name in ("model.tflite", "model_int8.tflite", "model.pt2"):
        (folder / name).unlink()
    model = repo.load("efficientnet-lite0")
    assert set(model.artifacts.files) == {"onnx"}
    session = registry.get("onnxruntime").load(model.artifacts, "cpu", {"threads": 1})
    session.close()
    with pytest.raises(ModelLoadError, match=r"model\.pt2, which torch needs, is not installed"):
        registry.get("torch").load(model.artifacts, "cpu", {})
    onnx = folder / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ModelError, match="sha256"):
        repo.load("efficientnet-lite0")
    onnx.unlink()
    with pytest.raises(ModelError, match="none of its artifacts is present"):
        repo.load("efficientnet-lite0")


def test_models_command_adds_a_verified_model_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    """`edge-agent models add` copies a model in only after checking it; `models` lists and verifies."""
    repo_dir = tmp_path / "repo"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "models", "--models", str(repo_dir), *args],
            capture_output=True,
            text=True,
        )

    good = cli("add", str(MODELS / "efficientnet-lite1"))
    assert good.returncode == 0, good.stderr
    listed = json.loads(cli("--json").stdout)
    assert [(m["name"], m["verified"], m["artifacts"]) for m in listed] == [
        ("efficientnet-lite1", True, ["onnx"])
    ]
    assert cli("add", str(MODELS / "efficientnet-lite1")).returncode == 1  # exists

    tampered = tmp_path / "src" / "efficientnet-lite1"
    shutil.copytree(MODELS / "efficientnet-lite1", tampered)
    with (tampered / "model.onnx").open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02\x03")
    bad = cli("add", "--force", str(tampered))
    assert bad.returncode == 1 and "sha256" in bad.stderr, bad.stderr
    # The good copy stays, untouched and still verified.
    assert cli().returncode == 0


def test_an_openvino_irs_weights_are_checksummed_too(tmp_path: Path) -> None:
    """An OpenVINO IR is an `.xml` and its `.bin`: `edge-agent models` verifies both, so weights
    corrupted on disk fail the check instead of loading."""
    ov = pytest.importorskip("openvino")
    import hashlib

    folder = tmp_path / "repo" / "lite0-ir"
    folder.mkdir(parents=True)
    ov.save_model(
        ov.convert_model(str(MODELS / "efficientnet-lite0" / "model.onnx")), str(folder / "model.xml")
    )
    shutil.copy(MODELS / "efficientnet-lite0" / "labels.txt", folder / "labels.txt")
    digest = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("model.xml", "model.bin")}
    manifest = (MODELS / "efficientnet-lite0" / "model.toml").read_text().split("\n[artifacts.")[0]
    (folder / "model.toml").write_text(
        manifest.replace('"efficientnet-lite0"', '"lite0-ir"')
        + f'\n[artifacts.openvino]\nfile = "model.xml"\nsha256 = "{digest["model.xml"]}"\n'
        + f'weights_sha256 = "{digest["model.bin"]}"\n'
    )

    def models() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", "models", "--json", "--models", str(folder.parent)],
            capture_output=True,
            text=True,
        )

    good = models()
    assert good.returncode == 0, good.stdout + good.stderr
    (entry,) = json.loads(good.stdout)
    assert entry["verified"] and entry["artifacts"] == ["openvino"]
    assert entry["size_mb"] > 5, "the weights (fp16: 9 MB) count in the model's size"
    with (folder / "model.bin").open("r+b") as fh:
        fh.seek(4096)
        fh.write(b"\x00\x01\x02\x03")
    bad = models()
    assert bad.returncode == 1
    (entry,) = json.loads(bad.stdout)
    assert not entry["verified"] and "model.bin sha256" in entry["error"], entry
    (folder / "model.bin").unlink()
    (entry,) = json.loads(models().stdout)
    assert "model.bin" in entry["error"] and "missing" in entry["error"], entry


def test_an_openvino_ir_without_its_weights_checksum_is_refused(repo) -> None:
    folder = repo.root / "efficientnet-lite0"
    toml = folder / "model.toml"
    toml.write_text(
        toml.read_text() + '\n[artifacts.openvino]\nfile = "model.xml"\nsha256 = "' + "0" * 64 + '"\n'
    )
    with pytest.raises(ModelError, match="weights_sha256"):
        repo.load("efficientnet-lite0")


def _new_version(versions_root: Path, name: str, version: str, label_prefix: str = "") -> Path:
    """A copy of the bundled model as `version` in the delivered-versions folder (docs/fleet.md)."""
    folder = versions_root / name / version
    shutil.copytree(MODELS / name, folder, ignore=shutil.ignore_patterns("*.tflite", "*.pt2"))
    toml = (folder / "model.toml").read_text().replace('version = "1.0.0"', f'version = "{version}"')
    (folder / "model.toml").write_text(toml)
    if label_prefix:
        labels = (folder / "labels.txt").read_text().splitlines()
        (folder / "labels.txt").write_text("\n".join(label_prefix + x for x in labels) + "\n")
    return folder


def test_versions_newest_serves_and_a_pin_picks_one(repo, tmp_path):
    versions = tmp_path / "versions"
    _new_version(versions, "efficientnet-lite0", "1.0.10", label_prefix="v10 ")
    _new_version(versions, "efficientnet-lite0", "1.0.9", label_prefix="v9 ")
    repo = ModelRepository(repo.root, versions)
    assert list(repo.versions("efficientnet-lite0")) == ["1.0.10", "1.0.9", "1.0.0"]
    assert repo.load("efficientnet-lite0").labels[967] == "v10 espresso"
    assert repo.load("efficientnet-lite0", version="1.0.9").labels[967] == "v9 espresso"
    assert repo.load("efficientnet-lite0", version="1.0.0").labels[967] == "espresso"
    with pytest.raises(ModelError, match=r"no version '2'.*installed: 1\.0\.10, 1\.0\.9, 1\.0\.0"):
        repo.manifest("efficientnet-lite0", "2")
    with pytest.raises(ModelError, match="not valid"):
        repo.manifest("efficientnet-lite0", "..")
    installed = {m.name: m for m in repo.installed()}
    entry = installed["efficientnet-lite0"]
    assert [v.version for v in entry.versions] == ["1.0.10", "1.0.9", "1.0.0"]
    onnx = MODELS / "efficientnet-lite0" / "model.onnx"
    assert entry.versions[0].sha256["model.onnx"] == sha256_of(onnx)


def test_delivered_folder_must_hold_its_version(repo, tmp_path):
    versions = tmp_path / "versions"
    folder = _new_version(versions, "efficientnet-lite0", "2")
    folder.rename(versions / "efficientnet-lite0" / "3")
    repo = ModelRepository(repo.root, versions)
    with pytest.raises(ModelError, match="folder '3' holds version '2'"):
        repo.load("efficientnet-lite0", version="3")


def test_bundled_model_is_its_manifest_version():
    repo = ModelRepository(MODELS)
    assert list(repo.versions("efficientnet-lite0")) == ["1.0.0"]


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_command_lists_delivered_versions(tmp_path):
    """`edge-agent models` shows the delivered versions ([models] dir) beside models_dir's."""
    versions = tmp_path / "delivered"
    _new_version(versions, "efficientnet-lite0", "1.1.0", label_prefix="v11 ")
    config = tmp_path / "agent.toml"
    config.write_text(f'models_dir = "{MODELS}"\n[models]\ndir = "{versions}"\n')
    out = subprocess.run(
        [sys.executable, "-m", "agent", "models", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    entries = {e["name"]: e for e in json.loads(out.stdout)}
    lite0 = entries["efficientnet-lite0"]
    assert lite0["verified"] and lite0["version"] == "1.1.0", lite0
    assert lite0["versions"] == ["1.1.0", "1.0.0"]
