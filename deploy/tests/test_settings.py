"""AUTOCONTOUR_NODE_* -> NodeSettings -> Orthanc's configuration."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.settings import (
    DEST_MODALITY,
    PLUGIN_SCRIPT,
    NodeSettings,
    Peer,
    SettingsError,
    orthanc_config,
    parse_peers,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {"AUTOCONTOUR_NODE_ALLOWED": "CTSCANNER@10.0.0.21:104"}


def test_defaults_are_the_documented_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = NodeSettings.from_env(BASE)
    assert (s.aet, s.port, s.http_port, s.stable_s) == ("AUTOCONTOUR", 11112, 8042, 30)
    assert s.data == tmp_path / "node-data" and s.dest is None and s.runner == "venv"
    assert s.allowed == (Peer("CTSCANNER", "10.0.0.21", 104),)


def test_peers_are_parsed_with_spaces_and_duplicates():
    peers = parse_peers(" CT 1@10.0.0.21:104, TPS@tps.example.org:11112,,CT 1@10.0.0.21:104 ", "X")
    assert peers == (Peer("CT 1", "10.0.0.21", 104), Peer("TPS", "tps.example.org", 11112))
    assert str(peers[1]) == "TPS@tps.example.org:11112"


@pytest.mark.parametrize("env, message", [
    ({"AUTOCONTOUR_NODE_ALLOWED": ""}, "AUTOCONTOUR_NODE_ALLOWED is empty"),
    ({"AUTOCONTOUR_NODE_ALLOWED": "CTSCANNER@10.0.0.21"}, "AUTOCONTOUR_NODE_ALLOWED: 'CTSCANNER@10.0.0.21' is not AET@host:port"),
    ({"AUTOCONTOUR_NODE_ALLOWED": "A_VERY_LONG_AE_TITLE@h:104"}, "must be 1-16 printable ASCII"),
    ({"AUTOCONTOUR_NODE_ALLOWED": "BAD\\AE@h:104"}, "without a backslash"),
    ({"AUTOCONTOUR_NODE_ALLOWED": "CT@h:70000"}, "port 70000 is outside 1-65535"),
    ({"AUTOCONTOUR_NODE_DEST": "TPS@:104"}, "AUTOCONTOUR_NODE_DEST: 'TPS@:104' is not AET@host:port"),
    ({"AUTOCONTOUR_NODE_STABLE_S": "soon"}, "AUTOCONTOUR_NODE_STABLE_S='soon' is not a whole number"),
    ({"AUTOCONTOUR_NODE_STABLE_S": "0"}, "AUTOCONTOUR_NODE_STABLE_S=0 is outside 1..86400"),
    ({"AUTOCONTOUR_NODE_HTTP": "11112"}, "are both 11112"),
    ({"AUTOCONTOUR_NODE_RUNNER": "docker"}, "use one of venv, map"),
    ({"AUTOCONTOUR_NODE_AET": "TOO_LONG_FOR_AN_AET"}, "AUTOCONTOUR_NODE_AET="),
])
def test_bad_values_are_refused_with_the_variable_and_the_fix(env, message):
    with pytest.raises(SettingsError) as exc:
        NodeSettings.from_env({**BASE, **env})
    assert message in str(exc.value)


def test_orthanc_config_refuses_whoever_is_not_declared(tmp_path):
    s = NodeSettings.from_env({
        "AUTOCONTOUR_NODE_ALLOWED": "CTSCANNER@10.0.0.21:104,TPS@10.0.0.30:104", "AUTOCONTOUR_NODE_DEST": "TPS@10.0.0.30:104",
        "AUTOCONTOUR_NODE_AET": "RTCONTOUR", "AUTOCONTOUR_NODE_PORT": "4243", "AUTOCONTOUR_NODE_HTTP": "8043",
        "AUTOCONTOUR_NODE_STABLE_S": "5", "AUTOCONTOUR_NODE_DATA": str(tmp_path / "d")})
    c = orthanc_config(s, "secret")
    assert (c["DicomAet"], c["DicomPort"], c["HttpPort"], c["StableAge"]) == ("RTCONTOUR", 4243, 8043, 5)
    assert c["DicomCheckCalledAet"] is True and c["DicomCheckModalityHost"] is True
    for key in ("Echo", "Store", "Find", "FindWorklist", "Get", "Move"):
        assert c[f"DicomAlwaysAllow{key}"] is False
    assert c["RemoteAccessAllowed"] is False and c["AuthenticationEnabled"] is True
    assert c["RegisteredUsers"] == {"autocontour": "secret"} and c["HttpBindAddresses"] == ["127.0.0.1"]
    mods = c["DicomModalities"]
    assert set(mods) == {"sender1", DEST_MODALITY}        # the TPS is both: one entry, allowed to store
    assert mods["sender1"] == {"AET": "CTSCANNER", "Host": "10.0.0.21", "Port": 104, "AllowEcho": True,
                               "AllowStore": True, "AllowFind": False, "AllowFindWorklist": False,
                               "AllowGet": False, "AllowMove": False, "AllowStorageCommitment": False}
    assert mods[DEST_MODALITY]["AET"] == "TPS" and mods[DEST_MODALITY]["AllowStore"] is True
    assert c["PythonScript"] == str(PLUGIN_SCRIPT) and PLUGIN_SCRIPT.is_file()
    assert c["StorageDirectory"] == str(tmp_path / "d" / "orthanc-db")
    ac = c["AutoContour"]
    assert ac["Destination"] == DEST_MODALITY and ac["DestinationAddress"] == "TPS@10.0.0.30:104"
    assert ac["Root"] == str(ROOT) and ac["Retries"] == 8 and ac["RetryS"] == 30


def test_destination_that_does_not_send_may_not_store():
    s = NodeSettings.from_env({**BASE, "AUTOCONTOUR_NODE_DEST": "TPS@10.0.0.30:104"})
    assert orthanc_config(s, "x")["DicomModalities"][DEST_MODALITY]["AllowStore"] is False


def test_password_is_made_once_and_private(tmp_path):
    s = NodeSettings.from_env({**BASE, "AUTOCONTOUR_NODE_DATA": str(tmp_path)})
    first = s.rest_password()
    assert len(first) >= 20 and s.rest_password() == first
    assert stat.S_IMODE(os.stat(s.password_file).st_mode) == 0o600
    assert NodeSettings.from_env({**BASE, "AUTOCONTOUR_NODE_PASSWORD": "given"}).rest_password() == "given"


def test_cli_writes_a_private_config_with_system_python(tmp_path):
    """`python3 -m deploy.settings` as node.sh runs it; a bad variable is one line and exit 2."""
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), **BASE, "AUTOCONTOUR_NODE_DATA": str(tmp_path / "d")}
    out = subprocess.run([python, "-m", "deploy.settings", str(tmp_path / "o.json")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr and "AUTOCONTOUR_NODE_DEST is not set" in out.stderr
    assert json.loads((tmp_path / "o.json").read_text())["DicomAet"] == "AUTOCONTOUR"
    assert stat.S_IMODE(os.stat(tmp_path / "o.json").st_mode) == 0o600
    for d in ("orthanc-db", "jobs", "work"):
        assert (tmp_path / "d" / d).is_dir()
    env["AUTOCONTOUR_NODE_ALLOWED"] = "nonsense"
    out = subprocess.run([python, "-m", "deploy.settings", str(tmp_path / "o2.json")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and not (tmp_path / "o2.json").exists()
    assert "ERROR: AUTOCONTOUR_NODE_ALLOWED: 'nonsense' is not AET@host:port" in out.stderr
