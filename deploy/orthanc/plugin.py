"""Orthanc's side of the node: the thin glue between Orthanc's Python plugin API and deploy/.

Loaded by Orthanc (``"PythonScript"`` in the configuration ``deploy/settings.py`` writes), in
Debian's system Python: standard library only.  Everything that decides anything lives in
``deploy.pipeline`` / ``deploy.rest`` (tested without Orthanc); here:

- ``orthanc.RegisterOnChangeCallback``: STABLE_STUDY -> ``Node.on_stable_study``;
  ORTHANC_STARTED -> ``Node.start`` (resume); ORTHANC_STOPPED -> ``Node.stop``.
- ``orthanc.RegisterRestCallback``: /autocontour/jobs... -> ``deploy.rest.handle``.
- ``PluginApi``: Orthanc's REST API in-process (``orthanc.RestApiGet`` / ``RestApiPost``).
- Python logging -> Orthanc's log (``orthanc.LogWarning`` / ``LogError``) and DATA/node.log
  (rotated at 10 MB, 5 kept).
"""

import json
import logging
import logging.handlers
import sys
from pathlib import Path

import orthanc

CONFIG = json.loads(orthanc.GetConfiguration())["AutoContour"]
if CONFIG["Root"] not in sys.path:
    sys.path.insert(0, CONFIG["Root"])

from deploy import rest  # noqa: E402
from deploy.jobs import JobStore  # noqa: E402
from deploy.pipeline import ApiError, DeliveryPolicy, Node  # noqa: E402
from deploy.runner import MapRunner, VenvRunner  # noqa: E402


class OrthancLogHandler(logging.Handler):
    """Our records in Orthanc's own log.  Orthanc shows only warnings and errors unless started
    with --verbose, so the node's progress (INFO) is written as Orthanc warnings."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            (orthanc.LogError if record.levelno >= logging.ERROR else orthanc.LogWarning)(text)
        except Exception:  # noqa: BLE001 - logging must never raise into Orthanc
            pass


class PluginApi:
    """``deploy.pipeline.OrthancApi`` on Orthanc's in-process REST API."""

    @staticmethod
    def _call(function, *args):
        try:
            return function(*args)
        except orthanc.OrthancException as exc:
            raise ApiError(f"{args[0]}: Orthanc error {exc.args[0] if exc.args else '?'} "
                           f"({exc.args[1] if len(exc.args) > 1 else exc})") from None

    def get_json(self, uri):
        return json.loads(self._call(orthanc.RestApiGet, uri))

    def get_bytes(self, uri):
        return self._call(orthanc.RestApiGet, uri)

    def post_json(self, uri, body):
        answer = self._call(orthanc.RestApiPost, uri, json.dumps(body))
        return json.loads(answer) if answer else None

    def post_dicom(self, data):
        return json.loads(self._call(orthanc.RestApiPost, "/instances", data))


def _setup_logging(data: Path) -> None:
    log = logging.getLogger("deploy")
    log.setLevel(logging.INFO)
    log.propagate = False
    to_orthanc = OrthancLogHandler()
    to_orthanc.setFormatter(logging.Formatter("autocontour: %(message)s"))
    to_file = logging.handlers.RotatingFileHandler(data / "node.log", maxBytes=10_000_000, backupCount=5)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.handlers[:] = [to_orthanc, to_file]


def _make_node() -> Node:
    data = Path(CONFIG["Data"])
    _setup_logging(data)
    root = Path(CONFIG["Root"])
    if CONFIG["Runner"] == "map":
        runner = MapRunner(root, CONFIG["AppTimeoutS"], CONFIG["MapImage"])
    else:
        runner = VenvRunner(root, CONFIG["AppTimeoutS"])
    policy = DeliveryPolicy(CONFIG["Destination"], CONFIG["DestinationAddress"] or "", CONFIG["Retries"],
                            CONFIG["RetryS"], CONFIG["RetryMaxS"])
    return Node(PluginApi(), JobStore(data / "jobs"), runner, data / "work", policy)


NODE = _make_node()


def on_change(change_type, level, resource):
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        NODE.on_stable_study(resource)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        NODE.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        NODE.stop()


def on_rest(output, uri, **request):
    groups = request.get("groups") or (None,)
    status, answer = rest.handle(NODE, request["method"], groups[0])
    if status == 200:
        output.AnswerBuffer(json.dumps(answer, indent=1), "application/json")
    elif status == 405:
        output.SendMethodNotAllowed(answer["allow"])
    else:
        body = json.dumps(answer, indent=1)  # ASCII: len() is the byte count
        try:
            output.SendHttpStatus(status, body, len(body))  # orthanc-python 4.0: (status, body, size)
        except TypeError:
            output.SendHttpStatus(status, body)


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback(rest.ROUTE, on_rest)
