// The ElastiCache session-store tutorial app, in Go, rewritten for stickless.
//
// The original tutorial app kept a signed cookie with the username and a Redis
// hash per user, incremented with HINCRBY. This version has no Redis code and
// no session library (no gorilla/sessions): it runs behind stickless, which
// keeps the session in Redis (or its embedded store) and talks to the app with
// plain HTTP headers (default prefix "x-session-"):
//
//	request  (stickless -> app)
//	  X-Session: active | none
//	  X-Session-Field-<name>: <percent-encoded value>
//
//	response (app -> stickless; applied and stripped before the client sees them)
//	  X-Session-Set-<name>: <percent-encoded value>
//	  X-Session-Incr-<name>: <integer>
//	  X-Session-Delete: <name>, <name>
//	  X-Session-Destroy: true
//	  X-Session-Rotate: true
//
// Pages contain stable markers for tests:
//
//	logged in:  "Logged in as <username>" and "Visits: <n>"
//	logged out: "Not logged in"
//
// Run:  go build -o session-example . && ./session-example --host 127.0.0.1 --port 5000
//
// Never expose this app directly: it trusts the X-Session-* request headers,
// which only stickless may set. Bind it to a loopback/private address.
package main

import (
	"encoding/json"
	"flag"
	"html"
	"log"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// ---------------------------------------------------------------------------
// Tiny stickless header-protocol helper
// ---------------------------------------------------------------------------

const (
	statusHeader = "x-session" // active | none
	prefix       = statusHeader + "-"
	fieldPrefix  = prefix + "field-"
)

var fieldNameRE = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)

// encodeValue percent-encodes a session value for stickless. PathEscape keeps
// only unreserved characters (and a few sub-delims) and writes a space as %20,
// never as '+', so '%', control bytes, non-ASCII UTF-8 bytes and edge spaces
// are all encoded.
func encodeValue(v string) string { return url.PathEscape(v) }

// decodeValue decodes %XX only ('+' stays '+'); a malformed value is kept as is.
func decodeValue(v string) string {
	if d, err := url.PathUnescape(v); err == nil {
		return strings.ToValidUTF8(d, "\uFFFD")
	}
	return v
}

// sessionActive: stickless says a session exists (X-Session: active).
func sessionActive(r *http.Request) bool {
	return strings.EqualFold(strings.TrimSpace(r.Header.Get(statusHeader)), "active")
}

// sessionFields reads the X-Session-Field-<name> request headers, decoded.
func sessionFields(r *http.Request) map[string]string {
	fields := map[string]string{}
	for name, values := range r.Header {
		lname := strings.ToLower(name)
		if !strings.HasPrefix(lname, fieldPrefix) || len(values) == 0 {
			continue
		}
		if field := lname[len(fieldPrefix):]; fieldNameRE.MatchString(field) {
			fields[field] = decodeValue(values[0])
		}
	}
	return fields
}

// ---------------------------------------------------------------------------
// Routes (same behaviour as the tutorial app and examples/flask)
// ---------------------------------------------------------------------------

const pageTemplate = `<!doctype html>
<html>
<head><meta charset="utf-8"><title>stickless Go example</title></head>
<body>
%BODY%
</body>
</html>
`

const loginForm = `<form method="post" action="/login">
<p><label>Username <input type="text" name="username"></label>
<p><input type="submit" value="Login">
</form>`

func page(w http.ResponseWriter, status int, body string) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(strings.Replace(pageTemplate, "%BODY%", body, 1)))
}

func redirectHome(w http.ResponseWriter) {
	w.Header().Set("Location", "/")
	w.WriteHeader(http.StatusFound)
}

// allow answers 405 unless the method is one of methods (HEAD goes with GET).
func allow(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m || (m == http.MethodGet && r.Method == http.MethodHead) {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	http.Error(w, "Method Not Allowed", http.StatusMethodNotAllowed)
	return false
}

func index(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	if !allow(w, r, http.MethodGet) {
		return
	}
	fields := sessionFields(r)
	username := fields["username"]
	if !sessionActive(r) || username == "" {
		page(w, http.StatusOK, "<p>Not logged in</p>\n<p><a href=\"/login\">Login</a></p>")
		return
	}
	visits, err := strconv.ParseInt(strings.TrimSpace(fields["visits"]), 10, 64)
	if err != nil {
		visits = 0
	}
	// stickless applies the increment atomically in the store; the request
	// carried the value from before this visit, so display it plus one.
	visits++
	name := html.EscapeString(username)
	w.Header().Set(prefix+"incr-visits", "1")
	page(w, http.StatusOK, "<p>Hello "+name+"</p>\n"+
		"<p>Logged in as "+name+"</p>\n"+
		"<p>Visits: "+strconv.FormatInt(visits, 10)+"</p>\n"+
		"<p><a href=\"/logout\">Logout</a></p>")
}

func login(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet, http.MethodPost) {
		return
	}
	if r.Method != http.MethodPost {
		page(w, http.StatusOK, loginForm)
		return
	}
	username := strings.TrimSpace(r.PostFormValue("username"))
	if username == "" {
		page(w, http.StatusBadRequest, "<p>Please enter a username.</p>\n"+loginForm)
		return
	}
	// New session id at login (session fixation), then store the name.
	w.Header().Set(prefix+"rotate", "true")
	w.Header().Set(prefix+"set-username", encodeValue(username))
	redirectHome(w)
}

func logout(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet, http.MethodPost) {
		return
	}
	w.Header().Set(prefix+"destroy", "true")
	redirectHome(w)
}

func apiSession(w http.ResponseWriter, r *http.Request) {
	if !allow(w, r, http.MethodGet) {
		return
	}
	session := "none"
	if sessionActive(r) {
		session = "active"
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(map[string]any{"session": session, "fields": sessionFields(r)})
}

// ---------------------------------------------------------------------------
// Access log and server
// ---------------------------------------------------------------------------

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// accessLog writes one line per request to stderr, ending in method, path and
// status: "2024/01/02 15:04:05 127.0.0.1:40312 GET / 200".
func accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w}
		next.ServeHTTP(rec, r)
		if rec.status == 0 {
			rec.status = http.StatusOK
		}
		log.Printf("%s %s %s %d", r.RemoteAddr, r.Method, r.RequestURI, rec.status)
	})
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 5000, "port to listen on")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("/", index) // also the 404 for every unknown path
	mux.HandleFunc("/login", login)
	mux.HandleFunc("/logout", logout)
	mux.HandleFunc("/api/session", apiSession)

	srv := &http.Server{
		Addr:              net.JoinHostPort(*host, strconv.Itoa(*port)),
		Handler:           accessLog(mux),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second, // above stickless' --upstream-idle-timeout (1s)
	}
	log.Printf("stickless Go example listening on http://%s", srv.Addr)
	log.Fatal(srv.ListenAndServe())
}
