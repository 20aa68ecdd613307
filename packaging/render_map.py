"""Render the MONAI Application Package (MAP) build context offline.

    python packaging/render_map.py [--out build/map] [--models models] [--timeout 1800]
                                   [--allow-no-models]

Writes into OUT (by ``make package``)::

    Dockerfile                    CPU image: wheels from wheels/ (pip --no-index), no network
    Dockerfile.gpu                GPU image (CUDA + cuDNN base, onnxruntime-gpu + TensorRT);
                                  not buildable on the project's machine, see docs/packaging.md
    Dockerfile.gpu.dockerignore   keeps wheels/ out of the GPU build's context
    app/                          -> /opt/holoscan/app: app.py, autocontour/, operators/, config/,
                                     requirements.txt (also a valid `monai-deploy package` input)
    app.config                    -> /var/holoscan/app.yaml (the repo's app.yaml)
    map/app.json                  -> /etc/holoscan/app.json (Application Manifest)
    map/pkg.json                  -> /etc/holoscan/pkg.json (Package Manifest, CPU image)
    map/pkg.gpu.json              -> /etc/holoscan/pkg.json (Package Manifest, GPU image)
    models/<name>/                -> /opt/holoscan/models: model.yaml + every file it lists,
                                     each checked against its sha256, + the model card (*.md)
    docs/                         -> /opt/holoscan/docs
    pip/requirements.txt          runtime pins (the repo's requirements.txt)
    pip/requirements-gpu.txt      the same with onnxruntime -> packaging/requirements-gpu.txt
    mde/                          NOT in the image: the MONAI Deploy Express route (deploy/mde.py):
                                  workflow.json, configure.sh (Informatics Gateway + Workflow
                                  Manager), README.md; see docs/deployment.md
    wheels/                       NOT written here: packaging/podman.sh fills it (pip download);
                                  kept across renders

The manifests follow the MAP specification (Project-MONAI/monai-deploy,
guidelines/monai-application-package.md, API version 1.0.0) and mirror what holoscan-cli 4.2.0's
``monai-deploy package`` writes, with absolute MAP paths and each model's checksums added.

Pure functions plus a CLI; standard library and PyYAML only; no network access.  This folder has
no ``__init__.py`` on purpose: a package named ``packaging`` on sys.path would shadow the PyPI
``packaging`` library, so run this file as a script and import it by path (tests do).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the app's own modules importable
    sys.path.insert(0, str(ROOT))
from autocontour.model_config import sha256_file  # noqa: E402 - one checksum routine for app and package
from deploy import mde  # noqa: E402 - the MONAI Deploy Express workflow beside the MAP (docs/deployment.md)

# MAP paths (MAP specification, "Table of Important Paths"; holoscan-cli DefaultValues)
API_VERSION = "1.0.0"
APP_DIR = "/opt/holoscan/app"
MODELS_DIR = "/opt/holoscan/models"
DOCS_DIR = "/opt/holoscan/docs"
WORK_DIR = "/var/holoscan"
INPUT_DIR = "/var/holoscan/input"
OUTPUT_DIR = "/var/holoscan/output"
LOGS_DIR = "/var/holoscan/logs"
CONFIG_PATH = "/var/holoscan/app.yaml"
APP_JSON = "/etc/holoscan/app.json"
PKG_JSON = "/etc/holoscan/pkg.json"
VENV_DIR = "/opt/holoscan/venv"
ENTRYPOINT = ["python3", f"{APP_DIR}/app.py"]
SDK = "monai-deploy"

APP_CONTENT = ("app.py", "autocontour", "operators", "config")  # what runs: see app.py's imports
DEFAULT_TIMEOUT = 1800  # seconds; app.json#timeout (0 disables)
DEFAULT_BASE_IMAGE = "localhost/hn-autocontour-base:bookworm"  # debootstrap, packaging/podman.sh
GPU_BASE_IMAGE = "nvcr.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"
MARKER = ".map-context"
KEEP = {"wheels"}  # survives a re-render (downloaded by packaging/podman.sh)
_MEM = re.compile(r"^\d+(\.\d+)?(Mi|Gi)$")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._\-]*)(\[[^\]]*\])?==([^\s;#]+)")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")


class RenderError(Exception):
    """The context cannot be rendered; the message says what to fix."""


# ----------------------------------------------------------------------------- inputs


def project_version(root: Path = ROOT) -> str:
    """``autocontour.__version__``, read without importing the package."""
    tree = ast.parse((root / "autocontour" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise RenderError("autocontour/__init__.py defines no __version__")


def read_app_config(path: Path) -> dict:
    """app.yaml, validated as holoscan-cli 4.2.0 does, plus the keys this renderer needs."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RenderError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict) or "application" not in cfg or "resources" not in cfg:
        raise RenderError(f"{path}: needs 'application' and 'resources' sections")
    app, res = cfg["application"], cfg["resources"]
    if not str(app.get("title", "")).strip():
        raise RenderError(f"{path}: application.title is missing or empty")
    if "version" not in app:
        raise RenderError(f"{path}: application.version is missing")
    for key in ("input-formats", "output-formats"):
        if not isinstance(app.get(key), list) or not app[key]:
            raise RenderError(f"{path}: application.{key} must be a non-empty list (the CLI reads kebab-case keys)")
    for key in ("memory", "gpuMemory", "sharedMemory"):
        if key in res and not _MEM.match(str(res[key])):
            raise RenderError(f"{path}: resources.{key} {res[key]!r} must look like 2048Mi or 1.5Gi")
    for key in ("cpu", "gpu"):
        if key in res and (not isinstance(res[key], (int, float)) or res[key] < 0):
            raise RenderError(f"{path}: resources.{key} must be a non-negative number")
    return cfg


