"""The node's settings: AUTOCONTOUR_NODE_* environment variables -> Orthanc's configuration.

    python3 -m deploy.settings DATA_CONFIG_JSON     write Orthanc's configuration (used by node.sh)

| variable | default | meaning |
| --- | --- | --- |
| AUTOCONTOUR_NODE_AET | AUTOCONTOUR | the node's AE title (called AE title checked) |
| AUTOCONTOUR_NODE_PORT | 11112 | the node's DICOM port |
| AUTOCONTOUR_NODE_HTTP | 8042 | Orthanc's REST port (loopback clients only, password) |
| AUTOCONTOUR_NODE_ALLOWED | (required) | who may send: ``AET@host:port,...`` |
| AUTOCONTOUR_NODE_DEST | (none) | where results go: ``AET@host:port`` |
| AUTOCONTOUR_NODE_STABLE_S | 30 | seconds without a new instance before a study is complete |
| AUTOCONTOUR_NODE_DATA | node-data | Orthanc's storage, the job records, the work folders |
| AUTOCONTOUR_NODE_PASSWORD | (generated) | REST password of user ``autocontour``; else kept in DATA/rest-password |
| AUTOCONTOUR_NODE_RUNNER | venv | ``venv`` (.venv/bin/python app.py) or ``map`` (the MAP image, podman) |
| AUTOCONTOUR_NODE_RETRIES | 8 | C-STORE attempts to the destination before the job is ``failed`` |
| AUTOCONTOUR_NODE_RETRY_S | 30 | first back-off; doubles after each failed attempt, capped at RETRY_MAX_S |
| AUTOCONTOUR_NODE_RETRY_MAX_S | 600 | the longest back-off |
| AUTOCONTOUR_NODE_APP_TIMEOUT_S | 1800 | a run that takes longer is stopped and recorded as an error |

Standard library only: this module is imported inside Orthanc's embedded Python too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_LIBRARY = Path("/usr/share/orthanc/plugins/libOrthancPython.so")  # Debian's orthanc-python
PLUGIN_SCRIPT = Path(__file__).resolve().parent / "orthanc" / "plugin.py"
HTTP_USER = "autocontour"
DEST_MODALITY = "destination"  # the symbolic name of the destination in DicomModalities
RUNNERS = ("venv", "map")

_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars of the default repertoire, no backslash
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?$")


class SettingsError(ValueError):
    """A variable has a value the node cannot use; the message names it and says what to write."""


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: AE title, host, port."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


def parse_peer(text: str, variable: str) -> Peer:
    """``AET@host:port`` -> Peer; SettingsError naming ``variable`` when it is not that."""
    fix = f"write {variable} as AET@host:port, e.g. CTSCANNER@10.0.0.21:104"
    m = re.fullmatch(r"\s*(.+)@([^@:\s]+):(\d+)\s*", text)
    if not m:
        raise SettingsError(f"{variable}: {text.strip()!r} is not AET@host:port - {fix}")
    aet, host, port_s = m.group(1).strip(), m.group(2), m.group(3)
    if not _AET.match(aet) or not aet.strip():
        raise SettingsError(
            f"{variable}: AE title {aet!r} must be 1-16 printable ASCII characters without a backslash - {fix}"
        )
    if not _HOST.match(host):
        raise SettingsError(f"{variable}: host {host!r} is not a host name or IPv4 address - {fix}")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise SettingsError(f"{variable}: port {port} is outside 1-65535 - {fix}")
    return Peer(aet, host, port)


def parse_peers(text: str, variable: str) -> tuple[Peer, ...]:
    """``AET@host:port,AET@host:port`` -> Peers (empty items ignored, duplicates dropped)."""
    peers: list[Peer] = []
    for item in text.split(","):
        if item.strip():
            peer = parse_peer(item, variable)
            if peer not in peers:
                peers.append(peer)
    return tuple(peers)


def _int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number - set it to an integer in {low}..{high}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is outside {low}..{high} - set it to an integer in {low}..{high}")
    return value


@dataclass(frozen=True)
class NodeSettings:
    """Everything the node is configured with (see the module docstring for the variables)."""

    aet: str = "AUTOCONTOUR"
    port: int = 11112
    http_port: int = 8042
    allowed: tuple[Peer, ...] = ()
    dest: Peer | None = None
    stable_s: int = 30
    data: Path = Path("node-data")
    password: str | None = None
    runner: str = "venv"
    retries: int = 8
    retry_s: int = 30
    retry_max_s: int = 600
    app_timeout_s: int = 1800
    map_image: str = ""
    root: Path = field(default=ROOT)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> NodeSettings:
        """Read and check the AUTOCONTOUR_NODE_* variables; SettingsError on the first bad one."""
        env = dict(os.environ if env is None else env)
        aet = env.get("AUTOCONTOUR_NODE_AET", "").strip() or "AUTOCONTOUR"
        if not _AET.match(aet):
            raise SettingsError(
                f"AUTOCONTOUR_NODE_AET={aet!r}: an AE title is 1-16 printable ASCII characters without a backslash"
            )
        allowed = parse_peers(env.get("AUTOCONTOUR_NODE_ALLOWED", ""), "AUTOCONTOUR_NODE_ALLOWED")
        if not allowed:
            raise SettingsError(
                "AUTOCONTOUR_NODE_ALLOWED is empty: nobody could send a CT - list the scanner and the planning "
                "system as AET@host:port,AET@host:port"
            )
        dest_s = env.get("AUTOCONTOUR_NODE_DEST", "").strip()
        dest = parse_peer(dest_s, "AUTOCONTOUR_NODE_DEST") if dest_s else None
        runner = env.get("AUTOCONTOUR_NODE_RUNNER", "").strip() or "venv"
        if runner not in RUNNERS:
            raise SettingsError(f"AUTOCONTOUR_NODE_RUNNER={runner!r} - use one of {', '.join(RUNNERS)}")
        data = Path(env.get("AUTOCONTOUR_NODE_DATA", "").strip() or "node-data")
        root = Path(env.get("AUTOCONTOUR_NODE_ROOT", "").strip() or ROOT)
        settings = cls(
            aet=aet,
            port=_int(env, "AUTOCONTOUR_NODE_PORT", 11112, 1, 65535),
            http_port=_int(env, "AUTOCONTOUR_NODE_HTTP", 8042, 1, 65535),
            allowed=allowed,
            dest=dest,
            stable_s=_int(env, "AUTOCONTOUR_NODE_STABLE_S", 30, 1, 86400),
            data=(data if data.is_absolute() else Path.cwd() / data),
            password=env.get("AUTOCONTOUR_NODE_PASSWORD") or None,
            runner=runner,
            retries=_int(env, "AUTOCONTOUR_NODE_RETRIES", 8, 1, 1000),
            retry_s=_int(env, "AUTOCONTOUR_NODE_RETRY_S", 30, 1, 86400),
            retry_max_s=_int(env, "AUTOCONTOUR_NODE_RETRY_MAX_S", 600, 1, 86400),
            app_timeout_s=_int(env, "AUTOCONTOUR_NODE_APP_TIMEOUT_S", 1800, 10, 86400),
            map_image=env.get("AUTOCONTOUR_NODE_MAP_IMAGE", "").strip() or default_map_image(root),
            root=root,
        )
        if settings.port == settings.http_port:
            raise SettingsError(
                f"AUTOCONTOUR_NODE_PORT and AUTOCONTOUR_NODE_HTTP are both {settings.port} - give them different ports"
            )
        return settings

    @property
    def jobs_dir(self) -> Path:
        return self.data / "jobs"

    @property
    def work_dir(self) -> Path:
        return self.data / "work"

    @property
    def storage_dir(self) -> Path:
        return self.data / "orthanc-db"

    @property
    def password_file(self) -> Path:
        return self.data / "rest-password"

    def rest_password(self) -> str:
        """AUTOCONTOUR_NODE_PASSWORD, else the one kept in DATA/rest-password (made once, mode 0600)."""
        if self.password:
            return self.password
        path = self.password_file
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
        path.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(18)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        return password


def default_map_image(root: Path) -> str:
    """The CPU MAP image `make map-image` builds: localhost/hn-autocontour:<version>-cpu."""
    version = "0.0.0"
    init = root / "autocontour" / "__init__.py"
    if init.is_file():
        m = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.M)
        if m:
            version = m.group(1)
    return f"localhost/hn-autocontour:{version}-cpu"


def modalities(settings: NodeSettings) -> dict[str, dict[str, object]]:
    """Orthanc's DicomModalities: each allowed sender may C-ECHO and C-STORE, nothing else; the
    destination may only C-ECHO (unless it is also an allowed sender)."""
    out: dict[str, dict[str, object]] = {}
    no_query = {"AllowFind": False, "AllowFindWorklist": False, "AllowGet": False, "AllowMove": False,
                "AllowStorageCommitment": False}
    for i, peer in enumerate(settings.allowed, 1):
        if peer == settings.dest:
            continue
        out[f"sender{i}"] = {"AET": peer.aet, "Host": peer.host, "Port": peer.port,
                             "AllowEcho": True, "AllowStore": True, **no_query}
    if settings.dest is not None:
        d = settings.dest
        out[DEST_MODALITY] = {"AET": d.aet, "Host": d.host, "Port": d.port,
                              "AllowEcho": True, "AllowStore": d in settings.allowed, **no_query}
    return out


def orthanc_config(settings: NodeSettings, password: str) -> dict[str, object]:
    """Orthanc's configuration for the node (Orthanc 1.10+ option names; see docs/deployment.md)."""
    data = settings.data
    return {
        "Name": f"autocontour-{settings.aet}",
        "StorageDirectory": str(settings.storage_dir),
        "IndexDirectory": str(settings.storage_dir),
        # REST: loopback clients only (Orthanc < 1.12.10 listens on every interface and answers
        # others 403; HttpBindAddresses, where known, binds 127.0.0.1 only), HTTP basic auth.
        "HttpServerEnabled": True,
        "HttpPort": settings.http_port,
        "RemoteAccessAllowed": False,
        "HttpBindAddresses": ["127.0.0.1"],
        "AuthenticationEnabled": True,
        "RegisteredUsers": {HTTP_USER: password},
        "WebDavEnabled": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        # DICOM: our AE title only, declared modalities only, their host checked
        "DicomServerEnabled": True,
        "DicomAet": settings.aet,
        "DicomPort": settings.port,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalitiesInDatabase": False,
        "DicomModalities": modalities(settings),
        "DicomScuTimeout": 30,
        "StableAge": settings.stable_s,
        "SaveJobs": True,
        "OverwriteInstances": False,
        "Plugins": [str(PLUGIN_LIBRARY)],
        "PythonScript": str(PLUGIN_SCRIPT),
        "PythonVerbose": False,
        # read by deploy/orthanc/plugin.py (orthanc.GetConfiguration())
        "AutoContour": {
            "Root": str(settings.root),
            "Data": str(data),
            "Runner": settings.runner,
            "MapImage": settings.map_image,
            "Destination": DEST_MODALITY if settings.dest is not None else None,
            "DestinationAddress": str(settings.dest) if settings.dest is not None else None,
            "Retries": settings.retries,
            "RetryS": settings.retry_s,
            "RetryMaxS": settings.retry_max_s,
            "AppTimeoutS": settings.app_timeout_s,
        },
    }


