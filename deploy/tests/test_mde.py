"""The MONAI Deploy Express files `make package` renders beside the MAP (deploy/mde.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deploy import mde

ROOT = Path(__file__).resolve().parents[2]


def _render_map():
    spec = importlib.util.spec_from_file_location("render_map", ROOT / "packaging" / "render_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ENV = {"AUTOCONTOUR_NODE_AET": "RTCONTOUR", "AUTOCONTOUR_NODE_ALLOWED": "CT1@10.1.1.1:104,CT2@10.1.1.2:4000",
       "AUTOCONTOUR_NODE_DEST": "ECLIPSE@10.1.1.9:51402", "AUTOCONTOUR_NODE_STABLE_S": "20"}


def test_workflow_routes_ct_to_the_map_and_exports_its_output(tmp_path):
    mde.render(tmp_path, "9.8.7", ENV, timeout_s=1800)
    wf = json.loads((tmp_path / "workflow.json").read_text())
    assert wf["informatics_gateway"] == {"ae_title": "RTCONTOUR", "data_origins": ["ct1-1", "ct2-2"],
                                         "export_destinations": ["eclipse"]}
    router, task, export = wf["tasks"]
    assert router["task_destinations"] == [{"name": task["id"], "conditions": [
        "{{ context.dicom.series.any('0008','0060') }} == 'CT'"]}]
    assert task["type"] == "docker" and task["args"]["container_image"] == "hn-autocontour:9.8.7-cpu"
    assert task["args"]["task_timeout_minutes"] == "30"
    # the MAP's own paths (packaging/render_map.py) and app.py's HOLOSCAN_* defaults
    assert task["args"]["env_HOLOSCAN_INPUT_PATH"] == "/var/holoscan/input/"
    assert task["args"]["env_HOLOSCAN_OUTPUT_PATH"] == "/var/holoscan/output/"
    assert task["args"]["env_HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models/"
    assert task["args"]["command"] == "python3 /opt/holoscan/app/app.py"
    assert task["task_destinations"] == [{"name": export["id"]}]
    assert export["type"] == "export" and export["export_destinations"] == [{"Name": "eclipse"}]
    assert export["artifacts"]["input"][0]["value"] == (
        "{{ context.executions.autocontour.artifacts.env_HOLOSCAN_OUTPUT_PATH }}")
    assert "EXAMPLE" not in (tmp_path / "README.md").read_text()


def test_example_values_are_flagged(tmp_path):
    mde.render(tmp_path, "1.0.0", {})
    assert "EXAMPLE values were used for AUTOCONTOUR_NODE_ALLOWED, AUTOCONTOUR_NODE_DEST" in (
        tmp_path / "README.md").read_text()
    with pytest.raises(ValueError, match="AUTOCONTOUR_NODE_DEST"):
        mde.render(tmp_path, "1.0.0", {"AUTOCONTOUR_NODE_DEST": "nonsense"})


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_configure_script_registers_the_workflow_then_the_gateway(tmp_path):
    """configure.sh against a stand-in for the Workflow Manager and the Informatics Gateway."""
    mde.render(tmp_path, "1.0.0", ENV)
    calls: list[tuple[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body))
            answer = {"workflow_id": "wf-42"} if self.path == "/workflows" else body
            data = json.dumps(answer).encode()
            self.send_response(201)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = subprocess.run(["bash", str(tmp_path / "configure.sh")], env={"PATH": "/usr/bin:/bin", "MWM": url, "IG": url},
                             capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr
    assert [p for p, _ in calls] == ["/workflows", "/config/source", "/config/source", "/config/destination",
                                     "/config/ae"]
    assert calls[0][1] == json.loads((tmp_path / "workflow.json").read_text())
    assert calls[1][1] == {"name": "ct1-1", "aeTitle": "CT1", "hostIp": "10.1.1.1"}
    assert calls[3][1] == {"name": "eclipse", "aeTitle": "ECLIPSE", "hostIp": "10.1.1.9", "port": 51402}
    assert calls[4][1] == {"name": "hn-autocontour", "aeTitle": "RTCONTOUR", "grouping": "0020,000D", "timeout": 20,
                           "allowedSopClasses": [mde.CT_IMAGE_STORAGE], "workflows": ["wf-42"]}


def test_make_package_renders_it_beside_the_map(tmp_path, monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "map"
    _render_map().render(out, ROOT, require_models=False)
    assert {p.name for p in (out / "mde").iterdir()} == {"workflow.json", "configure.sh", "README.md"}
    assert "mde" not in (out / "Dockerfile").read_text()           # not part of the image
    wf = json.loads((out / "mde" / "workflow.json").read_text())
    app_json = json.loads((out / "map" / "app.json").read_text())
    assert wf["version"] == app_json["version"]
    assert wf["tasks"][1]["args"]["env_HOLOSCAN_OUTPUT_PATH"].rstrip("/") == app_json["environment"][
        "HOLOSCAN_OUTPUT_PATH"].rstrip("/")
