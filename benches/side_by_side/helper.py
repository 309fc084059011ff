"""Helpers for benches/side_by_side.sh (stdlib only, except `report`, which needs matplotlib).

  helper.py free-port
  helper.py seed-redis KEY N OUT_PREFIX      RESP commands on stdout for `redis-cli --pipe`;
                                             writes OUT_PREFIX.one (1 cookie) and OUT_PREFIX.all (N cookies)
  helper.py seed-http HOST:PORT N OUT_PREFIX creates sessions through stickless (GET /seed sets 5 fields)
  helper.py zipf COOKIES SAMPLES S WRITE_PCT SEED OUT   "path cookie" lines, Zipf(s) over the cookies
  helper.py hold HOST:PORT N READY_FILE      opens N keep-alive connections, one request on each,
                                             writes how many answered 200 to READY_FILE, holds them
                                             until SIGTERM
  helper.py oha-json FILE TARGET WORKLOAD PCT  oha's JSON as result lines
  helper.py report RESULTS_TSV META_JSON OUT_MD OUT_PNG
"""
import base64
import bisect
import hashlib
import hmac
import http.client
import json
import os
import random
import signal
import socket
import statistics
import sys
import time

FIELDS = {"user": "alice", "role": "editor", "lang": "en-GB", "theme": "dark", "cart": "sku-12345x3"}


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def seed_redis(key, n, prefix):
    """Sessions written as stickless writes them (README "Storage"): a hash `stickless:<id>` with
    the fields and `_created`, a sliding TTL; the cookie is `<id>.<HMAC-SHA256(id) base64url>`."""
    mac = key.encode()
    now_ms = int(time.time() * 1000)
    out = sys.stdout.buffer
    cookies = []
    for _ in range(n + 1):
        sid = b64(os.urandom(32))
        tag = b64(hmac.new(mac, sid.encode(), hashlib.sha256).digest())
        k = "stickless:" + sid
        pairs = [x for kv in FIELDS.items() for x in kv]
        out.write(resp("HSET", k, "_created", now_ms, *pairs))
        out.write(resp("PEXPIRE", k, 6 * 3600 * 1000))
        cookies.append(sid + "." + tag)
    write_cookies(prefix, cookies[0], cookies[1:])


def write_cookies(prefix, one, many):
    with open(prefix + ".one", "w") as f:
        f.write(one + "\n")
    with open(prefix + ".all", "w") as f:
        f.write("\n".join(many) + "\n")


def seed_http(addr, n, prefix):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    cookies = []
    for _ in range(n + 1):
        conn.request("GET", "/seed")
        r = conn.getresponse()
        r.read()
        sc = r.getheader("Set-Cookie") or ""
        if r.status != 200 or not sc.startswith("sid="):
            sys.exit(f"seeding through stickless failed: status {r.status}, no session cookie")
        cookies.append(sc.split(";", 1)[0][len("sid="):])
    write_cookies(prefix, cookies[0], cookies[1:])


def zipf(cookie_file, samples, s, write_pct, seed, out):
    cookies = open(cookie_file).read().split()
    rng = random.Random(int(seed))
    # Cumulative weights of ranks 1..n for P(rank k) ~ 1/k^s; ranks are shuffled over the cookies.
    cum, total = [], 0.0
    for k in range(1, len(cookies) + 1):
        total += 1.0 / k ** float(s)
        cum.append(total)
    order = list(range(len(cookies)))
    rng.shuffle(order)
    w = float(write_pct) / 100
    with open(out, "w") as f:
        for _ in range(int(samples)):
            rank = bisect.bisect_left(cum, rng.random() * total)
            path = "/incr" if rng.random() < w else "/"
            f.write(f"{path} {cookies[order[min(rank, len(cookies) - 1)]]}\n")


def hold(addr, n, ready_file):
    host, port = addr.rsplit(":", 1)
    socks = []
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    for _ in range(int(n)):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(req)
        socks.append(s)
    ok = 0
    for s in socks:
        if s.recv(4096).startswith(b"HTTP/1.1 200"):
            ok += 1
    with open(ready_file + ".tmp", "w") as f:
        f.write(f"{ok}\n")
    os.rename(ready_file + ".tmp", ready_file)
    signal.pause()  # until SIGTERM ends the process


def oha_json(path, t, w, pct):
    d = json.load(open(path))
    p = d["latencyPercentiles"]
    codes = d.get("statusCodeDistribution", {})
    for name, v in (("p50_us", p["p50"]), ("p99_us", p["p99"]), ("p999_us", p["p99.9"])):
        print(f"lat\t{t}\t{w}\t{pct}\t{name}\t{(v or 0) * 1e6:.0f}")
    print(f"lat\t{t}\t{w}\t{pct}\trps\t{d['summary']['requestsPerSec']:.0f}")
    bad = sum(n for c, n in codes.items() if c != "200") + sum(d.get("errorDistribution", {}).values())
    print(f"lat\t{t}\t{w}\t{pct}\terrors\t{bad}")


