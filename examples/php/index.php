<?php
/*
 * The ElastiCache session-store tutorial app, in plain PHP, rewritten for stickless.
 *
 * The original tutorial app kept a signed cookie with the username and a Redis
 * hash per user, incremented with HINCRBY. This version has no Redis code and
 * does not use PHP's session extension ($_SESSION, session_start) at all: it
 * runs behind stickless, which keeps the session in Redis (or its embedded
 * store) and talks to the app with plain HTTP headers (default prefix x-session-):
 *
 *   request  (stickless -> app; PHP shows them as $_SERVER['HTTP_X_SESSION...'])
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
 * Run:  php -S 127.0.0.1:5000 index.php      (router script of the built-in server)
 * or as the front controller under PHP-FPM (nginx) or Apache.
 *
 * Never expose this app directly: it trusts the X-Session-* request headers,
 * which only stickless may set. Bind it to a loopback/private address.
 */

declare(strict_types=1);

// ---------------------------------------------------------------------------
// Tiny stickless header-protocol helper
// ---------------------------------------------------------------------------

const FIELD_PREFIX = 'HTTP_X_SESSION_FIELD_'; // X-Session-Field-<name>, as PHP names it

/** Percent-encode a session value for stickless (space -> %20, never '+'). */
function encode_value(string $value): string
{
    return rawurlencode($value);
}

/** Decode a percent-encoded session value: %XX only, '+' stays '+'. */
function decode_value(string $value): string
{
    return rawurldecode($value);
}

/** True when stickless says a session exists (X-Session: active). */
function session_active(): bool
{
    return strtolower(trim((string) ($_SERVER['HTTP_X_SESSION'] ?? ''))) === 'active';
}

/** The X-Session-Field-<name> request headers, decoded, keyed by lower-case name. */
function session_fields(): array
{
    $fields = [];
    foreach ($_SERVER as $key => $value) {
        if (!is_string($key) || !str_starts_with($key, FIELD_PREFIX)) {
            continue;
        }
        // PHP upper-cases header names and turns '-' into '_': map them back.
        $name = strtolower(str_replace('_', '-', substr($key, strlen(FIELD_PREFIX))));
        if (preg_match('/^[a-z0-9-]{1,64}$/D', $name)) {
            $fields[$name] = decode_value((string) $value);
        }
    }
    return $fields;
}

// ---------------------------------------------------------------------------
// Routes (same behaviour as the tutorial app and examples/flask)
// ---------------------------------------------------------------------------

const LOGIN_FORM = <<<'HTML'
<form method="post" action="/login">
<p><label>Username <input type="text" name="username"></label>
<p><input type="submit" value="Login">
</form>
HTML;

/** HTML-escape & < > " ' (ENT_SUBSTITUTE: invalid UTF-8 becomes U+FFFD instead of ""). */
function e(string $s): string
{
    return htmlspecialchars($s, ENT_QUOTES | ENT_SUBSTITUTE, 'UTF-8');
}

function page(string $body, int $status = 200): void
{
    http_response_code($status);
    header('Content-Type: text/html; charset=utf-8');
    header('Cache-Control: no-store');
    echo "<!doctype html>\n<html>\n",
        "<head><meta charset=\"utf-8\"><title>stickless PHP example</title></head>\n",
        "<body>\n", $body, "\n</body>\n</html>\n";
}

function redirect_home(): void
{
    header('Location: /', true, 302);
}

/** Answers 405 unless the method is one of $methods (HEAD goes with GET). */
function allow(string ...$methods): bool
{
    $method = $_SERVER['REQUEST_METHOD'] ?? 'GET';
    if (in_array($method, $methods, true) || ($method === 'HEAD' && in_array('GET', $methods, true))) {
        return true;
    }
    http_response_code(405);
    header('Allow: ' . implode(', ', $methods));
    header('Content-Type: text/plain; charset=utf-8');
    echo "Method Not Allowed\n";
    return false;
}

function index(): void
{
    $fields = session_fields();
    $username = $fields['username'] ?? '';
    if (!session_active() || $username === '') {
        page("<p>Not logged in</p>\n<p><a href=\"/login\">Login</a></p>");
        return;
    }
    $visits = filter_var($fields['visits'] ?? '0', FILTER_VALIDATE_INT);
    // stickless applies the increment atomically in the store; the request
    // carried the value from before this visit, so display it plus one.
    $visits = ($visits === false ? 0 : $visits) + 1;
    $name = e($username);
    header('X-Session-Incr-visits: 1');
    page("<p>Hello $name</p>\n<p>Logged in as $name</p>\n<p>Visits: $visits</p>\n"
        . '<p><a href="/logout">Logout</a></p>');
}

function login(): void
{
    if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
        page(LOGIN_FORM);
        return;
    }
    $username = $_POST['username'] ?? '';
    $username = is_string($username) ? trim($username) : '';
    if ($username === '') {
        page("<p>Please enter a username.</p>\n" . LOGIN_FORM, 400);
        return;
    }
    // New session id at login (session fixation), then store the name.
    header('X-Session-Rotate: true');
    header('X-Session-Set-username: ' . encode_value($username));
    redirect_home();
}

function logout(): void
{
    header('X-Session-Destroy: true');
    redirect_home();
}

function api_session(): void
{
    header('Content-Type: application/json');
    header('Cache-Control: no-store');
    echo json_encode(
        ['session' => session_active() ? 'active' : 'none', 'fields' => (object) session_fields()],
        JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE
    ), "\n";
}

// ---------------------------------------------------------------------------
// Front controller: every request comes here (php -S router script, or
// FPM/Apache rewriting everything to index.php)
// ---------------------------------------------------------------------------

// With a router script, `php -S` logs only "Accepted"/"Closing", not the
// request: write the access-log line ourselves (FPM/Apache log access already).
if (PHP_SAPI === 'cli-server') {
    register_shutdown_function(static function (): void {
        error_log(sprintf('%s:%s [%d]: %s %s', $_SERVER['REMOTE_ADDR'] ?? '-', $_SERVER['REMOTE_PORT'] ?? '-',
            http_response_code(), $_SERVER['REQUEST_METHOD'] ?? '-', $_SERVER['REQUEST_URI'] ?? '-'));
    });
}

$path = rawurldecode(explode('?', (string) ($_SERVER['REQUEST_URI'] ?? '/'), 2)[0]);
switch ($path) {
    case '/':
        if (allow('GET')) {
            index();
        }
        break;
    case '/login':
        if (allow('GET', 'POST')) {
            login();
        }
        break;
    case '/logout':
        if (allow('GET', 'POST')) {
            logout();
        }
        break;
    case '/api/session':
        if (allow('GET')) {
            api_session();
        }
        break;
    default:
        http_response_code(404);
        header('Content-Type: text/plain; charset=utf-8');
        echo "Not Found\n";
}
