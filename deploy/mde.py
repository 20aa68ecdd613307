"""The same route on MONAI Deploy Express: Informatics Gateway (IG) + Workflow Manager (MWM).

``make package`` (packaging/render_map.py) calls ``render`` to write, beside the MAP's build
context, ``mde/``:

    workflow.json    MWM workflow definition: router (CT only) -> our MAP (docker task) -> export
    configure.sh     curl calls: register the workflow with MWM, then the IG's source, destination
                     and listening AE title (bound to that workflow)
    README.md        what to set before running configure.sh

Written after MONAI Deploy Express's sample workflows (``sample-workflows/liver-tumor.json``: the
``docker`` task type with ``env_HOLOSCAN_*`` arguments and ``export`` tasks) and the IG's
configuration API (``POST /config/ae``, ``/config/source``, ``/config/destination``).  Not run
here: this machine has neither Docker nor MONAI Deploy Express (docs/deployment.md).

The AE titles and addresses come from the node's own variables when they are set
(AUTOCONTOUR_NODE_AET, _ALLOWED, _DEST, _STABLE_S), else from the example values below, so one
set of variables describes both routes.  Standard library only.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from deploy.settings import Peer, SettingsError, parse_peer, parse_peers

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXAMPLE_SOURCE = "CTSCANNER@10.0.0.21:104"
EXAMPLE_DEST = "TPS@10.0.0.30:104"
TASK_ID = "autocontour"
EXPORT_ID = "export-rtstruct"


def workflow(version: str, image: str, aet: str, sources: list[str], destination: str,
             timeout_s: int = 1800) -> dict:
    """The MWM workflow definition: a CT study received on ``aet`` -> the MAP -> ``destination``."""
    return {
        "name": "hn-autocontour",
        "version": version,
        "description": "Head-and-neck CT auto-contouring: RTSTRUCT + DICOM-SEG proposals for review",
        "informatics_gateway": {"ae_title": aet, "data_origins": sources, "export_destinations": [destination]},
        "tasks": [
            {
                "id": "router",
                "description": "Only CT studies are contoured",
                "type": "router",
                "task_destinations": [
                    {"name": TASK_ID, "conditions": ["{{ context.dicom.series.any('0008','0060') }} == 'CT'"]},
                ],
            },
            {
                "id": TASK_ID,
                "description": f"hn-autocontour {version} MAP",
                "type": "docker",
                "args": {
                    "container_image": image,
                    "server_url": "unix:///var/run/docker.sock",
                    "entrypoint": "/bin/bash,-c",
                    "command": "python3 /opt/holoscan/app/app.py",
                    "task_timeout_minutes": str(max(1, (timeout_s + 59) // 60)),
                    "temp_storage_container_path": "/var/lib/mde/",
                    "env_HOLOSCAN_INPUT_PATH": "/var/holoscan/input/",
                    "env_HOLOSCAN_OUTPUT_PATH": "/var/holoscan/output/",
                    "env_HOLOSCAN_MODEL_PATH": "/opt/holoscan/models/",
                    "env_HOLOSCAN_WORKDIR": "/var/holoscan/",
                },
                "artifacts": {
                    "input": [{"name": "env_HOLOSCAN_INPUT_PATH", "value": "{{ context.input.dicom }}"}],
                    "output": [{"name": "env_HOLOSCAN_OUTPUT_PATH", "mandatory": True}],
                },
                "task_destinations": [{"name": EXPORT_ID}],
            },
            {
                "id": EXPORT_ID,
                "description": "Send the RTSTRUCT and the DICOM-SEG to the planning system",
                "type": "export",
                "export_destinations": [{"Name": destination}],
                "artifacts": {
                    "input": [{"name": "export-dicom",
                               "value": f"{{{{ context.executions.{TASK_ID}.artifacts.env_HOLOSCAN_OUTPUT_PATH }}}}",
                               "mandatory": True}],
                    "output": [],
                },
            },
        ],
    }


def gateway_entities(aet: str, sources: list[tuple[str, Peer]], destination: tuple[str, Peer],
                     timeout_s: int) -> dict[str, list[dict]]:
    """The IG configuration API bodies: sources, destination, our AE (its workflows filled in later)."""
    name, dest = destination
    return {
        "source": [{"name": n, "aeTitle": p.aet, "hostIp": p.host} for n, p in sources],
        "destination": [{"name": name, "aeTitle": dest.aet, "hostIp": dest.host, "port": dest.port}],
        "ae": [{"name": "hn-autocontour", "aeTitle": aet, "grouping": "0020,000D", "timeout": timeout_s,
                "allowedSopClasses": [CT_IMAGE_STORAGE], "workflows": []}],
    }


def configure_script(entities: dict[str, list[dict]]) -> str:
    """A bash script of curl calls: MWM's POST /workflows, then the IG's /config/* (AE last, with the id)."""
    lines = [
        "#!/usr/bin/env bash",
        "# Rendered by packaging/render_map.py (`make package`) from deploy/mde.py; see README.md here.",
        "# Registers workflow.json with the Workflow Manager, then the Informatics Gateway's sources,",
        "# destination and listening AE title (bound to that workflow).",
        "set -euo pipefail",
        'HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)',
        "MWM=${MWM:-http://localhost:5001}   # Workflow Manager",
        "IG=${IG:-http://localhost:5000}     # Informatics Gateway",
        'post() { curl --fail-with-body --silent --show-error -H "Content-Type: application/json" -X POST "$1" --data "$2"; echo; }',
        'answer=$(curl --fail-with-body --silent --show-error -H "Content-Type: application/json" '
        '-X POST "$MWM/workflows" --data "@$HERE/workflow.json")',
        'workflow_id=$(printf "%s" "$answer" | python3 -c \'import json,sys; print(json.load(sys.stdin)["workflow_id"])\')',
        'echo "workflow registered: $workflow_id"',
    ]
    for kind in ("source", "destination"):
        for body in entities[kind]:
            lines.append(f'post "$IG/config/{kind}" {shlex.quote(json.dumps(body))}')
    for body in entities["ae"]:
        text = json.dumps(body).replace('"workflows": []', '"workflows": ["WORKFLOW_ID"]')
        lines.append(f'post "$IG/config/ae" "$(printf "%s" {shlex.quote(text)} | sed "s/WORKFLOW_ID/$workflow_id/")"')
    return "\n".join(lines) + "\n"


def render(out: Path, version: str, env: dict[str, str], timeout_s: int = 1800) -> list[Path]:
    """Write workflow.json, configure.sh and README.md into ``out``; returns the paths."""
    aet = env.get("AUTOCONTOUR_NODE_AET", "").strip() or "AUTOCONTOUR"
    try:
        sources = list(parse_peers(env.get("AUTOCONTOUR_NODE_ALLOWED", "") or EXAMPLE_SOURCE, "AUTOCONTOUR_NODE_ALLOWED"))
        dest = parse_peer(env.get("AUTOCONTOUR_NODE_DEST", "") or EXAMPLE_DEST, "AUTOCONTOUR_NODE_DEST")
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    stable = int(env.get("AUTOCONTOUR_NODE_STABLE_S", "") or 30)
    image = f"hn-autocontour:{version}-cpu"
    named_sources = [(f"{p.aet.lower().replace(' ', '-')}-{i}", p) for i, p in enumerate(sources, 1)]
    dest_name = dest.aet.lower().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    wf = workflow(version, image, aet, [n for n, _ in named_sources], dest_name, timeout_s)
    entities = gateway_entities(aet, named_sources, (dest_name, dest), stable)
    paths = [out / "workflow.json", out / "configure.sh", out / "README.md"]
    paths[0].write_text(json.dumps(wf, indent=2) + "\n")
    paths[1].write_text(configure_script(entities))
    paths[1].chmod(0o755)
    examples = [name for name, value in (("AUTOCONTOUR_NODE_ALLOWED", EXAMPLE_SOURCE), ("AUTOCONTOUR_NODE_DEST", EXAMPLE_DEST))
                if not env.get(name)]
    paths[2].write_text(
        f"# hn-autocontour {version} on MONAI Deploy Express\n\n"
        "Rendered by `make package` (deploy/mde.py); see docs/deployment.md in the project.\n\n"
        f"- Listening AE title (Informatics Gateway): `{aet}`, grouping by study, {stable} s without a new instance,\n"
        f"  CT Image Storage only. Sources: {', '.join(str(p) for p in sources)}. Destination: {dest}.\n"
        + (f"- EXAMPLE values were used for {', '.join(examples)}: set them and run `make package` again.\n"
           if examples else "")
        + f"- The MAP image `{image}` must be loaded in the Docker that the Task Manager uses\n"
        "  (`docker load -i hn-autocontour-<version>-cpu.tar`, see docs/packaging.md).\n"
        "- In MONAI Deploy Express's `configs/informatics-gateway.json` set `rejectUnknownSources: true`\n"
        "  so that only the sources listed above may send. A MAP loaded from the podman archive is\n"
        "  tagged `localhost/hn-autocontour:...`: `docker tag` it to the name above.\n"
        "- Then: `MWM=http://localhost:5001 IG=http://localhost:5000 ./configure.sh`.\n")
    return paths
