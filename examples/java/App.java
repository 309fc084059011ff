/*
 * The ElastiCache session-store tutorial app, rewritten for stickless, in plain Java.
 *
 * The original tutorial app (Flask + redis-py) kept the username in a signed cookie and a
 * Redis hash per user, incremented with HINCRBY. This version has no Redis code and no
 * HttpSession at all: it runs behind stickless, which keeps the session in Redis (or its
 * embedded store) and talks to the app with plain HTTP headers (default prefix x-session-):
 *
 *   request  (stickless -> app)
 *     X-Session: active | none
 *     X-Session-Field-<name>: <percent-encoded value>
 *
 *   response (app -> stickless; applied and stripped before the client sees them)
 *     X-Session-Set-<name>: <percent-encoded value>
 *     X-Session-Incr-<name>: <integer>
 *     X-Session-Delete: <name>, <name>
 *     X-Session-Destroy: true
 *     X-Session-Rotate: true
 *
 * Pages contain stable markers for tests:
 *   logged in:  "Logged in as <username>" and "Visits: <n>"
 *   logged out: "Not logged in"
 *
 * Java 17, JDK only (com.sun.net.httpserver), no build step:
 *   java App.java --host 127.0.0.1 --port 5000
 *
 * Never expose this app directly: it trusts the X-Session-* request headers, which only
 * stickless may set. Bind it to a loopback/private address.
 */

import com.sun.net.httpserver.Headers;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.URLDecoder;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.Executors;
import java.util.regex.Pattern;

public class App {

    // -------------------------------------------------------------------------------------
    // Tiny stickless header-protocol helper
    // -------------------------------------------------------------------------------------

    static final String PREFIX = "x-session-";
    static final String FIELD_PREFIX = PREFIX + "field-";
    static final Pattern FIELD_NAME = Pattern.compile("^[a-z0-9-]{1,64}$");

    /** Percent-encode a session value for stickless: UTF-8, never a space as '+'. */
    static String encodeValue(String value) {
        return URLEncoder.encode(value, StandardCharsets.UTF_8).replace("+", "%20");
    }

    /** Decode a percent-encoded session value (UTF-8); '+' stays '+'. */
    static String decodeValue(String value) {
        try {
            return URLDecoder.decode(value.replace("+", "%2B"), StandardCharsets.UTF_8);
        } catch (IllegalArgumentException e) { // malformed escape: stickless never sends one
            return value;
        }
    }

    /** True when stickless says a session exists (X-Session: active). */
    static boolean sessionActive(HttpExchange ex) {
        String v = ex.getRequestHeaders().getFirst("X-Session");
        return v != null && v.strip().equalsIgnoreCase("active");
    }

    /** The X-Session-Field-<name> request headers, decoded, by field name. */
    static Map<String, String> sessionFields(HttpExchange ex) {
        Map<String, String> fields = new TreeMap<>();
        for (Map.Entry<String, List<String>> h : ex.getRequestHeaders().entrySet()) {
            String name = h.getKey().toLowerCase(Locale.ROOT);
            if (!name.startsWith(FIELD_PREFIX) || h.getValue().isEmpty()) continue;
            String field = name.substring(FIELD_PREFIX.length());
            if (FIELD_NAME.matcher(field).matches()) {
                List<String> values = h.getValue();
                fields.put(field, decodeValue(values.get(values.size() - 1)));
            }
        }
        return fields;
    }

    // -------------------------------------------------------------------------------------
    // Small HTML / JSON / form helpers
    // -------------------------------------------------------------------------------------

    static String escapeHtml(String s) {
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                .replace("\"", "&#34;").replace("'", "&#39;");
    }

