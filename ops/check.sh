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
#   ops/check.sh broker              builds trmx-certs and trmx-demo, makes a throw-away federation,
#                                    runs the REAL broker (admin endpoint on a free loopback port)
#                                    and two real nodes, sends a referral through them until its
#                                    delivery receipt is acknowledged, then runs `scrape` against
#                                    the broker's /metrics (and checks /healthz and /readyz)
#   ops/check.sh demo                builds and runs the metrics_demo example (a stand-in admin
#                                    endpoint with synthetic traffic) and runs `scrape` against it
#   ops/check.sh all                 rules, then broker, then demo (each in its own process, so
#                                    each has its own Prometheus and scratch directory); what CI
#                                    runs, so that the metrics stand-in cannot drift from the
#                                    dashboard unseen
#
# A missing tool is a failure, never a skip. Needs Debian's `prometheus` package (promtool and
# prometheus), python3, and cargo for `broker` and `demo`.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
# where cargo puts what it builds (CARGO_TARGET_DIR when set)
target="${CARGO_TARGET_DIR:-$root/target}"
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
    "$target/debug/examples/metrics_demo" 127.0.0.1:0 >"$tmp/demo.out" 2>"$tmp/demo.err" &
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

# Waits until the file $1 exists and is not empty; fails if process $2 ($3) exits first.
wait_file() {
    local file="$1" pid="$2" what="$3" log="$4" waited=0
    until [[ -s "$file" ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            cat "$log" >&2
            die "$what exited before it was ready"
        fi
        ((waited += 1))
        ((waited < deadline_secs * 10)) || { cat "$log" >&2; die "$what did not become ready"; }
        sleep 0.1
    done
}

check_broker() {
    need cargo prometheus promtool python3
    make_tmp
    echo "== cargo build -p trmx-certs -p trmx-tests (trmx-certs, trmx-demo)"
    (cd "$root" && cargo build --quiet --locked -p trmx-certs --bin trmx-certs -p trmx-tests --bin trmx-demo)
    local certs="$target/debug/trmx-certs" demo="$target/debug/trmx-demo"
    local ca="$tmp/ca" td="trm.check" members=(NL-NRM BE-PAYOKE) id

    echo "== federation: CA, CRL, broker and node certificates"
    "$certs" init --dir "$ca" --trust-domain "$td" >/dev/null
    "$certs" issue broker --dir "$ca" --name check-1 --dns localhost --ip 127.0.0.1 --out "$ca/broker" >/dev/null
    for id in "${members[@]}"; do
        "$certs" issue node --dir "$ca" --participant "$id" --out "$ca/$id" >/dev/null
    done

    local admin_port
    admin_port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    mkdir -p "$tmp/broker"
    {
        printf 'listen = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:%s"\ndata_dir = "%s"\n\n' \
            "$admin_port" "$tmp/broker/data"
        printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\ncrl = "%s"\n\n' \
            "$ca/ca.pem" "$ca/broker.pem" "$ca/broker.key" "$ca/crl.pem"
        printf '[limits]\nmin_free_disk_bytes = "16MiB"\n\n[store]\ncache_capacity = "16MiB"\n\n'
        printf '[[participants]]\nid = "NL-NRM"\ndisplay_name = "Dutch NRM"\ncountry = "NL"\n'
        printf 'organisation_type = "nrm"\naccepts = ["referral", "referral-response", "follow-up"]\n\n'
        printf '[[participants]]\nid = "BE-PAYOKE"\ndisplay_name = "Payoke"\ncountry = "BE"\n'
        printf 'organisation_type = "ngo"\naccepts = ["referral", "referral-response", "follow-up"]\n'
    } >"$tmp/broker/broker.toml"

    echo "== broker (trmx-demo broker), admin endpoint 127.0.0.1:$admin_port"
    "$demo" broker --config "$tmp/broker/broker.toml" --ready-file "$tmp/broker/ready" \
        --log-level warn >"$tmp/broker/log" 2>&1 &
    pids+=("$!")
    wait_file "$tmp/broker/ready" "${pids[-1]}" broker "$tmp/broker/log"
    local broker_addr
    broker_addr="$(head -n 1 "$tmp/broker/ready")"
    echo "broker listening on $broker_addr"

    for id in "${members[@]}"; do
        mkdir -p "$tmp/$id"
        {
            printf 'participant = "%s"\ndata_dir = "%s"\n\n' "$id" "$tmp/$id/data"
            printf '[broker]\naddress = "%s"\nserver_name = "localhost"\n' "$broker_addr"
            printf 'reconnect_min_ms = 100\nreconnect_max_ms = 1000\n\n'
            printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n\n' "$ca/ca.pem" "$ca/$id.pem" "$ca/$id.key"
            printf '[api]\nsocket = "%s"\n' "$tmp/$id/node.sock"
        } >"$tmp/$id/node.toml"
        "$demo" node --config "$tmp/$id/node.toml" run --ready-file "$tmp/$id/ready" \
            >"$tmp/$id/log" 2>&1 &
        pids+=("$!")
        wait_file "$tmp/$id/ready" "${pids[-1]}" "node $id" "$tmp/$id/log"
    done
    echo "nodes running: ${members[*]}"

    echo "== traffic: NL-NRM sends a referral to BE-PAYOKE"
    "$demo" node --config "$tmp/NL-NRM/node.toml" send --to BE-PAYOKE --kind referral --new-case \
        "$root/proto/examples/01-referral.json" >"$tmp/sent" 2>"$tmp/send.err" \
        || { cat "$tmp/send.err" >&2; die "send failed"; }
    echo "message $(head -n 1 "$tmp/sent") queued"

    local metrics="http://127.0.0.1:$admin_port"
    if ! URL="$metrics" DEADLINE="$deadline_secs" python3 - <<'PY'; then
import os, sys, time, urllib.error, urllib.request

base = os.environ["URL"]
deadline = time.monotonic() + float(os.environ["DEADLINE"])

def get(path):
    try:
        with urllib.request.urlopen(base + path, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

for path in ("/healthz", "/readyz"):
    status, body = get(path)
    if status != 200:
        sys.exit(f"GET {path}: {status} {body!r}")
    print(f"ok  GET {path}: {status} {body.splitlines()[0]}")

def samples():
    _, text = get("/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out

# the referral is delivered and acknowledged, and its receipt back at the sender too
want = {
    'trmx_messages_accepted_total{kind="referral"}': 1,
    'trmx_messages_acknowledged_total{kind="referral"}': 1,
    'trmx_messages_acknowledged_total{kind="delivery-receipt"}': 1,
    'trmx_connected_participants': 2,
}
while True:
    s = samples()
    missing = {k: s.get(k) for k, v in want.items() if s.get(k, 0) < v}
    if not missing:
        break
    if time.monotonic() > deadline:
        sys.exit(f"traffic did not show in the broker's metrics: {missing}")
    time.sleep(0.2)
for k in want:
    print(f"ok  {k} = {s[k]:g}")
for k in ('trmx_queue_depth{recipient="BE-PAYOKE"}', 'trmx_submit_duration_seconds_count',
          'trmx_store_writable', 'trmx_crl_next_update_seconds'):
    print(f"ok  {k} = {s.get(k)}")
PY
        echo "--- broker log" >&2
        cat "$tmp/broker/log" >&2
        die "the broker's metrics did not follow the traffic"
    fi
    check_scrape "$metrics/metrics"
}

case "${1:-}" in
    rules) check_rules ;;
    scrape)
        [[ $# -eq 2 ]] || die "usage: ops/check.sh scrape <metrics-url>"
        check_scrape "$2" ;;
    broker) check_broker ;;
    demo) check_demo ;;
    all)
        "$0" rules
        "$0" broker
        "$0" demo ;;
    *)
        sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2 ;;
esac