def write_config(settings: NodeSettings, path: Path) -> Path:
    """Make DATA's folders and write Orthanc's configuration to ``path`` (mode 0600: it holds the password)."""
    for d in (settings.data, settings.storage_dir, settings.jobs_dir, settings.work_dir):
        d.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(settings, settings.rest_password())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config, fh, indent=2)
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python3 -m deploy.settings CONFIG_JSON``: check the variables, write the configuration."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="[node %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if len(argv) != 1:
        print("usage: python3 -m deploy.settings CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        settings = NodeSettings.from_env()
        path = write_config(settings, Path(argv[0]))
    except SettingsError as exc:
        logger.error("ERROR: %s", exc)
        return 2
    logger.info("AE title %s on DICOM port %d; accepts C-STORE from %s", settings.aet, settings.port,
                ", ".join(map(str, settings.allowed)))
    if settings.dest is None:
        logger.warning("AUTOCONTOUR_NODE_DEST is not set: results stay in Orthanc, nothing is sent")
    else:
        logger.info("results go to %s", settings.dest)
    logger.info("REST API: http://127.0.0.1:%d/autocontour/jobs (user %s, password in %s)", settings.http_port,
                HTTP_USER, "AUTOCONTOUR_NODE_PASSWORD" if settings.password else settings.password_file)
    logger.info("stable after %d s; runner %s; data in %s; configuration %s", settings.stable_s, settings.runner,
                settings.data, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
