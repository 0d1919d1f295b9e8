"""The browser page at ``/``: submit jobs and watch them stream (plain HTML, CSS and JS)."""
from __future__ import annotations

from flask import Blueprint, send_from_directory

bp = Blueprint("ui", __name__, static_folder="static", static_url_path="/ui")


@bp.get("/")
def index():
    """Open without a token: the page asks for one and keeps it in sessionStorage."""
    return send_from_directory(bp.static_folder, "index.html")
