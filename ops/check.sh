#!/usr/bin/env bash
# Checks the broker's monitoring artefacts with the real Prometheus tools.
#
#   ops/check.sh rules               promtool check rules + promtool test rules (alert unit tests)
#   ops/check.sh scrape <metrics-url>
#                                    starts a throw-away Prometheus on a free loopback port that
#                                    scrapes <metrics-url> (job "trmx-broker") and loads the alert
#                                    rules; checks the exposition with `promtool check metrics`,
#                                    that every rule evaluates without error, and that EVERY
#                                    query of ops/grafana/trmx-broker.json returns series
#   ops/check.sh demo                builds and runs the metrics_demo example (a stand-in admin
#                                    endpoint with synthetic traffic) and runs `scrape` against it
#   ops/check.sh all                 rules, then demo
#
# A missing tool is a failure, never a skip. Needs Debian's `prometheus` package (promtool and
# prometheus) and python3.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
alerts="$here/prometheus/alerts.yml"
dashboard="$here/grafana/trmx-broker.json"
deadline_secs="${TRMX_CHECK_DEADLINE_SECS:-60}"

tmp=""
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]+"${pids[@]}"}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$tmp" ]]; then
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "ops/check.sh: $*" >&2
    exit 1
}

need() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            case "$tool" in
                promtool | prometheus)
                    die "$tool not found; install Debian's prometheus package: sudo apt-get update && sudo apt-get install -y prometheus" ;;
                *)
                    die "$tool not found; install it (Debian: sudo apt-get install -y $tool)" ;;
            esac
        fi
    done
}

make_tmp() {
    if [[ -z "$tmp" ]]; then
        tmp="$(mktemp -d "${TMPDIR:-/tmp}/trmx-ops-check.XXXXXX")"
    fi
}

check_rules() {
    need promtool
    echo "== $(promtool --version 2>&1 | head -n 1)"
    echo "== promtool check rules"
    promtool check rules "$alerts"
    echo "== promtool test rules"
    (cd "$here/prometheus" && promtool test rules alerts_test.yml)
}

check_scrape() {
    local url="$1"
    need prometheus promtool python3
    make_tmp
    echo "== $(prometheus --version 2>&1 | head -n 1)"
    echo "== $(python3 --version 2>&1)"

    # target host:port, path and scheme of the metrics URL
    local parts scheme target path
    parts="$(python3 - "$url" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
if u.scheme not in ("http", "https") or not u.netloc:
    sys.exit(f"not an http(s) URL: {sys.argv[1]}")
print(u.scheme, u.netloc, u.path or "/metrics")
PY
)" || die "bad metrics URL: $url"
    read -r scheme target path <<<"$parts"

    echo "== promtool check metrics ($url)"
    python3 - "$url" >"$tmp/scrape.txt" <<'PY' || die "cannot fetch $url"
import sys, urllib.request
try:
    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
except Exception as e:
    sys.exit(f"GET {sys.argv[1]}: {e}")
PY
    promtool check metrics <"$tmp/scrape.txt"
    echo "ok: $(grep -c '^# TYPE ' "$tmp/scrape.txt") metric families"

    local port
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - "$alerts"
scrape_configs:
  - job_name: trmx-broker
    scheme: $scheme
    metrics_path: "$path"
    static_configs:
      - targets: ["$target"]
EOF
    echo "== prometheus on 127.0.0.1:$port scraping $url"
    prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
        --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
    pids+=("$!")

    if ! PROM="http://127.0.0.1:$port" DASHBOARD="$dashboard" DEADLINE="$deadline_secs" python3 - <<'PY'; then
import json, os, sys, time, urllib.parse, urllib.request

prom = os.environ["PROM"]
deadline = time.monotonic() + float(os.environ["DEADLINE"])

def get(path, **params):
    url = prom + path + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)

def wait_for(what, probe):
    last = None
    while time.monotonic() < deadline:
        try:
            ok, last = probe()
            if ok:
                return
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.25)
    sys.exit(f"timed out waiting for {what}: {last}")

def ready():
    with urllib.request.urlopen(prom + "/-/ready", timeout=5) as r:
        return r.status == 200, r.status
