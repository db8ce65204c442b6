"""The waiting page: what a browser sees while the agent it asked for wakes.

Role: for an agent with ``waiting_page = true``, the proxy (``roost.edge.proxy``)
answers a browser's request (``GET``/``HEAD`` accepting ``text/html``) for an agent
that is not awake with a small page that shows the agent's state and reloads
itself every ``REFRESH_SECONDS``, instead of holding the request for the whole
wake. The request that finds the agent ready is proxied as usual, so the browser
lands on the agent's real page. Everything else (API clients, other methods,
WebSockets) keeps the blocking hold.

Invariants:
- The page is self-contained: inline CSS, no script, no external asset; every
  value shown is HTML-escaped.
- It is ``503`` with ``Retry-After`` and ``Cache-Control: no-store``: nothing
  caches it as the agent's page, and a crawler learns to come back.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

__all__ = ["REFRESH_SECONDS", "WAIT_BEFORE_PAGE", "accepts_html", "waiting_page", "wants_page"]

#: The page reloads itself this often (seconds).
REFRESH_SECONDS = 1
#: A browser's request is held this long first: an agent that wakes that fast
#: (unpause: ~15 ms) is shown at once, without a waiting page in between.
WAIT_BEFORE_PAGE = 1.0

_HTML_TYPES = (b"text/html", b"application/xhtml+xml")
_PAGE_METHODS = ("GET", "HEAD")


def accepts_html(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the ``Accept`` header names HTML explicitly (with ``q`` above 0);
    ``*/*`` alone is what API clients send, so it does not count."""
    for key, value in headers:
        if key != b"accept":
            continue
        for item in value.split(b","):
            media, _, params = item.partition(b";")
            if media.strip().lower() not in _HTML_TYPES:
                continue
            for param in params.split(b";"):
                name, _, weight = param.partition(b"=")
                if name.strip().lower() == b"q":
                    try:
                        return float(weight.strip()) > 0
                    except ValueError:
                        return False
            return True
    return False


def wants_page(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A browser navigating to a page: GET/HEAD that accepts HTML."""
    return method in _PAGE_METHODS and accepts_html(headers)


def waiting_page(agent: str, state: str, detail: str = "") -> bytes:
    """The page for ``agent`` in ``state`` (``detail``: why it is not ready, if known)."""
    name = html.escape(agent)
    shown = html.escape(state)
    failed = state == "failed"
    title = f"{name} has failed" if failed else f"{name} is waking up"
    hint = (
        "Roost gave up restarting it; an operator can reset it "
        f"(<code>roost reset {name}</code>). This page keeps checking."
        if failed
        else "This page reloads itself and shows the agent as soon as it is ready."
    )
    more = f'<p class="detail">{html.escape(detail)}</p>' if detail else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0; display: grid;
         place-items: center; min-height: 100vh; color: #222; background: #f7f7f5; }}
  main {{ max-width: 32rem; padding: 2rem; text-align: center; }}
  h1 {{ font-size: 1.4rem; margin: 0 0 .75rem; }}
  .state {{ font-weight: 600; }}
  .state-failed {{ color: #b00020; }}
  .detail {{ color: #666; font-size: .9rem; overflow-wrap: anywhere; }}
  .dots::after {{ content: "…"; animation: blink 1s steps(2) infinite; }}
  @keyframes blink {{ 50% {{ opacity: .2; }} }}
</style>
</head>
<body>
<main>
<h1 class="{"" if failed else "dots"}">{title}</h1>
<p>State: <span class="state state-{shown}" id="roost-state">{shown}</span></p>
{more}
<p>{hint}</p>
</main>
</body>
</html>
""".encode()
