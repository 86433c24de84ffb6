"""A live page for a swarm: peers, global step over time, loss over time, and the command to join.

:class:`DashboardServer` serves three things from a :class:`~lightning_moshpit.monitor.SwarmMonitor` on 127.0.0.1:

* ``/`` - the page (a static HTML file, :data:`PAGE`);
* ``/plotly.min.js`` - plotly.js from the ``plotly`` Python package (``plotly.offline.get_plotlyjs()``), so the page
  works offline, with no CDN;
* ``/api/state`` - the latest snapshot plus the history of (time, global step, loss, samples/s) as JSON; the page
  polls it every second and redraws.

The server is the standard library's threading HTTP server: it needs no event loop and stops with :meth:`stop`.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lightning_moshpit.monitor import SwarmMonitor

HOST = "127.0.0.1"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lightning_moshpit swarm</title>
<script src="/plotly.min.js"></script>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 table { border-collapse: collapse; margin: 0.5em 0 1em; }
 th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
 th:first-child, td:first-child { text-align: left; font-family: monospace; }
 pre { background: #f4f4f4; padding: 0.6em; white-space: pre-wrap; word-break: break-all; }
 .plots { display: flex; flex-wrap: wrap; gap: 1em; } .plot { width: 560px; height: 320px; }
 #summary span { margin-right: 1.5em; }
</style></head>
<body>
<h1>Swarm <span id="run-id"></span></h1>
<div id="summary"><span>peers: <b id="num-peers">-</b></span><span>global step: <b id="global-step">-</b></span>
<span>samples/s: <b id="samples-per-second">-</b></span><span>loss: <b id="loss">-</b></span>
<span>ETA next step: <b id="eta">-</b></span></div>
<h2>Join this run</h2>
<pre id="join-command"></pre><button id="copy-join">Copy</button>
<h2>Peers</h2>
<table id="peers"><thead><tr><th>peer</th><th>role</th><th>step</th><th>samples</th><th>samples/s</th><th>loss</th></tr>
</thead><tbody></tbody></table>
<div class="plots"><div id="step-plot" class="plot"></div><div id="loss-plot" class="plot"></div></div>
<script>
const fmt = (x, digits) => (x === null || x === undefined) ? "-" : Number(x).toFixed(digits);
document.getElementById("copy-join").onclick = () =>
  navigator.clipboard.writeText(document.getElementById("join-command").textContent);
async function refresh() {
  const state = await (await fetch("/api/state")).json();
  document.getElementById("run-id").textContent = state.run_id;
  document.getElementById("join-command").textContent = state.join_command;
  const latest = state.latest;
  if (latest) {
    document.getElementById("num-peers").textContent = latest.num_peers;
    document.getElementById("global-step").textContent = latest.global_step;
    document.getElementById("samples-per-second").textContent = fmt(latest.samples_per_second, 1);
    document.getElementById("loss").textContent = fmt(latest.loss, 4);
    document.getElementById("eta").textContent = latest.eta_seconds === null ? "-" : fmt(latest.eta_seconds, 1) + " s";
    const body = document.querySelector("#peers tbody");
    body.replaceChildren(...latest.peers.map(p => {
      const row = document.createElement("tr");
      row.className = "peer-row";
      for (const cell of [p.peer_id, p.role, p.step, p.samples_accumulated, fmt(p.samples_per_second, 1),
                          fmt(p.loss, 4)]) {
        const td = document.createElement("td"); td.textContent = cell; row.appendChild(td);
      }
      return row;
    }));
  }
  const h = state.history, times = h.time.map(t => new Date(t * 1000));
  const layout = (title, y) => ({title: {text: title}, margin: {t: 40, r: 10, l: 50, b: 40},
                                 xaxis: {title: {text: "time"}}, yaxis: {title: {text: y}}});
  Plotly.react("step-plot", [{x: times, y: h.global_step, mode: "lines+markers", name: "global step"}],
               layout("Global step", "step"), {displayModeBar: false});
  Plotly.react("loss-plot", [{x: times, y: h.loss, mode: "lines+markers", name: "loss", connectgaps: true}],
               layout("Loss (mean over peers)", "loss"), {displayModeBar: false});
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


@lru_cache(maxsize=1)
def plotly_js() -> bytes:
    """The plotly.js bundle shipped inside the ``plotly`` Python package (about 4.8 MB, read once)."""
    try:
        from plotly.offline import get_plotlyjs
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the dashboard needs the `plotly` package for its offline plotly.js: pip install 'lightning-moshpit[cli]'"
        ) from error
    return get_plotlyjs().encode()


def dashboard_state(monitor: SwarmMonitor, join_command: str) -> dict[str, Any]:
    """What ``/api/state`` returns: the latest snapshot and column-wise history for the plots."""
    snapshots = monitor.snapshots()
    latest = snapshots[-1] if snapshots else None
    return {
        "run_id": monitor.run_id,
        "join_command": join_command,
        "latest": latest.as_dict() if latest is not None else None,
        "history": {
            "time": [s.time for s in snapshots],
            "global_step": [s.global_step for s in snapshots],
            "loss": [s.loss for s in snapshots],
            "samples_per_second": [s.samples_per_second for s in snapshots],
        },
    }


class DashboardServer:
    """Serves the dashboard for ``monitor`` on ``http://127.0.0.1:port`` (``port=0``: any free port, see ``url``)."""

    def __init__(self, monitor: SwarmMonitor, join_command: str, port: int = 8787) -> None:
        self.monitor, self.join_command = monitor, join_command
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path in ("/", "/index.html"):
                    self._send(PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/plotly.min.js":
                    self._send(plotly_js(), "application/javascript")
                elif path == "/api/state":
                    body = json.dumps(dashboard_state(server.monitor, server.join_command)).encode()
                    self._send(body, "application/json")
                else:
                    self.send_error(404)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet: one request per second
                pass

        self._httpd = ThreadingHTTPServer((HOST, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="DashboardServer", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._httpd.server_address[1]}/"

    def start(self) -> "DashboardServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
