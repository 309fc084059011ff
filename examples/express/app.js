// The ElastiCache session-store tutorial app, in Express, behind stickless.
//
// No session middleware (no express-session, no connect-redis) and no Redis code: stickless
// keeps the session and talks to this app with plain HTTP headers (default prefix x-session-):
//
//   request  (stickless -> app)   X-Session: active | none
//                                 X-Session-Field-<name>: <percent-encoded value>
//   response (app -> stickless)   X-Session-Set-<name>: <percent-encoded value>
//                                 X-Session-Incr-<name>: <integer>
//                                 X-Session-Delete: <name>, <name>
//                                 X-Session-Destroy: true
//                                 X-Session-Rotate: true
//
// stickless applies the response headers to the store and strips them before the browser sees
// the response.
//
// Run:  npm ci && node app.js --host 127.0.0.1 --port 5000
//
// Never expose this app directly: it trusts the X-Session-* request headers, which only
// stickless may set. Bind it to a loopback or private address.
"use strict";

const express = require("express");
const { parseArgs } = require("node:util");

// ---------------------------------------------------------------------------------------------
// The few lines that replace a session library
// ---------------------------------------------------------------------------------------------

const PREFIX = "x-session-";
const FIELD_PREFIX = PREFIX + "field-";
const FIELD_NAME = /^[a-z0-9-]{1,64}$/;

// Is there a session? (X-Session: active)
function sessionActive(req) {
  return (req.get("x-session") || "").trim().toLowerCase() === "active";
}

// The session's fields, decoded: { name: value }. Node lower-cases header names.
function sessionFields(req) {
  const fields = {};
  for (const [name, value] of Object.entries(req.headers)) {
    const field = name.startsWith(FIELD_PREFIX) ? name.slice(FIELD_PREFIX.length) : "";
    if (FIELD_NAME.test(field)) {
      try {
        fields[field] = decodeURIComponent(value);
      } catch {
        // not from stickless (it always writes valid escapes): ignore the field
      }
    }
  }
  return fields;
}

// encodeURIComponent escapes more than stickless needs (it decodes any %XX), and never
// writes a space as `+`.
const encodeValue = (value) => encodeURIComponent(String(value));

// ---------------------------------------------------------------------------------------------
// Pages (the tutorial's behaviour)
// ---------------------------------------------------------------------------------------------

const escapeHtml = (s) =>
  String(s).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;" })[c],
  );

const LOGIN_FORM = `<form method="post" action="/login">
<p><label>Username <input type="text" name="username"></label>
<p><input type="submit" value="Login">
</form>`;

function page(res, body, status = 200) {
  res
    .status(status)
    .set("Cache-Control", "no-store")
    .type("html")
    .send(
      `<!doctype html>
<html>
<head><meta charset="utf-8"><title>stickless Express example</title></head>
<body>
${body}
</body>
</html>
`,
    );
}

const app = express();
app.disable("x-powered-by");
// Pages depend on the session: no ETag, so no 304 that would skip a visit.
app.set("etag", false);

// One access-log line per request: method, path, status.
app.use((req, res, next) => {
  res.on("finish", () => console.log(`${req.method} ${req.originalUrl} ${res.statusCode}`));
  next();
});

app.get("/", (req, res) => {
  const fields = sessionFields(req);
  const username = sessionActive(req) ? fields.username : "";
  if (!username) {
    return page(res, '<p>Not logged in</p>\n<p><a href="/login">Login</a></p>');
  }
  // stickless applies the increment atomically after this response; the request carried the
  // count from before this visit, so the page shows it plus one.
  const counted = /^-?\d+$/.test(fields.visits || "") ? Number(fields.visits) : 0;
  res.set(PREFIX + "incr-visits", "1");
  const name = escapeHtml(username);
  page(
    res,
    `<p>Hello ${name}</p>
<p>Logged in as ${name}</p>
<p>Visits: ${counted + 1}</p>
<p><a href="/logout">Logout</a></p>`,
  );
});

app.get("/login", (req, res) => page(res, LOGIN_FORM));

app.post("/login", express.urlencoded({ extended: false, limit: "16kb" }), (req, res) => {
  const username = String((req.body && req.body.username) || "").trim();
  if (!username) {
    return page(res, "<p>Please enter a username.</p>\n" + LOGIN_FORM, 400);
  }
  // A new session id at login (against session fixation), then store the name.
  res.set(PREFIX + "rotate", "true");
  res.set(PREFIX + "set-username", encodeValue(username));
  res.redirect(302, "/");
});

app.all("/logout", (req, res, next) => {
  if (req.method !== "GET" && req.method !== "POST") return next();
  res.set(PREFIX + "destroy", "true");
  res.redirect(302, "/");
});

app.get("/api/session", (req, res) => {
  res.set("Cache-Control", "no-store").json({
    session: sessionActive(req) ? "active" : "none",
    fields: sessionFields(req),
  });
});

app.use((req, res) => res.status(404).type("text").send("Not Found\n"));

// ---------------------------------------------------------------------------------------------

function main() {
  const { values } = parseArgs({
    options: {
      host: { type: "string", default: "127.0.0.1" },
      port: { type: "string", default: "5000" },
    },
  });
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`--port: ${values.port} is not a port number`);
    process.exit(2);
  }
  const server = app.listen(port, values.host, () =>
    console.log(`listening on http://${values.host}:${port}`),
  );
  server.on("error", (err) => {
    console.error(`cannot listen on ${values.host}:${port}: ${err.message}`);
    process.exit(1);
  });
  // Bounded waits for slow clients (stickless keeps its connections alive up to 75 s idle).
  server.headersTimeout = 20_000;
  server.requestTimeout = 60_000;
  server.keepAliveTimeout = 90_000;
  for (const signal of ["SIGINT", "SIGTERM"]) {
    process.on(signal, () => server.close(() => process.exit(0)));
  }
}

main();