def read_pins(path: Path) -> list[tuple[str, str, str]]:
    """(name, version, the requirement line without its comment) for each line; all must be ``==`` pins."""
    pins = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _PIN.match(line)
        if not m:
            raise RenderError(f"{path}: {line!r} is not pinned with == (the MAP installs exact versions)")
        pins.append((_norm(m.group(1)), m.group(3), line))
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_requirements(cpu_pins: list[tuple[str, str, str]], gpu_pins: list[tuple[str, str, str]]) -> list[str]:
    """The CPU pins with each ``X`` that has an ``X-gpu`` in gpu_pins replaced by it, plus the rest of gpu_pins."""
    gpu_names = {n for n, _, _ in gpu_pins}
    lines = [line for n, _, line in cpu_pins if f"{n}-gpu" not in gpu_names and n not in gpu_names]
    return lines + [line for _, _, line in gpu_pins]


def find_models(models_dir: Path, verify: bool = True) -> list[dict]:
    """One entry per ``models_dir/<name>/model.yaml``: name, version, folder and its files with sha256.

    Every file listed under ``files:`` in model.yaml must exist and (with ``verify``) match its
    sha256: a MAP is never built around a corrupt or half-copied model.
    """
    models = []
    for meta in sorted(Path(models_dir).glob("*/model.yaml")):
        try:
            cfg = yaml.safe_load(meta.read_text())
            files = cfg["files"]
            onnx = files["onnx"]["path"]
        except (yaml.YAMLError, KeyError, TypeError) as exc:
            raise RenderError(f"{meta} is malformed ({type(exc).__name__}: {exc})") from None
        entry = {"name": meta.parent.name, "version": str(cfg.get("version", "")), "folder": meta.parent,
                 "onnx": str(onnx), "files": []}
        for key, spec in files.items():
            try:
                rel, expected = str(spec["path"]), str(spec["sha256"])
            except (KeyError, TypeError):
                raise RenderError(f"{meta}: files.{key} needs path and sha256") from None
            path = meta.parent / rel
            if not path.is_file():
                raise RenderError(f"{meta}: files.{key} {path} is missing")
            if verify:
                actual = sha256_file(path)
                if actual != expected:
                    raise RenderError(f"{path}: sha256 {actual} differs from model.yaml's {expected}")
            entry["files"].append({"path": rel, "sha256": expected, "bytes": path.stat().st_size})
        models.append(entry)
    return models


# ----------------------------------------------------------------------------- manifests


