"""Start the dashboard server: `maskmix dashboard`, or a launcher (the local stack) as a subprocess.

    argv, env = command(tracking_uri="sqlite:///./mlflow.db", port=8501)
    subprocess.Popen(argv, env=env)            # what serve() does, returning the process

Streamlit runs headless, bound to loopback unless told otherwise, without usage statistics and
without a file watcher (nothing to reload in production, and a watcher over a checkout costs CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
URI_ENV = "MASKMIX_DASHBOARD_TRACKING_URI"
UI_ENV = "MASKMIX_MLFLOW_UI_URL"


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///./mlflow.db -> sqlite:////abs/mlflow.db, so the server's working directory does not matter."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def command(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 8501,
            mlflow_ui_url: str | None = None, python: str | None = None,
            base_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that start the dashboard on ``host:port`` reading ``tracking_uri``
    (default: $MLFLOW_TRACKING_URI, else maskmix's sqlite:///./mlflow.db)."""
    env = dict(os.environ if base_env is None else base_env)
    uri = tracking_uri or env.get(URI_ENV) or env.get("MLFLOW_TRACKING_URI") or "sqlite:///./mlflow.db"
    env[URI_ENV] = _absolute_sqlite(uri)
    if mlflow_ui_url:
        env[UI_ENV] = mlflow_ui_url
    # The app imports dashboards/infra from the checkout even without an (up to date) install.
    root = str(APP.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    argv = [python or sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(int(port)),
            "--server.headless", "true",
            "--server.fileWatcherType", "none",
            "--server.runOnSave", "false",
            "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",  # no "Deploy" button: this is an internal app
            "--global.developmentMode", "false"]
    return argv, env


def exec_server(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 8501,
                mlflow_ui_url: str | None = None) -> None:
    """Replace this process by the server (`maskmix dashboard`): its pid is the server's, so
    Ctrl-C or a signal to that pid stops the server itself, with no orphan left behind."""
    argv, env = command(tracking_uri, host, port, mlflow_ui_url)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def serve(tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 8501,
          mlflow_ui_url: str | None = None, wait: bool = False, **popen_kwargs) -> subprocess.Popen:
    """Start the server as a subprocess; with ``wait`` block until it exits (Ctrl-C stops it)."""
    argv, env = command(tracking_uri, host, port, mlflow_ui_url)
    proc = subprocess.Popen(argv, env=env, **popen_kwargs)
    if wait:
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=10)
    return proc
