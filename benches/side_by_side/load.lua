-- wrk script for benches/side_by_side.sh.
-- Without COOKIE_FILE: every request is GET $REQ_PATH, with `Cookie: sid=$COOKIE` when COOKIE is set.
-- With COOKIE_FILE: a file of "path cookie" lines (Zipf samples precomputed by helper.py); each
-- thread walks it from its own offset, one line per request.
-- done() prints one machine-readable line: RESULT requests=.. duration_us=.. errors=.. p50_us=..

local lines = {}
local pos = 1
local fixed

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
end

function init(args)
  local file = os.getenv("COOKIE_FILE")
  if file and file ~= "" then
    for line in io.lines(file) do
      local path, cookie = line:match("^(%S+)%s+(%S+)$")
      if path then
        lines[#lines + 1] = wrk.format("GET", path, { Cookie = "sid=" .. cookie })
      end
    end
    pos = math.floor(#lines * ((thread_index or 1) - 1) / 8) + 1
  else
    local cookie = os.getenv("COOKIE")
    local headers = {}
    if cookie and cookie ~= "" then headers["Cookie"] = "sid=" .. cookie end
    fixed = wrk.format("GET", os.getenv("REQ_PATH") or "/", headers)
  end
end

function request()
  if fixed then return fixed end
  local r = lines[pos]
  pos = pos + 1
  if pos > #lines then pos = 1 end
  return r
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d errors=%d non2xx=%d p50_us=%d p99_us=%d p999_us=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