def report(tsv, meta_json, out_md, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.load(open(meta_json))
    rows = [line.rstrip("\n").split("\t") for line in open(tsv) if line.strip()]
    # kind target workload rate metric value
    data = {}
    for kind, target, workload, rate, metric, value in rows:
        data.setdefault((kind, target, workload, rate, metric), []).append(float(value))

    def med(key):
        v = data.get(key)
        return statistics.median(v) if v else None

    def cell(key, fmt="{:.0f}", scale=1.0):
        v = data.get(key)
        if not v:
            return "-"
        m = statistics.median(v) * scale
        if len(v) == 1:
            return fmt.format(m)
        return f"{fmt.format(m)} ({fmt.format(min(v) * scale)}-{fmt.format(max(v) * scale)})"

    targets = meta["targets"]
    labels = meta["labels"]
    workloads = meta["workloads"]
    md = [f"# stickless side by side: {meta['date']}", ""]
    md += meta["preamble"]
    md += ["", "## Throughput (req/s) at fixed concurrency",
           "",
           f"wrk, {meta['connections']} connections, {meta['threads']} threads, {meta['secs']} s per run, "
           f"{meta['rounds']} round(s) alternating targets. Median (min-max); ratio = median / nginx's median "
           "in the same workload.", ""]
    md.append("| target | " + " | ".join(workloads) + " |")
    md.append("|---|" + "---|" * len(workloads))
    for t in targets:
        cells = []
        for w in workloads:
            c = cell(("tput", t, w, "-", "rps"))
            ref = med(("tput", "nginx", w, "-", "rps"))
            m = med(("tput", t, w, "-", "rps"))
            if ref and m is not None and t != "nginx":
                c += f" **{m / ref:.2f}x**"
            cells.append(c)
        md.append(f"| {labels[t]} | " + " | ".join(cells) + " |")
    errs = [(k, sum(v)) for k, v in data.items() if k[4] in ("errors", "non2xx") and sum(v) > 0]
    errs_note = ", ".join(f"{labels.get(k[1], k[1])} {k[2]}{'' if k[3] == '-' else ' at ' + k[3] + '%'} "
                          f"{k[4]}={int(n)}" for k, n in errs)
    md += ["", "Errors or non-2xx responses (throughput and latency runs): " + (errs_note or "none.")]

    md += ["", "## Latency at fixed rates (µs)", "", meta["latency_note"], ""]
    md += ["*Added p50 / p99*: the target's p50 and p99 less those of direct to the backend at the same "
           "rate and workload (medians), the latency the proxy adds.", ""]
    md.append("| workload | rate | target | p50 | p99 | p99.9 | achieved req/s | added p50 / p99 |")
    md.append("|---|---|---|---|---|---|---|---|")
    rates = meta.get("rates", {})
    generator_short = set()
    for w in meta["latency_workloads"]:
        for pct, rate in rates.items():
            for t in meta["latency_targets"]:
                k = ("lat", t, w, pct)
                if not data.get(k + ("p50_us",)):
                    continue
                achieved = med(k + ("rps",))
                short = achieved is not None and achieved < 0.95 * float(rate)
                if short and t == "direct":
                    generator_short.add(f"{w} at {pct}%")
                added = "-"
                base = ("lat", "direct", w, pct)
                if t != "direct" and med(base + ("p50_us",)) is not None:
                    added = " / ".join(f"{med(k + (m,)) - med(base + (m,)):.0f}" for m in ("p50_us", "p99_us"))
                md.append(f"| {w} | {pct}% ({rate}/s) | {labels[t]} | " + " | ".join(
                    cell(k + (m,)) for m in ("p50_us", "p99_us", "p999_us", "rps"))
                    + (" (short of the rate)" if short else "") + f" | {added} |")
    if generator_short:
        md += ["", f"**Direct to the backend fell short of the rate in {', '.join(sorted(generator_short))}**: "
               "there the load generator (or the machine) is the limit, not the target, and the "
               "latencies of every target at that rate say little about the proxies."]

    md += ["", "## Redis per request (stickless on Redis, access log off)", "",
           "From `INFO commandstats` and `INFO stats` before and after each throughput run, divided by "
           "the requests served. *Commands*: every command Redis ran, a script's own commands "
           "included. *Scripts*: EVAL/EVALSHA/FCALL calls. A script is one round trip; so is a command "
           "sent on its own (commands pipelined together share one). Redis does not count a script's "
           "commands apart from the clients', so read round trips off the breakdown: when every call "
           "is a script (stickless 0.1), round trips = scripts. "
           "*Reads*: read events Redis processed (`total_reads_processed`); with many requests "
           "multiplexed on one connection, one read can carry several requests' commands. With the "
           "local cache, the invalidation channel's own checks (`INFO` twice a second) are left out.", "",
           "| target | workload | commands / request | scripts / request | reads / request | breakdown (per request) |",
           "|---|---|---|---|---|---|"]
    for t in ("sl-redis", "sl-cache"):
        if t not in targets:
            continue
        for w in workloads:
            names = sorted({k[4][6:] for k in data if k[0] == "tput" and k[1] == t and k[2] == w
                            and k[4].startswith("redis:") and not k[4].startswith("redis:_")})
            breakdown = ", ".join(f"{n} {med(('tput', t, w, '-', 'redis:' + n)):.3f}" for n in names)
            md.append(f"| {labels[t]} | {w} | " + " | ".join(
                cell(("tput", t, w, "-", "redis:" + m), "{:.3f}") for m in ("_commands", "_scripts", "_reads"))
                + f" | {breakdown or '-'} |")

    md += ["", "## CPU seconds per 10,000 requests", "",
           "utime+stime from /proc/PID/stat over each throughput run (nginx: master and workers of the "
           "proxy instance; the backend nginx is not counted), divided by requests / 10,000.", "",
           "| target | workload | proxy CPU s | Redis CPU s |", "|---|---|---|---|"]
    for t in targets:
        if t == "direct":
            continue
        for w in workloads:
            md.append(f"| {labels[t]} | {w} | {cell(('tput', t, w, '-', 'cpu_proxy'), '{:.3f}')} | "
                      f"{cell(('tput', t, w, '-', 'cpu_redis'), '{:.3f}')} |")

    md += ["", "## Memory", "", "| what | value |", "|---|---|"]
    for key, label in meta["memory_rows"]:
        v = med(("mem", key, "-", "-", "value"))
        md.append(f"| {label} | {'-' if v is None else f'{v:,.0f}'} |")
    md += ["", "## Command", "", "```sh", meta["command"], "```", ""]
    open(out_md, "w").write("\n".join(md))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    palette = plt.get_cmap("tab10").colors
    colors = {t: palette[i % len(palette)] for i, t in enumerate(targets)}
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        vals = [med(("tput", t, w, "-", "rps")) or 0 for w in workloads]
        ax1.bar([j + i * width for j in range(len(workloads))], vals, width, label=labels[t],
                color=colors[t])
    ax1.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
    ax1.set_ylabel("requests/s (median)")
    ax1.set_title(f"Throughput, {meta['connections']} connections")
    ax1.legend(fontsize=7)
    w0 = meta["latency_workloads"][1] if len(meta["latency_workloads"]) > 1 else meta["latency_workloads"][0]
    # The highest rate every target held (achieved within 5%): above it the chart would show
    # backlogs, not latencies.
    def held(pct):
        return all((med(("lat", t, w0, pct, "rps")) or 0) >= 0.95 * float(rates[pct])
                   for t in meta["latency_targets"])
    held_rates = [p for p in rates if held(p)]
    mid = max(held_rates, key=float) if held_rates else next(iter(rates), None)
    pcts = ["p50_us", "p99_us", "p999_us"]
    lt = meta["latency_targets"]
    width = 0.8 / max(1, len(lt))
    for i, t in enumerate(lt):
        vals = [(med(("lat", t, w0, mid, p)) or 0) / 1000 for p in pcts]
        ax2.bar([j + i * width for j in range(3)], vals, width, label=labels[t], color=colors[t])
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(3)], ["p50", "p99", "p99.9"])
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (median of rounds, log scale)")
    ax2.set_title(f"Latency, {w0}, {mid}% of direct max ({rates.get(mid)}/s, {meta['latency_tool']})")
    ax2.legend(fontsize=7)
    fig.suptitle(meta["chart_title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "free-port":
        free_port()
    elif cmd == "seed-redis":
        seed_redis(args[0], int(args[1]), args[2])
    elif cmd == "seed-http":
        seed_http(args[0], int(args[1]), args[2])
    elif cmd == "zipf":
        zipf(*args)
    elif cmd == "hold":
        hold(*args)
    elif cmd == "oha-json":
        oha_json(*args)
    elif cmd == "report":
        report(*args)
    else:
        sys.exit(__doc__)