    static String jsonString(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> b.append("\\\"");
                case '\\' -> b.append("\\\\");
                case '\n' -> b.append("\\n");
                case '\r' -> b.append("\\r");
                case '\t' -> b.append("\\t");
                default -> {
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                    else b.append(c); // non-ASCII stays as is (the body is UTF-8)
                }
            }
        }
        return b.append('"').toString();
    }

    static final int MAX_BODY = 64 * 1024;

    /** The request body, or null when it is larger than MAX_BODY. */
    static byte[] readBody(HttpExchange ex) throws IOException {
        try (InputStream in = ex.getRequestBody()) {
            byte[] body = in.readNBytes(MAX_BODY + 1);
            return body.length > MAX_BODY ? null : body;
        }
    }

    /** One field of an application/x-www-form-urlencoded body ('+' is a space here). */
    static String formField(byte[] body, String wanted) {
        for (String pair : new String(body, StandardCharsets.UTF_8).split("&")) {
            int eq = pair.indexOf('=');
            String k = eq < 0 ? pair : pair.substring(0, eq);
            if (URLDecoder.decode(k, StandardCharsets.UTF_8).equals(wanted)) {
                return URLDecoder.decode(eq < 0 ? "" : pair.substring(eq + 1), StandardCharsets.UTF_8);
            }
        }
        return "";
    }

    // -------------------------------------------------------------------------------------
    // Responses
    // -------------------------------------------------------------------------------------

    static final String PAGE = """
            <!doctype html>
            <html>
            <head><meta charset="utf-8"><title>stickless Java example</title></head>
            <body>
            %s
            </body>
            </html>
            """;

    static final String LOGIN_FORM = """
            <form method="post" action="/login">
            <p><label>Username <input type="text" name="username"></label>
            <p><input type="submit" value="Login">
            </form>""";

    static void send(HttpExchange ex, int status, String type, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        Headers h = ex.getResponseHeaders();
        h.set("Content-Type", type);
        h.set("Cache-Control", "no-store");
        if (ex.getRequestMethod().equals("HEAD")) {
            ex.sendResponseHeaders(status, -1);
            return;
        }
        ex.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(bytes);
        }
    }

    static void page(HttpExchange ex, int status, String body) throws IOException {
        send(ex, status, "text/html; charset=utf-8", String.format(PAGE, body));
    }

    static void redirectHome(HttpExchange ex) throws IOException {
        ex.getResponseHeaders().set("Location", "/");
        ex.sendResponseHeaders(302, -1);
    }

    // -------------------------------------------------------------------------------------
    // Routes (same behaviour as the tutorial app)
    // -------------------------------------------------------------------------------------

    static void index(HttpExchange ex) throws IOException {
        Map<String, String> fields = sessionFields(ex);
        String username = sessionActive(ex) ? fields.getOrDefault("username", "") : "";
        if (username.isEmpty()) {
            page(ex, 200, "<p>Not logged in</p>\n<p><a href=\"/login\">Login</a></p>");
            return;
        }
        long visits;
        try {
            visits = Long.parseLong(fields.getOrDefault("visits", "0").strip());
        } catch (NumberFormatException e) {
            visits = 0;
        }
        // stickless applies the increment atomically in the store; the request carried the
        // value from before this visit, so display it plus one.
        visits += 1;
        String name = escapeHtml(username);
        ex.getResponseHeaders().set(PREFIX + "incr-visits", "1");
        page(ex, 200, "<p>Hello " + name + "</p>\n"
                + "<p>Logged in as " + name + "</p>\n"
                + "<p>Visits: " + visits + "</p>\n"
                + "<p><a href=\"/logout\">Logout</a></p>");
    }

    static void login(HttpExchange ex) throws IOException {
        if (!ex.getRequestMethod().equals("POST")) {
            page(ex, 200, LOGIN_FORM);
            return;
        }
        byte[] body = readBody(ex);
        if (body == null) {
            page(ex, 413, "<p>Request body too large.</p>");
            return;
        }
        String type = ex.getRequestHeaders().getFirst("Content-Type");
        String username = "";
        if (type != null && type.toLowerCase(Locale.ROOT)
                .startsWith("application/x-www-form-urlencoded")) {
            try {
                username = formField(body, "username").strip();
            } catch (IllegalArgumentException e) { // malformed %-escape in the form
                page(ex, 400, "<p>Malformed form data.</p>\n" + LOGIN_FORM);
                return;
            }
        }
        if (username.isEmpty()) {
            page(ex, 400, "<p>Please enter a username.</p>\n" + LOGIN_FORM);
            return;
        }
        // New session id at login (session fixation), then store the name.
        ex.getResponseHeaders().set(PREFIX + "rotate", "true");
        ex.getResponseHeaders().set(PREFIX + "set-username", encodeValue(username));
        redirectHome(ex);
    }

    static void logout(HttpExchange ex) throws IOException {
        readBody(ex);
        ex.getResponseHeaders().set(PREFIX + "destroy", "true");
        redirectHome(ex);
    }

    static void apiSession(HttpExchange ex) throws IOException {
        StringBuilder json = new StringBuilder("{\"session\": ");
        json.append(sessionActive(ex) ? "\"active\"" : "\"none\"").append(", \"fields\": {");
        String sep = "";
        for (Map.Entry<String, String> f : sessionFields(ex).entrySet()) {
            json.append(sep).append(jsonString(f.getKey())).append(": ").append(jsonString(f.getValue()));
            sep = ", ";
        }
        json.append("}}\n");
        send(ex, 200, "application/json; charset=utf-8", json.toString());
    }

    interface Route {
        void handle(HttpExchange ex) throws IOException;
    }

    static void handle(HttpExchange ex) {
        String method = ex.getRequestMethod();
        String path = ex.getRequestURI().getRawPath();
        int status = 500;
        try {
            Route route = null;
            List<String> allow = List.of("GET", "HEAD");
            switch (path) {
                case "/" -> route = App::index;
                case "/api/session" -> route = App::apiSession;
                case "/login" -> { route = App::login; allow = List.of("GET", "HEAD", "POST"); }
                case "/logout" -> { route = App::logout; allow = List.of("GET", "HEAD", "POST"); }
                default -> { }
            }
            if (route == null) {
                page(ex, 404, "<p>Not found</p>");
            } else if (!allow.contains(method)) {
                ex.getResponseHeaders().set("Allow", String.join(", ", allow));
                page(ex, 405, "<p>Method not allowed</p>");
            } else {
                route.handle(ex);
            }
            status = ex.getResponseCode();
        } catch (Exception e) {
            e.printStackTrace();
            try {
                if (ex.getResponseCode() == -1) ex.sendResponseHeaders(500, -1);
                else status = ex.getResponseCode();
            } catch (IOException ignored) {
                // the client is gone
            }
        } finally {
            ex.close();
            System.err.printf("%s %s %s %d%n",
                    ex.getRemoteAddress().getAddress().getHostAddress(), method, path, status);
        }
    }

    public static void main(String[] args) throws IOException {
        String host = "127.0.0.1";
        int port = 5000;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if ((a.equals("--host") || a.equals("--port")) && i + 1 < args.length) {
                if (a.equals("--host")) host = args[++i];
                else port = Integer.parseInt(args[++i]);
            } else {
                System.err.println("usage: java App.java [--host 127.0.0.1] [--port 5000]");
                System.exit(2);
            }
        }
        HttpServer server = HttpServer.create(new InetSocketAddress(host, port), 128);
        server.createContext("/", App::handle);
        server.setExecutor(Executors.newFixedThreadPool(16));
        server.start();
        System.err.printf("stickless Java example listening on http://%s:%d/%n", host, port);
    }
}