wait_for("prometheus to be ready", ready)

def target_up():
    targets = get("/api/v1/targets")["data"]["activeTargets"]
    states = [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in targets]
    return any(t["health"] == "up" for t in targets), states
wait_for("the target to be up", target_up)

# rate() over 1m needs a few samples
def enough_samples():
    r = get("/api/v1/query", query="count_over_time(trmx_up[1m])")["data"]["result"]
    n = int(float(r[0]["value"][1])) if r else 0
    return n >= 5, f"{n} samples"
wait_for("5 scrapes", enough_samples)

def rules_evaluated():
    groups = get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    # an unevaluated rule reports Go's zero time
    return bool(rules) and all(not r.get("lastEvaluation", "0001").startswith("0001") for r in rules), len(rules)
wait_for("the alert rules to be evaluated", rules_evaluated)

failed = []
groups = get("/api/v1/rules")["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
for r in rules:
    if r.get("health") != "ok":
        failed.append(f"rule {r['name']}: health {r.get('health')}: {r.get('lastError', '')}")
print(f"alert rules loaded and evaluated: {len(rules)}, firing on this target: "
      + (", ".join(sorted({r['name'] for r in rules if r.get('state') == 'firing'})) or "none"))

# every expr of the dashboard, with Grafana's variables replaced
subst = {"$__rate_interval": "1m", "$instance": ".+", "$recipient": ".+", "${DS_PROMETHEUS}": ""}
dashboard = json.load(open(os.environ["DASHBOARD"]))
def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))
queries = []
for p in panels(dashboard["panels"]):
    for t in p.get("targets", []):
        if t.get("expr"):
            queries.append((p["title"], t["expr"]))
if not queries:
    failed.append("the dashboard has no queries")
for title, expr in queries:
    q = expr
    for k, v in subst.items():
        q = q.replace(k, v)
    if "$" in q:
        failed.append(f"{title}: unresolved variable in {expr}")
        continue
    try:
        body = get("/api/v1/query", query=q)
    except urllib.error.HTTPError as e:
        failed.append(f"{title}: {q}: HTTP {e.code}: {e.read().decode(errors='replace')}")
        continue
    result = body["data"]["result"] if body.get("status") == "success" else []
    if body.get("status") != "success":
        failed.append(f"{title}: {q}: {body.get('error')}")
    elif not result:
        failed.append(f"{title}: {q}: no series")
    else:
        values = [s["value"][1] for s in result]
        print(f"ok  {len(result):2d} series  {title}: {q}  e.g. {values[0]}")
print(f"dashboard queries: {len(queries)}, failed: {len(failed)}")
for f in failed:
    print("FAIL " + f, file=sys.stderr)
sys.exit(1 if failed else 0)
PY
        echo "--- prometheus log" >&2
        cat "$tmp/prometheus.log" >&2
        die "scrape check failed"
    fi
    echo "scrape check passed"
}

check_demo() {
    need cargo python3
    make_tmp
    echo "== cargo build -p trmx-broker --example metrics_demo"
    (cd "$root" && cargo build --quiet -p trmx-broker --example metrics_demo)
    "$root/target/debug/examples/metrics_demo" 127.0.0.1:0 >"$tmp/demo.out" 2>"$tmp/demo.err" &
    pids+=("$!")
    local url="" waited=0
    while [[ -z "$url" ]]; do
        url="$(sed -n 's/^listening //p' "$tmp/demo.out")"
        if [[ -z "$url" ]]; then
            kill -0 "${pids[-1]}" 2>/dev/null || { cat "$tmp/demo.err" >&2; die "metrics_demo exited"; }
            ((waited += 1))
            ((waited < deadline_secs * 10)) || die "metrics_demo did not start"
            sleep 0.1
        fi
    done
    check_scrape "$url"
}

case "${1:-}" in
    rules) check_rules ;;
    scrape)
        [[ $# -eq 2 ]] || die "usage: ops/check.sh scrape <metrics-url>"
        check_scrape "$2" ;;
    demo) check_demo ;;
    all)
        check_rules
        check_demo ;;
    *)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2 ;;
esac
