"""Head-and-neck auto-contouring: the pure functions behind the MONAI Deploy operators."""

__version__ = "0.1.0"
APP_NAME = "hn-autocontour"
