"""The ElastiCache session-store tutorial app, rewritten for stickless.

The original tutorial app (Flask + redis-py) kept a signed cookie with the
username and a Redis hash per user, incremented with HINCRBY.  This version
has no Redis code and no Flask session at all: it runs behind stickless,
which keeps the session in Redis (or its embedded store) and talks to the app
with plain HTTP headers (default prefix ``x-session-``):

  request  (stickless -> app)
    X-Session: active | none
    X-Session-Field-<name>: <percent-encoded value>

  response (app -> stickless; applied and stripped before the client sees them)
    X-Session-Set-<name>: <percent-encoded value>
    X-Session-Incr-<name>: <integer>
    X-Session-Delete: <name>, <name>
    X-Session-Destroy: true
    X-Session-Rotate: true

Pages contain stable markers for tests:
  logged in:  "Logged in as <username>" and "Visits: <n>"
  logged out: "Not logged in"

Run:  python3 app.py --host 127.0.0.1 --port 5000
or:   gunicorn -b 127.0.0.1:5000 app:app

Never expose this app directly: it trusts the X-Session-* request headers,
which only stickless may set.  Bind it to a loopback/private address.
"""

import argparse
import re
from urllib.parse import quote, unquote

from flask import Flask, jsonify, redirect, request
from markupsafe import escape

app = Flask(__name__)

# ---------------------------------------------------------------------------
# Tiny stickless header-protocol helper
# ---------------------------------------------------------------------------

PREFIX = "x-session-"
FIELD_PREFIX = PREFIX + "field-"
FIELD_NAME_RE = re.compile(r"^[a-z0-9-]{1,64}$")

# Every printable ASCII character except '%' passes unchanged; quote() then
# encodes '%', control bytes (< 0x20, 0x7f) and every byte >= 0x80 (UTF-8).
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def encode_value(value):
    """Percent-encode a session value the way stickless expects.

    Encodes exactly: bytes < 0x20, 0x7f, bytes >= 0x80 (of the UTF-8
    encoding), '%', and leading/trailing spaces.  Plain ASCII is unchanged.
    """
    encoded = quote(str(value), safe=_SAFE, encoding="utf-8")
    stripped = encoded.lstrip(" ")
    lead = len(encoded) - len(stripped)
    core = stripped.rstrip(" ")
    trail = len(stripped) - len(core)
    return "%20" * lead + core + "%20" * trail


def decode_value(value):
    """Decode a percent-encoded session value (UTF-8)."""
    return unquote(value, encoding="utf-8", errors="replace")


def session_active():
    """True when stickless says a session exists (X-Session: active)."""
    return request.headers.get("X-Session", "").strip().lower() == "active"


def session_fields():
    """Read the X-Session-Field-<name> request headers into a dict."""
    fields = {}
    for name, value in request.headers.items():
        lname = name.lower()
        if lname.startswith(FIELD_PREFIX):
            field = lname[len(FIELD_PREFIX):]
            if FIELD_NAME_RE.match(field):
                fields[field] = decode_value(value)
    return fields


# ---------------------------------------------------------------------------
# Routes (same behaviour as the tutorial app)
# ---------------------------------------------------------------------------

PAGE = """<!doctype html>
<html>
<head><meta charset="utf-8"><title>stickless Flask example</title></head>
<body>
{body}
</body>
</html>
"""

LOGIN_FORM = """<form method="post" action="/login">
<p><label>Username <input type="text" name="username"></label>
<p><input type="submit" value="Login">
</form>"""


def page(body, status=200, headers=None):
    resp = app.response_class(PAGE.format(body=body), status=status,
                              mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def current_username(fields):
    if not session_active():
        return None
    username = fields.get("username")
    return username or None


@app.route("/")
def index():
    fields = session_fields()
    username = current_username(fields)
    if username is None:
        return page('<p>Not logged in</p>\n<p><a href="/login">Login</a></p>')

    try:
        visits = int(fields.get("visits", "0"))
    except ValueError:
        visits = 0
    # stickless applies the increment atomically in the store; the request
    # carried the value from before this visit, so display it plus one.
    visits += 1
    body = (
        "<p>Hello {name}</p>\n"
        "<p>Logged in as {name}</p>\n"
        "<p>Visits: {visits}</p>\n"
        '<p><a href="/logout">Logout</a></p>'
    ).format(name=escape(username), visits=visits)
    return page(body, headers={PREFIX + "incr-visits": "1"})


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        username = request.form.get("username", "").strip()
        if not username:
            return page("<p>Please enter a username.</p>\n" + LOGIN_FORM,
                        status=400)
        resp = redirect("/")
        # New session id at login (session fixation), then store the name.
        resp.headers[PREFIX + "rotate"] = "true"
        resp.headers[PREFIX + "set-username"] = encode_value(username)
        return resp

    return page(LOGIN_FORM)


@app.route("/logout", methods=["GET", "POST"])
def logout():
    resp = redirect("/")
    resp.headers[PREFIX + "destroy"] = "true"
    return resp


@app.route("/api/session")
def api_session():
    resp = jsonify({
        "session": "active" if session_active() else "none",
        "fields": session_fields(),
    })
    resp.headers["Cache-Control"] = "no-store"
    return resp


def main():
    parser = argparse.ArgumentParser(
        description="Flask session example for stickless (no Redis code).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000,
                        help="port to listen on (default 5000)")
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