def environment() -> dict[str, str]:
    """The HOLOSCAN_* variables of app.json#environment and the Dockerfiles' ENV."""
    return {
        "HOLOSCAN_APPLICATION": APP_DIR,
        "HOLOSCAN_INPUT_PATH": INPUT_DIR,
        "HOLOSCAN_OUTPUT_PATH": OUTPUT_DIR,
        "HOLOSCAN_WORKDIR": WORK_DIR,
        "HOLOSCAN_MODEL_PATH": MODELS_DIR,
        "HOLOSCAN_CONFIG_PATH": CONFIG_PATH,
        "HOLOSCAN_APP_MANIFEST_PATH": APP_JSON,
        "HOLOSCAN_PKG_MANIFEST_PATH": PKG_JSON,
        "HOLOSCAN_DOCS_PATH": DOCS_DIR,
        "HOLOSCAN_LOGS_PATH": LOGS_DIR,
    }


def app_manifest(cfg: dict, version: str, sdk_version: str, timeout: int) -> dict:
    """/etc/holoscan/app.json (MAP spec, Application Manifest)."""
    app = cfg["application"]
    return {
        "apiVersion": API_VERSION,
        "command": json.dumps(ENTRYPOINT),  # a JSON array in a string, as holoscan-cli writes it
        "environment": environment(),
        "input": {"path": INPUT_DIR, "formats": list(app["input-formats"])},
        "output": {"path": OUTPUT_DIR, "formats": list(app["output-formats"])},
        "sdk": SDK,
        "sdkVersion": sdk_version,
        "timeout": int(timeout),
        "version": version,
        "workingDirectory": WORK_DIR,
    }


def pkg_manifest(cfg: dict, version: str, models: list[dict], gpu: bool) -> dict:
    """/etc/holoscan/pkg.json (MAP spec, Package Manifest) for the GPU or the CPU image.

    The GPU image's resources are app.yaml's verbatim (what holoscan-cli copies); the CPU
    image's say ``gpu: 0`` and drop the GPU memory keys.
    """
    res = dict(cfg["resources"])
    if not gpu:
        res["gpu"] = 0
        for key in ("gpuLimit", "gpuMemory", "gpuMemoryLimit"):
            res.pop(key, None)
    return {
        "apiVersion": API_VERSION,
        "applicationRoot": APP_DIR,
        "modelRoot": MODELS_DIR,
        "models": [
            {"name": m["name"], "path": m["name"], "version": m["version"], "onnx": m["onnx"],
             "files": [{"path": f["path"], "sha256": f["sha256"], "bytes": f["bytes"]} for f in m["files"]]}
            for m in models
        ],
        "resources": res,
        "version": version,
        "platformConfig": "dgpu" if gpu else "cpu",
    }


# ----------------------------------------------------------------------------- Dockerfiles


def _labels(cfg: dict, version: str, sdk_version: str, holoscan_version: str, variant: str) -> str:
    title = str(cfg["application"]["title"]).replace('"', "'")
    return (
        f'LABEL org.opencontainers.image.title="{title}" \\\n'
        f'      org.opencontainers.image.version="{version}" \\\n'
        f'      org.opencontainers.image.description="MONAI Application Package ({variant} image)" \\\n'
        f'      org.opencontainers.image.licenses="Apache-2.0" \\\n'
        f'      org.monai.deploy.app-sdk="{sdk_version}" \\\n'
        f'      org.nvidia.holoscan="{holoscan_version}"\n'
    )


