"""The app deployed as a DICOM node: Orthanc receives the CT, a Python plugin contours it.

Everything here is plain Python that runs in two interpreters: the project's ``.venv`` (tests,
``python -m deploy.settings``) and the Debian system Python that Orthanc's Python plugin embeds,
where only the standard library is available.  So: standard library only, no third-party import.

    settings.py   AUTOCONTOUR_NODE_* variables -> NodeSettings -> Orthanc's configuration (JSON)
    jobs.py       the job records on disk (one JSON file per study) and their states
    runner.py     runs the app (the .venv or the MAP image via podman) on an exported study
    pipeline.py   the worker: inspect -> export -> run -> store into Orthanc -> C-STORE, retries
    rest.py       the /autocontour/jobs REST routes (list, show, resend, rerun)
    orthanc/      Orthanc's side: plugin.py (thin glue to Orthanc's API), node.sh (make node)

See docs/deployment.md.
"""