def _env_block() -> str:
    env = environment() | {"PATH": f"{VENV_DIR}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return "ENV " + " \\\n    ".join(f"{k}={v}" for k, v in env.items()) + "\n"


def _ldconfig() -> str:
    """Register the shared libraries that come in wheels (libcudart.so.13 from nvidia-cuda-runtime,
    which holoscan-cu13 links even without a GPU; TensorRT's tensorrt_libs in the GPU image), then
    prove the app's imports work at build time rather than at the first study."""
    sp = f"{VENV_DIR}/lib/python3*/site-packages"
    return (
        f" && (find {sp}/nvidia -mindepth 2 -maxdepth 3 -type d -name lib; \\\n"
        f"     find {sp} -maxdepth 1 -type d -name tensorrt_libs) > /etc/ld.so.conf.d/zz-python-wheels.conf \\\n"
        " && ldconfig \\\n"
        f" && {VENV_DIR}/bin/python -W ignore -c "
        '"import monai.deploy.core, holoscan.core, onnxruntime, pydicom, highdicom, scipy, yaml"'
    )


def _tail(pkg_json: str) -> str:
    """The part both images share: MAP folders, manifests, models, app, user, entry point."""
    return f"""
# MAP folders; the work, input, output and log folders are writable by any uid (run with --user)
RUN mkdir -p {APP_DIR} {MODELS_DIR} {DOCS_DIR} /etc/holoscan {INPUT_DIR} {OUTPUT_DIR} {LOGS_DIR} \\
 && chmod 1777 {WORK_DIR} {INPUT_DIR} {OUTPUT_DIR} {LOGS_DIR} \\
 && (id -u holoscan >/dev/null 2>&1 || useradd --uid 1000 --user-group --create-home --shell /bin/sh holoscan)

COPY docs/ {DOCS_DIR}/
COPY models/ {MODELS_DIR}/
COPY app.config {CONFIG_PATH}
COPY map/app.json {APP_JSON}
COPY {pkg_json} {PKG_JSON}
COPY app/ {APP_DIR}/
RUN python3 -m compileall -q {APP_DIR}

WORKDIR {WORK_DIR}
USER holoscan
# Paths come from the HOLOSCAN_* variables above (app.py's defaults); extra flags such as
# `--backend cpu` or `-l DEBUG` may follow the image name.  Holoscan wants a 32 MiB stack:
# run with --ulimit stack=33554432.
ENTRYPOINT {json.dumps(ENTRYPOINT)}
"""


def dockerfile_cpu(cfg: dict, version: str, sdk_version: str, holoscan_version: str,
                   base_image: str = DEFAULT_BASE_IMAGE) -> str:
    return f"""# MONAI Application Package: hn-autocontour {version}, CPU image.
# Rendered by packaging/render_map.py (`make package`); do not edit.  Build with `make map-image`
# (podman, packaging/podman.sh) or `docker build -t hn-autocontour:{version}-cpu .`.
# Offline: every Python package comes from wheels/ in this context (`pip download -r
# pip/requirements.txt -d wheels` on a Linux x86_64 host with CPython 3.11, Debian bookworm's
# Python); no torch: the app runs ONNX models with onnxruntime (CPU).
# The base image is Debian 12 with python3 + python3-venv (packaging/podman.sh makes it with
# debootstrap); any Debian bookworm image with those two packages works:
#   --build-arg BASE_IMAGE=debian:bookworm-slim needs `apt-get install python3-venv` first.
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}

{_labels(cfg, version, sdk_version, holoscan_version, "CPU")}
{_env_block()}
# Runtime dependencies, pinned (pip/requirements.txt == the repo's requirements.txt), installed
# from the wheels in this context only: --no-index, no network needed.
COPY pip/requirements.txt /opt/holoscan/requirements.txt
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \\
    python3 -m venv {VENV_DIR} \\
 && {VENV_DIR}/bin/python -m pip install --no-cache-dir --no-index --find-links /tmp/wheels \\
        -r /opt/holoscan/requirements.txt \\
{_ldconfig()}
{_tail("map/pkg.json")}"""


def dockerfile_gpu(cfg: dict, version: str, sdk_version: str, holoscan_version: str,
                   base_image: str = GPU_BASE_IMAGE) -> str:
    return f"""# MONAI Application Package: hn-autocontour {version}, GPU image (NVIDIA CUDA 13 + cuDNN 9,
# onnxruntime-gpu with the TensorRT and CUDA execution providers).
# Rendered by packaging/render_map.py (`make package`); do not edit.
#
# NOT BUILT OR RUN ON THE PROJECT'S MACHINE: it has no GPU, no Docker daemon and cannot reach
# nvcr.io.  Build where Docker, the NVIDIA Container Toolkit, nvcr.io and PyPI are reachable:
#   docker build -f Dockerfile.gpu -t hn-autocontour:{version}-gpu .
#   docker run --rm --gpus all --ulimit stack=33554432 --user $(id -u):$(id -g) \\
#     -v /path/to/study:/var/holoscan/input:ro -v /path/to/out:/var/holoscan/output hn-autocontour:{version}-gpu
# onnxruntime-gpu 1.31.1's TensorRT provider links libnvinfer.so.10 / libnvonnxparser.so.10 and
# CUDA 13 (libcudart.so.13, libcublas.so.13, libcudnn.so.9): TensorRT 10 comes from the
# tensorrt-cu13 wheels, CUDA and cuDNN from the base image.  TensorRT engines are cached under
# $HOLOSCAN_WORKDIR/trt-engines (mount a volume there to keep them between runs).
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}

{_labels(cfg, version, sdk_version, holoscan_version, "GPU")}
{_env_block()}
RUN apt-get update \\
 && apt-get install -y --no-install-recommends python3 python3-venv \\
 && rm -rf /var/lib/apt/lists/* \\
 && (userdel -r ubuntu 2>/dev/null || true)

# Runtime dependencies, pinned: pip/requirements-gpu.txt (onnxruntime -> onnxruntime-gpu, + TensorRT)
COPY pip/requirements-gpu.txt /opt/holoscan/requirements.txt
RUN python3 -m venv {VENV_DIR} \\
 && {VENV_DIR}/bin/python -m pip install --no-cache-dir -r /opt/holoscan/requirements.txt \\
{_ldconfig()}
{_tail("map/pkg.gpu.json")}"""


# ----------------------------------------------------------------------------- render


def _clear(out: Path) -> None:
    """Empty OUT for a fresh render, keeping wheels/; refuse a non-empty folder this did not render."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    entries = list(out.iterdir())
    if entries and not (out / MARKER).is_file():
        raise RenderError(f"{out} is not empty and was not rendered by render_map.py ({MARKER} missing): "
                          "pass an empty or new --out folder")
    for p in entries:
        if p.name in KEEP:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def render(out: Path, root: Path = ROOT, models_dir: Path | None = None, timeout: int = DEFAULT_TIMEOUT,
           require_models: bool = True, base_image: str = DEFAULT_BASE_IMAGE) -> dict:
    """Write the MAP build context for the project at ``root`` into ``out``; returns a summary.

    Raises:
        RenderError: app.yaml is invalid or its version is not ``autocontour.__version__``, a
            requirement is not pinned, a model file is missing or corrupt, or (with
            ``require_models``) there is no ``models/*/model.yaml``.
    """
    t0 = time.perf_counter()
    root, out = Path(root).resolve(), Path(out).resolve()
    models_dir = Path(models_dir) if models_dir else root / "models"
    if out == root or out in root.parents or (
        root in out.parents and out.relative_to(root).parts[0] in APP_CONTENT + ("models", "packaging", "docs")
    ):
        raise RenderError(f"--out {out} would overwrite the project's own files")
    cfg = read_app_config(root / "app.yaml")
    version = project_version(root)
    if str(cfg["application"]["version"]) != version:
        raise RenderError(f"app.yaml application.version {cfg['application']['version']!r} differs from "
                          f"autocontour.__version__ {version!r}: update app.yaml")
    pins = read_pins(root / "requirements.txt")
    versions = {n: v for n, v, _ in pins}
    for need in ("monai-deploy-app-sdk", "onnxruntime"):
        if need not in versions:
            raise RenderError(f"requirements.txt does not pin {need}")
    holoscan = next((v for n, v, _ in pins if n.startswith("holoscan-cu") or n == "holoscan"), "")
    gpu_pins = read_pins(root / "packaging" / "requirements-gpu.txt")
    models = find_models(models_dir)
    if require_models and not models:
        raise RenderError(f"no */model.yaml under {models_dir}: export the models first "
                          "(make export) or pass --models DIR (--allow-no-models for a context without them)")

    _clear(out)
    for name in APP_CONTENT:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, out / "app" / name, ignore=_IGNORE)
        else:
            (out / "app").mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / "app" / name)
    shutil.copy2(root / "requirements.txt", out / "app" / "requirements.txt")
    shutil.copy2(root / "app.yaml", out / "app.config")
    (out / "pip").mkdir()
    shutil.copy2(root / "requirements.txt", out / "pip" / "requirements.txt")
    (out / "pip" / "requirements-gpu.txt").write_text(
        "# Rendered from requirements.txt + packaging/requirements-gpu.txt by packaging/render_map.py\n"
        + "\n".join(gpu_requirements(pins, gpu_pins)) + "\n")
    (out / "models").mkdir()
    for m in models:
        dst = out / "models" / m["name"]
        dst.mkdir()
        shutil.copy2(m["folder"] / "model.yaml", dst / "model.yaml")
        for card in sorted(m["folder"].glob("*.md")):  # the model card (README.md), if any
            shutil.copy2(card, dst / card.name)
        for f in m["files"]:
            (dst / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(m["folder"] / f["path"], dst / f["path"])
            if sha256_file(dst / f["path"]) != f["sha256"]:  # the copy, not just the source
                raise RenderError(f"copy of {m['folder'] / f['path']} in {dst} does not match its sha256")
    docs = out / "docs"
    docs.mkdir()
    for doc in sorted((root / "docs").glob("*.md")) if (root / "docs").is_dir() else []:
        shutil.copy2(doc, docs / doc.name)
    (docs / "README.txt").write_text(
        f"hn-autocontour {version}: head-and-neck CT auto-contouring MONAI Application Package.\n"
        "Input: a folder of DICOM files (one study). Output: DICOM-SEG, RTSTRUCT, report.json.\n"
        "Contours are proposals for review by a qualified clinician before any clinical use.\n")

    (out / "map").mkdir()
    sdk_version = versions["monai-deploy-app-sdk"]
    manifests = {
        "map/app.json": app_manifest(cfg, version, sdk_version, timeout),
        "map/pkg.json": pkg_manifest(cfg, version, models, gpu=False),
        "map/pkg.gpu.json": pkg_manifest(cfg, version, models, gpu=True),
    }
    for rel, data in manifests.items():
        (out / rel).write_text(json.dumps(data, indent=2) + "\n")
    (out / "Dockerfile").write_text(dockerfile_cpu(cfg, version, sdk_version, holoscan, base_image))
    (out / "Dockerfile.gpu").write_text(dockerfile_gpu(cfg, version, sdk_version, holoscan))
    (out / "Dockerfile.gpu.dockerignore").write_text("wheels\n")
    # MONAI Deploy Express (Informatics Gateway + Workflow Manager): not part of the image
    try:
        mde.render(out / "mde", version, dict(os.environ), timeout_s=int(timeout) or DEFAULT_TIMEOUT)
    except ValueError as exc:
        raise RenderError(f"MONAI Deploy Express workflow: {exc}") from None
    (out / "wheels").mkdir(exist_ok=True)
    summary = {
        "version": version,
        "sdkVersion": sdk_version,
        "holoscan": holoscan,
        "models": [{"name": m["name"], "version": m["version"], "files": m["files"]} for m in models],
        "timeout": int(timeout),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / MARKER).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "map")
    ap.add_argument("--root", type=Path, default=ROOT, help="the project checkout (default: this one)")
    ap.add_argument("--models", type=Path, help="folder of <name>/model.yaml (default: ROOT/models)")
    ap.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="app.json#timeout in seconds (0: none)")
    ap.add_argument("--base-image", default=DEFAULT_BASE_IMAGE, help="the CPU Dockerfile's default BASE_IMAGE")
    ap.add_argument("--allow-no-models", action="store_true", help="render even without models/*/model.yaml")
    args = ap.parse_args(argv)
    try:
        s = render(args.out, args.root, args.models, args.timeout, not args.allow_no_models, args.base_image)
    except RenderError as exc:
        print(f"render_map: {exc}", file=sys.stderr)
        return 2
    models = ", ".join(f"{m['name']} {m['version']}" for m in s["models"]) or "NONE"
    print(f"MAP context for hn-autocontour {s['version']} (monai-deploy-app-sdk {s['sdkVersion']}, "
          f"holoscan {s['holoscan']}) in {args.out} in {s['seconds']} s; models: {models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
