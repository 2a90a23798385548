//! The `trmx-node` binary: one clear line and a non-zero exit on failure,
//! tables and JSON on success, and `run` as a real process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use trmx_proto::pb;

use super::harness::{REFERRAL_JSON, Sandbox, eventually, referral_without};

fn trmx_node() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trmx-node"));
    command
        .env_remove("TRMX_NODE_SOCKET")
        .env_remove("TRMX_NODE_CONFIG")
        .env_remove("RUST_LOG");
    command
}

fn run(args: &[&str]) -> Output {
    trmx_node().args(args).output().expect("run trmx-node")
}

async fn run_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || trmx_node().args(&args).output().expect("run trmx-node"))
        .await
        .expect("join")
}

/// `trmx-node run --config CONFIG --ready-file READY`, its output piped.
fn spawn_run(config: &Path, ready: &Path) -> std::process::Child {
    trmx_node()
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--ready-file")
        .arg(ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn trmx-node run")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Exactly one line on stderr, nothing on stdout, a non-zero exit.
fn assert_one_line_failure(output: &Output) -> String {
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert_ne!(output.status.code(), Some(0));
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(output.stdout.is_empty(), "stdout: {:?}", stdout(output));
    err.trim_end().to_owned()
}

#[test]
fn an_unreachable_daemon_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    for args in [
        vec!["--socket", socket_arg, "status"],
        vec!["--socket", socket_arg, "outbox"],
        vec!["--socket", socket_arg, "watch", "--after", "3"],
    ] {
        let line = assert_one_line_failure(&run(&args));
        assert_eq!(
            line,
            format!("cannot reach the trmx node at {socket_arg}: is `trmx-node run` running?")
        );
    }
    // The socket can also come from the environment.
    let output = trmx_node()
        .env("TRMX_NODE_SOCKET", &socket)
        .arg("inbox")
        .output()
        .expect("run");
    let line = assert_one_line_failure(&output);
    assert!(line.starts_with("cannot reach the trmx node at "), "{line}");
}

#[test]
fn no_socket_and_no_config_is_one_clear_line() {
    let line = assert_one_line_failure(&run(&["status"]));
    assert!(line.contains("--socket"), "{line}");
}

#[test]
fn bad_files_are_one_clear_line_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let send = |file: &Path| {
        run(&[
            "--socket",
            socket_arg,
            "send",
            "--to",
            "BE-PAYOKE",
            "--kind",
            "referral",
            "--new-case",
            file.to_str().expect("utf-8 path"),
        ])
    };

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{ \"purpose\": ").expect("write");
    let line = assert_one_line_failure(&send(&broken));
    assert!(
        line.starts_with(&format!("{}: not valid JSON: ", broken.display())),
        "{line}"
    );

    let invalid = dir.path().join("referral.json");
    std::fs::write(&invalid, referral_without(&["person", "pseudonym"])).expect("write");
    let line = assert_one_line_failure(&send(&invalid));
    assert!(
        line.starts_with(&format!(
            "{}: referral.person.pseudonym: ",
            invalid.display()
        )),
        "{line}"
    );

    let missing = dir.path().join("absent.json");
    let line = assert_one_line_failure(&send(&missing));
    assert!(
        line.starts_with(&format!("{}: cannot read", missing.display())),
        "{line}"
    );
}

/// An error on a value the user typed names the flag it came with (`--to`, `--case`,
/// `--key`, `--with`), not the API field the node checks (`recipient`, `case_ref`, …),
/// and the rule says flags too; nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_flag_the_user_typed() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8").to_owned();
    let file = sandbox.write("referral.json", REFERRAL_JSON);
    let file = file.to_str().expect("utf-8").to_owned();
    let unknown_case = trmx_proto::CaseRef::new_random().to_string();
    let send = |extra: &[&str]| {
        let mut args = vec!["--socket", &socket, "send", "--kind", "referral"];
        args.extend_from_slice(extra);
        args.push(&file);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let cases = [
        (send(&["--to", "be-payoke", "--new-case"]), "--to: "),
        (send(&["--to", "NL-NRM", "--new-case"]), "--to: "),
        (send(&["--to", "BE-PAYOKE", "--case", "case-7"]), "--case: "),
        (
            send(&["--to", "BE-PAYOKE", "--case", &unknown_case]),
            "--case: names no case this node sent or received a message in; set --new-case to \
             open one",
        ),
        (
            send(&["--to", "BE-PAYOKE", "--new-case", "--key", "has space"]),
            "--key: ",
        ),
        (
            ["--socket", &socket, "outbox", "--with", "nope"]
                .map(str::to_owned)
                .to_vec(),
            "--with: ",
        ),
        (
            ["--socket", &socket, "inbox", "--case", "case-7"]
                .map(str::to_owned)
                .to_vec(),
            "--case: ",
        ),
    ];
    for (args, start) in cases {
        let line = assert_one_line_failure(&run_async(args.clone()).await);
        assert!(line.starts_with(start), "{args:?}: {line}");
    }
    let outbox = run_async(vec!["--socket".into(), socket.clone(), "outbox".into()]).await;
    assert_eq!(stdout(&outbox).lines().count(), 1, "{}", stdout(&outbox));
    node.stop().await.expect("stop");
}

/// `send --reply-to` needs no `--case` (the reply takes the case of the message it
/// answers), and refuses `--new-case`: a reply opens no case.
#[test]
fn a_reply_needs_no_case_and_opens_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let file = dir.path().join("response.json");
    std::fs::write(
        &file,
        include_str!("../../../proto/examples/02-referral-response.json"),
    )
    .expect("write");
    let id = trmx_proto::MessageId::new_v7().to_string();
    let send = |extra: &[&str]| {
        let mut args = vec![
            "--socket",
            socket_arg,
            "send",
            "--to",
            "NL-NRM",
            "--kind",
            "referral-response",
            "--reply-to",
            &id,
        ];
        args.extend_from_slice(extra);
        args.push(file.to_str().expect("utf-8 path"));
        run(&args)
    };
    // (accepted as typed: it goes on to look for the node)
    let line = assert_one_line_failure(&send(&[]));
    assert!(line.starts_with("cannot reach the trmx node at "), "{line}");

    let refused = send(&["--new-case"]);
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    let err = stderr(&refused);
    assert!(
        err.contains("--new-case") && err.contains("--reply-to"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_prints_the_message_id_once_and_tables_show_it() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8").to_owned();
    let file = sandbox.write("referral.json", REFERRAL_JSON);
    let send_args: Vec<String> = [
        "--socket",
        &socket,
        "send",
        "--to",
        "BE-PAYOKE",
        "--kind",
        "referral",
        "--new-case",
        "--urgent",
        file.to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();

    let first = run_async(send_args.clone()).await;
    assert!(first.status.success(), "stderr: {}", stderr(&first));
    let id = stdout(&first).trim().to_owned();
    trmx_proto::MessageId::parse(&id).expect("prints the message id");
    assert!(
        stderr(&first).contains("queued in case "),
        "{}",
        stderr(&first)
    );

    // Re-running the same command does not queue twice.
    let second = run_async(send_args).await;
    assert!(second.status.success(), "stderr: {}", stderr(&second));
    assert_eq!(stdout(&second).trim(), id);

    let outbox = run_async(vec!["--socket".into(), socket.clone(), "outbox".into()]).await;
    assert!(outbox.status.success(), "stderr: {}", stderr(&outbox));
    let text = stdout(&outbox);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("KIND"), "{text}");
    assert!(
        lines[1].starts_with("referral (urgent)  → BE-PAYOKE  queued"),
        "{text}"
    );
    assert!(lines[1].contains(&id), "{text}");

    let json = run_async(vec![
        "--socket".into(),
        socket.clone(),
        "--json".into(),
        "outbox".into(),
    ])
    .await;
    assert!(json.status.success());
    let entries: Vec<serde_json::Value> = stdout(&json)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["messageId"], id.as_str());
    assert_eq!(entries[0]["state"], "OUTBOX_STATE_QUEUED");
    let case_ref = entries[0]["caseRef"].as_str().expect("case").to_owned();

    let show = run_async(vec![
        "--socket".into(),
        socket.clone(),
        "show".into(),
        id.clone(),
    ])
    .await;
    assert!(show.status.success());
    assert!(stdout(&show).contains("NRM-2026-0117-A"));
    assert!(stdout(&show).contains("sent to"));

    let show_json = run_async(vec![
        "--socket".into(),
        socket.clone(),
        "--json".into(),
        "show".into(),
        id.clone(),
    ])
    .await;
    let value: serde_json::Value =
        serde_json::from_str(stdout(&show_json).trim()).expect("show --json");
    assert_eq!(value["body"]["person"]["pseudonym"], "NRM-2026-0117-A");

    let case = run_async(vec![
        "--socket".into(),
        socket.clone(),
        "case".into(),
        case_ref,
    ])
    .await;
    assert!(case.status.success());
    assert!(stdout(&case).contains("→ BE-PAYOKE"), "{}", stdout(&case));

    let status = run_async(vec!["--socket".into(), socket.clone(), "status".into()]).await;
    assert!(status.status.success());
    let text = stdout(&status);
    assert!(text.contains("participant  NL-NRM"), "{text}");
    assert!(text.contains("not connected"), "{text}");
    // (the broker's certificate is known from a handshake only)
    assert!(text.contains("broker cert  not seen yet"), "{text}");
    assert!(text.contains("1 queued"), "{text}");

    let unknown = trmx_proto::MessageId::new_v7().to_string();
    let missing = run_async(vec![
        "--socket".into(),
        socket.clone(),
        "show".into(),
        unknown.clone(),
    ])
    .await;
    let line = assert_one_line_failure(&missing);
    assert_eq!(line, format!("message {unknown} not found"));

    node.stop().await.expect("stop");
}

fn wait_for_file(path: &Path, deadline: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n')) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `case` shows the whole case, however many pages the node gives it in: a long case
/// came back in one answer, which could pass the gRPC message size. The CLI follows
/// `next_page_token` to the end (here in pages of 2, with `--page-size`), in the table
/// and in `--json`, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_shows_every_message_of_a_case_longer_than_a_page() {
    use trmx_proto::pb;
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8").to_owned();
    let mut client = trmx_node::connect_local(node.socket_path())
        .await
        .expect("connect");
    let send = |key: String, kind: pb::MessageKind, case_ref: &str, body: &str| pb::SendRequest {
        kind: kind as i32,
        recipient: "BE-PAYOKE".to_owned(),
        case_ref: case_ref.to_owned(),
        new_case: case_ref.is_empty(),
        priority: pb::Priority::Normal as i32,
        idempotency_key: key,
        body: Some(pb::send_request::Body::BodyJson(body.to_owned())),
        ..Default::default()
    };
    let first = client
        .send(send(
            "k-0".into(),
            pb::MessageKind::Referral,
            "",
            REFERRAL_JSON,
        ))
        .await
        .expect("send")
        .into_inner();
    let case_ref = first.case_ref.clone();
    let mut sent = vec![first.message_id];
    for i in 1..5 {
        let follow_up = include_str!("../../../proto/examples/03-follow-up-training.json");
        let response = client
            .send(send(
                format!("k-{i}"),
                pb::MessageKind::FollowUp,
                &case_ref,
                follow_up,
            ))
            .await
            .expect("send")
            .into_inner();
        sent.push(response.message_id);
    }
    // the order of the case as the node gives it (by creation time, then id)
    let timeline: Vec<String> = client
        .get_case(pb::GetCaseRequest {
            case_ref: case_ref.clone(),
            ..Default::default()
        })
        .await
        .expect("case")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.message_id)
        .collect();
    let mut listed = timeline.clone();
    listed.sort();
    sent.sort();
    assert_eq!(listed, sent);

    let case = |extra: &[&str]| {
        let mut args: Vec<String> = vec!["--socket".into(), socket.clone()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        run_async(args)
    };
    for page_size in ["2", "0"] {
        let output = case(&["case", &case_ref, "--page-size", page_size]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(rows.len(), 5, "{text}");
        for (row, id) in rows.iter().zip(&timeline) {
            assert!(row.contains(id.as_str()), "{id} not in {row}:\n{text}");
        }

        let output = case(&["--json", "case", &case_ref, "--page-size", page_size]).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let ids: Vec<String> = stdout(&output)
            .lines()
            .map(|line| {
                let entry: serde_json::Value =
                    serde_json::from_str(line).expect("one JSON object per line");
                entry["messageId"].as_str().expect("id").to_owned()
            })
            .collect();
        assert_eq!(ids, timeline, "page size {page_size}");
    }
    node.stop().await.expect("stop");
}

/// The sandbox's node config as a file, `participant` as given.
fn write_config(sandbox: &Sandbox, participant: &str) -> PathBuf {
    let c = &sandbox.config;
    let config = format!(
        r#"
participant = "{participant}"
data_dir = "data"
log_level = "warn"

[broker]
address = "{}"
server_name = "localhost"
reconnect_min_ms = 50
reconnect_max_ms = 200

[tls]
ca = "{}"
cert = "{}"
key = "{}"
"#,
        c.broker.address,
        c.tls.ca.display(),
        c.tls.cert.display(),
        c.tls.key.display()
    );
    sandbox.write(&format!("{participant}.toml"), &config)
}

/// The commented example config, with the files it names in place, passes `check-config`:
/// an operator who copies it and installs the certificates gets a node that starts.
#[test]
fn the_example_config_passes_check_config_with_its_files_in_place() {
    let sandbox = Sandbox::new();
    let c = &sandbox.config;
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("node.example.toml"))
            .expect("node.example.toml reads");
    let crl = c.tls.ca.with_file_name("crl.pem");
    let quoted = |path: &Path| format!("{:?}", path.display().to_string());
    let mut text = example.clone();
    for (from, to) in [
        ("\"/etc/trmx/ca.pem\"", quoted(&c.tls.ca)),
        ("\"/etc/trmx/NL-NRM.pem\"", quoted(&c.tls.cert)),
        ("\"/etc/trmx/NL-NRM.key\"", quoted(&c.tls.key)),
        ("\"/etc/trmx/crl.pem\"", quoted(&crl)),
        (
            "data_dir = \"/var/lib/trmx-node\"",
            format!("data_dir = {}", quoted(&sandbox.path().join("data"))),
        ),
    ] {
        assert!(
            text.contains(from),
            "node.example.toml no longer has {from}"
        );
        text = text.replace(from, &to);
    }
    let config_path = sandbox.write("example.toml", &text);
    let output = run(&[
        "--config",
        config_path.to_str().expect("utf-8"),
        "check-config",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("# config OK"),
        "{}",
        stdout(&output)
    );
}

/// `check-config` checks what `run` would, starts nothing, and says what it found.
#[test]
fn check_config_says_what_the_node_would_use_or_the_one_problem() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8");
    let output = run(&["--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("participant  NL-NRM\n"), "{text}");
    assert!(text.contains("days left)"), "{text}");
    assert!(
        text.contains(&format!("# config OK: {config_arg}")),
        "{text}"
    );
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    assert!(!sandbox.path().join("data").exists(), "nothing started");

    // another participant's config with this certificate
    let other = write_config(&sandbox, "BE-PAYOKE");
    let line = assert_one_line_failure(&run(&[
        "--config",
        other.to_str().expect("utf-8"),
        "check-config",
    ]));
    assert!(line.contains("which is for NL-NRM"), "{line}");

    // a key that is not the certificate's (a renewal copied half)
    let c = &sandbox.config;
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let stranger = trmx_certs::Federation::create(elsewhere.path(), "trmx.test")
        .and_then(|f| f.participant("NL-NRM"))
        .expect("another key");
    std::fs::copy(&stranger.key, &c.tls.key).expect("copy key");
    let line = assert_one_line_failure(&run(&["--config", config_arg, "check-config"]));
    assert!(line.contains(&c.tls.key.display().to_string()), "{line}");

    let line = assert_one_line_failure(&run(&["check-config"]));
    assert!(line.contains("--config"), "{line}");
}

/// `check-config` shows every limit and interval the node would run with, by its config
/// key: those set in the file and the defaults of those left out (the local API's
/// connection and `Watch` caps were missing, so an operator could not see them).
#[test]
fn check_config_shows_the_limits_in_effect() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let text = std::fs::read_to_string(&config_path).expect("read config");
    std::fs::write(
        &config_path,
        format!("{text}\n[api]\nmax_connections = 7\nmax_watch_streams = 9\n"),
    )
    .expect("write config");
    let config_arg = config_path.to_str().expect("utf-8");
    let expected = [
        ("broker.max_in_flight", 32),
        ("broker.reconnect_min_ms", 50),
        ("broker.reconnect_max_ms", 200),
        ("broker.message_lifetime_hours", 720),
        ("broker.outbox_check_interval_secs", 600),
        ("broker.redrive_watch_secs", 2_592_000),
        ("broker.submit_answer_timeout_secs", 300),
        ("api.max_connections", 7),
        ("api.max_watch_streams", 9),
        ("storage.cache_capacity_mb", 64),
        ("storage.retention_check_interval_secs", 3600),
        ("storage.max_clock_step_secs", 60),
        ("storage.max_downtime_secs", 604_800),
    ];

    let output = run(&["--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let shown: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.starts_with("# limits"))
        .skip(1)
        .take_while(|line| !line.starts_with('#'))
        .collect();
    let wanted: Vec<String> = expected
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect();
    assert_eq!(shown, wanted, "{text}");
    assert!(text.contains("\nlog level    warn\n"), "{text}");
    assert!(
        text.ends_with(&format!("# config OK: {config_arg}\n")),
        "{text}"
    );

    let output = run(&["--json", "--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("one object");
    let limits = report["limits"].as_object().expect("limits");
    assert_eq!(limits.len(), expected.len(), "{report}");
    for (key, value) in expected {
        assert_eq!(limits[key], value, "{key}: {report}");
    }
    assert_eq!(report["logLevel"], "warn");
}

/// What `run` would fail on later is caught too: a data directory that is a file, and a
/// certificate that has expired (which `run` accepts, to serve the store, but with which
/// the node reaches no broker) or expires soon (a warning), or is not valid yet.
#[test]
fn check_config_refuses_a_data_dir_that_is_a_file_and_an_expired_certificate() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8");
    sandbox.write("data", "not a directory");
    let line = assert_one_line_failure(&run(&["--config", config_arg, "check-config"]));
    assert!(line.starts_with("data_dir: "), "{line}");
    assert!(line.contains("is not a directory"), "{line}");
    std::fs::remove_file(sandbox.path().join("data")).expect("remove");

    let ca = trmx_certs::Ca::open(&sandbox.path().join("pki").join("ca")).expect("ca");
    let c = &sandbox.config;
    let paths = trmx_certs::CertPaths {
        cert: c.tls.cert.clone(),
        key: c.tls.key.clone(),
    };
    let issue = |issued_days_ago: u64, validity_days: u32| {
        let spec = trmx_certs::IssueSpec {
            validity_days,
            ..trmx_certs::IssueSpec::participant("NL-NRM")
        };
        let at = std::time::SystemTime::now() - Duration::from_secs(issued_days_ago * 86_400);
        ca.issue_at(&spec, &paths, true, at).expect("issue");
    };
    issue(0, 10);
    let output = run(&["--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).starts_with("warning: tls.cert: "),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).contains("# config OK"));
    // --json: one object, with the warning in it
    let output = run(&["--json", "--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("one object");
    assert_eq!(report["ok"], true);
    assert_eq!(report["participant"], "NL-NRM");
    assert!(report["certificate"]["daysLeft"].as_u64().expect("days") < 10);
    let warnings = report["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{report}");
    assert!(warnings[0].as_str().expect("text").contains("renew it"));
    issue(20, 10);
    let line = assert_one_line_failure(&run(&["--config", config_arg, "check-config"]));
    assert!(line.contains("expired"), "{line}");
    let output = run(&["--json", "--config", config_arg, "check-config"]);
    assert!(stdout(&output).is_empty(), "no report of a failed check");
    assert!(assert_one_line_failure(&output).contains("expired"));

    // Not valid yet by this clock passed in silence, though the broker refuses it when the
    // CA machine's clock was ahead at issue. Which clock is off cannot be told: both are
    // named; hours fail the check, minutes warn.
    let issue_ahead = |ahead: Duration| {
        let spec = trmx_certs::IssueSpec::participant("NL-NRM");
        let at = std::time::SystemTime::now() + ahead;
        ca.issue_at(&spec, &paths, true, at).expect("issue")
    };
    let info = issue_ahead(Duration::from_secs(2 * 3600));
    let line = assert_one_line_failure(&run(&["--config", config_arg, "check-config"]));
    assert!(
        line.starts_with(&format!(
            "tls.cert: {}: it is not valid before {}, and this machine's clock says ",
            c.tls.cert.display(),
            trmx_certs::format_time(info.not_before)
        )),
        "{line}"
    );
    assert!(
        line.contains(
            "either this clock is behind (the certificate is valid for the broker with a right \
             clock, "
        ),
        "{line}"
    );
    assert!(
        line.contains(
            "or the CA machine's clock was ahead when it issued the certificate (the broker \
             would refuse it until "
        ),
        "{line}"
    );
    issue_ahead(Duration::from_secs(8 * 60));
    let output = run(&["--json", "--config", config_arg, "check-config"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("one object");
    let warnings = report["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{report}");
    assert!(
        warnings[0]
            .as_str()
            .expect("text")
            .contains("minute(s) earlier: either this clock is behind"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_until_sigterm() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let ready: PathBuf = sandbox.path().join("ready");
    let mut child = spawn_run(&config_path, &ready);
    let ready_path = ready.clone();
    let is_ready =
        tokio::task::spawn_blocking(move || wait_for_file(&ready_path, Duration::from_secs(20)))
            .await
            .expect("join");
    if !is_ready {
        let _ = child.kill();
        let output = child.wait_with_output().expect("output");
        panic!("node did not become ready: {}", stderr(&output));
    }
    let socket = std::fs::read_to_string(&ready)
        .expect("ready file")
        .trim()
        .to_owned();
    assert_eq!(Path::new(&socket), sandbox.path().join("data/node.sock"));

    // The client finds the socket through the config file.
    let status = run_async(vec![
        "--config".into(),
        config_path.to_str().expect("utf-8").into(),
        "status".into(),
    ])
    .await;
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(stdout(&status).contains("NL-NRM"));

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().expect("wait"))
        .await
        .expect("join");
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        stderr(&output)
    );
    assert!(stdout(&output).starts_with("trmx-node ready: participant NL-NRM socket "));
    let socket_path = PathBuf::from(socket);
    eventually("socket removed", Duration::from_secs(1), || {
        std::fs::symlink_metadata(&socket_path).is_err()
    })
    .await;
}

/// A supervisor may stop the node the moment its ready file is there (`systemctl stop`
/// right after the start): the node installed its SIGTERM handler only after writing the
/// file, and a SIGTERM in between killed it (no orderly stop, exit by signal). Its
/// handlers are in place before the file is written.
#[test]
fn a_sigterm_as_the_ready_file_is_written_stops_the_node_in_order() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let ready = sandbox.path().join("ready");
    // The ready file is written as `ready.tmp`, then renamed. Made a FIFO whose buffer is
    // full, it holds the node in that write, its start done, until this test empties it:
    // the SIGTERM sent then comes between the start and the ready file.
    let fifo = sandbox.path().join("ready.tmp");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let fifo = fifo.canonicalize().expect("canonical fifo path");
    let nonblocking = rustix::fs::OFlags::NONBLOCK.bits() as i32;
    let mut pipe = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nonblocking)
        .open(&fifo)
        .expect("open the fifo");
    loop {
        match pipe.write(&[0; 4096]) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the fifo: {e}"),
        }
    }
    let mut child = spawn_run(&config_path, &ready);
    let failed = |mut child: std::process::Child, what: &str| -> ! {
        let _ = child.kill();
        let output = child.wait_with_output().expect("output");
        panic!("{what}: {:?}: {}", output.status, stderr(&output));
    };
    // (in its write of the ready file once the FIFO is among its open files)
    let fds = PathBuf::from(format!("/proc/{}/fd", child.id()));
    let writing = || {
        std::fs::read_dir(&fds).is_ok_and(|dir| {
            dir.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|to| to == fifo))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !writing() {
        if child.try_wait().expect("try_wait").is_some() || std::time::Instant::now() > deadline {
            failed(child, "the node did not write its ready file");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // emptied, the FIFO lets the node write: it is ready, then stops
    let mut read = Vec::new();
    let status = loop {
        let mut buf = [0; 4096];
        match pipe.read(&mut buf) {
            Ok(n) => read.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                if std::time::Instant::now() > deadline {
                    failed(child, "the node did not stop");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reading the fifo: {e}"),
        }
    };
    let output = child.wait_with_output().expect("output");
    assert!(status.success(), "exit {status:?}: {}", stderr(&output));
    assert!(
        stdout(&output).starts_with("trmx-node ready: participant NL-NRM socket "),
        "{}",
        stdout(&output)
    );
    assert!(read.ends_with(b"node.sock\n"), "the ready file written");
}

/// A SIGTERM while the node starts (a supervisor's stop during a long start) ends it in
/// order, before it is ready: it exits 0 and writes no ready file, not killed by the
/// signal.
#[test]
fn a_sigterm_while_the_node_starts_stops_it_in_order() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config = std::fs::read(&config_path).expect("read the config");
    // Its config file made a FIFO holds the node in its start (reading it) until this
    // test writes the config into it.
    std::fs::remove_file(&config_path).expect("remove the config");
    let made = Command::new("mkfifo")
        .arg(&config_path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let ready = sandbox.path().join("ready");
    let mut child = spawn_run(&config_path, &ready);
    let nonblocking = rustix::fs::OFlags::NONBLOCK.bits() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // (a FIFO opens for writing without blocking once a reader has it open: the node,
    // reading its config)
    let mut pipe = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nonblocking)
            .open(&config_path)
        {
            Ok(pipe) => break pipe,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => {
                let ended = child.try_wait().expect("try_wait");
                if ended.is_some() || std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let output = child.wait_with_output().expect("output");
                    panic!("the node never read its config: {}", stderr(&output));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("opening the config FIFO: {e}"),
        }
    };
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // (a node the signal killed has closed the FIFO: its exit status says so below)
    let _ = pipe.write_all(&config);
    drop(pipe);
    let output = child.wait_with_output().expect("output");
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        stderr(&output)
    );
    assert!(output.stdout.is_empty(), "stdout: {}", stdout(&output));
    assert!(!ready.exists(), "a ready file was written");
}

/// The same `send` run again returns the message of the first run (its default key is
/// the same): while that one is on its way it says so; once it was withdrawn (or
/// failed) it says that nothing was sent now, how to send it again, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_again_says_what_became_of_the_first_message() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8").to_owned();
    let file = sandbox.write("referral.json", REFERRAL_JSON);
    let file = file.to_str().expect("utf-8");
    let send: Vec<String> = [
        "--socket",
        &socket,
        "send",
        "--to",
        "BE-PAYOKE",
        "--kind",
        "referral",
        "--new-case",
        file,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let first = run_async(send.clone()).await;
    assert!(first.status.success(), "stderr: {}", stderr(&first));
    let id = stdout(&first).trim().to_owned();
    assert!(
        stderr(&first).contains("queued in case"),
        "{}",
        stderr(&first)
    );

    let withdraw = ["--socket", &socket, "withdraw", &id].map(str::to_owned);
    let withdrawn = run_async(withdraw.to_vec()).await;
    assert!(withdrawn.status.success(), "stderr: {}", stderr(&withdrawn));
    assert_eq!(stdout(&withdrawn), format!("withdrew {id}\n"));

    let again = run_async(send).await;
    let line = assert_one_line_failure(&again);
    assert!(line.contains(&id), "the first message's id: {line}");
    assert!(line.contains("is withdrawn"), "{line}");
    assert!(line.contains("nothing was sent now"), "{line}");
    assert!(line.contains("--key"), "{line}");
    node.stop().await.expect("stop");
}

/// The same file sent again as urgent is another message, not a conflict with the first
/// one's default key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_file_sent_again_as_urgent_is_another_message() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8").to_owned();
    let file = sandbox.write("referral.json", REFERRAL_JSON);
    let file = file.to_str().expect("utf-8");
    let send = |urgent: bool| {
        let mut args = vec![
            "--socket",
            &socket,
            "send",
            "--to",
            "BE-PAYOKE",
            "--kind",
            "referral",
            "--new-case",
        ];
        if urgent {
            args.push("--urgent");
        }
        args.push(file);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let first = run_async(send(false)).await;
    assert!(first.status.success(), "stderr: {}", stderr(&first));
    let urgent = run_async(send(true)).await;
    assert!(urgent.status.success(), "stderr: {}", stderr(&urgent));
    assert!(
        stderr(&urgent).contains("queued in case"),
        "{}",
        stderr(&urgent)
    );
    assert_ne!(stdout(&first), stdout(&urgent), "two messages");
    node.stop().await.expect("stop");
}

/// `accept-clock` records the system clock as the store's last run, for a node that
/// refuses to start on a clock far from it; it needs the config, and a stopped node.
#[tokio::test]
async fn accept_clock_records_the_clock_for_a_stopped_node() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8").to_owned();
    let mut node_config = sandbox.config.clone();
    node_config.data_dir = sandbox.path().join("data");
    let node = trmx_node::RunningNode::start(
        &node_config,
        std::sync::Arc::new(trmx_node::core::ManualClock::new(
            std::time::SystemTime::now(),
        )),
    )
    .await
    .expect("node starts");
    // while the node runs, it holds its store
    let args = vec![
        "--config".to_owned(),
        config_arg.clone(),
        "accept-clock".to_owned(),
    ];
    let line = assert_one_line_failure(&run_async(args.clone()).await);
    assert!(line.contains("the node must be stopped"), "{line}");
    node.stop().await.expect("stop");

    // (the stopped node's last tasks may still be letting go of the store: in a real
    // stop, the process has exited)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let output = loop {
        let output = run_async(args.clone()).await;
        if output.status.success() || std::time::Instant::now() > deadline {
            break output;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("the node starts with this clock"), "{text}");
    assert!(
        !text.contains("it was nothing"),
        "the start recorded its time: {text}"
    );

    let line = assert_one_line_failure(&run(&["accept-clock"]));
    assert!(line.contains("--config"), "{line}");
    // a data_dir with no store in it: none is made
    let elsewhere = sandbox.write(
        "elsewhere.toml",
        &std::fs::read_to_string(&config_path)
            .expect("read")
            .replace("data_dir = \"data\"", "data_dir = \"nothing-here\""),
    );
    let line = assert_one_line_failure(&run(&[
        "--config",
        elsewhere.to_str().expect("utf-8"),
        "accept-clock",
    ]));
    assert!(line.contains("no node store in"), "{line}");
    assert!(
        !sandbox.path().join("nothing-here").exists(),
        "no store made"
    );
}

/// A file's contents and modification time.
type FileState = (Vec<u8>, std::time::SystemTime);

/// Every file under `dir`, with its contents and modification time (not the directories).
fn files_in(dir: &Path) -> std::collections::BTreeMap<PathBuf, FileState> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        if meta.is_dir() {
            out.extend(files_in(&path));
        } else if meta.is_file() {
            let contents = std::fs::read(&path).expect("read");
            out.insert(path, (contents, meta.modified().expect("mtime")));
        }
    }
    out
}

/// Runs `trmx-node --config <config> accept-clock` once the stopped node's store is free
/// (the stopped node's last tasks may still be letting go of it: in a real stop, the
/// process has exited).
async fn accept_clock_cli(config: &Path) -> Output {
    let args = vec![
        "--config".to_owned(),
        config.to_str().expect("utf-8").to_owned(),
        "accept-clock".to_owned(),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = run_async(args.clone()).await;
        if output.status.success() || std::time::Instant::now() > deadline {
            return output;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records `at` as the last run of the stopped node on `data_dir`, in its store and in its
/// last-run file, as a node that ran then would have.
async fn ran_at(data_dir: &Path, at: std::time::SystemTime) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = trmx_node::core::accept_clock(data_dir, at) {
        // (the store's lock, as above)
        assert!(std::time::Instant::now() < deadline, "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trmx_node::core::last_run::write(data_dir, trmx_proto::time::to_millis(at))
        .expect("last-run file");
}

/// `check-config` said "config OK" for a config whose start the node then refused for a
/// system clock that had jumped while it was down. It makes the start's clock check: the
/// start's refusal (and a failure) for a clock too far from the last run, the start's
/// warning for one behind, OK otherwise, and says when there is no store yet, in text and
/// in `--json`. It reads the last run from the node's last-run file, never from the store:
/// it changes no file of the store, and checks beside a running node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_makes_the_clock_check_of_a_start() {
    const DAY: Duration = Duration::from_secs(86_400);
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8").to_owned();
    let data_dir = sandbox.path().join("data");
    let check = |json: bool| {
        let mut args = vec!["--config".to_owned(), config_arg.clone()];
        if json {
            args.push("--json".to_owned());
        }
        args.push("check-config".to_owned());
        run_async(args)
    };
    let report = |output: &Output| -> serde_json::Value {
        assert!(output.status.success(), "{}", stderr(output));
        serde_json::from_str(&stdout(output)).expect("one object")
    };

    // no store yet
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(
            "\n# clock: first start: no store in data_dir yet (the node records its time there)\n"
        ),
        "{}",
        stdout(&output)
    );
    assert_eq!(report(&check(true).await)["clock"]["status"], "firstStart");
    assert!(!data_dir.exists(), "check-config made the data directory");

    // a running node holds the store: checked all the same
    let node = sandbox.start().await;
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("\n# clock: OK: the system clock reads "),
        "{}",
        stdout(&output)
    );
    let clock = &report(&check(true).await)["clock"];
    assert_eq!(clock["status"], "ok", "{clock}");
    assert!(clock["lastRun"].is_string(), "{clock}");
    node.stop().await.expect("stop");

    // the node stopped
    let before = files_in(&data_dir);
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("\n# clock: OK: the system clock reads "),
        "{}",
        stdout(&output)
    );
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    assert_eq!(files_in(&data_dir), before, "the store's files changed");

    // a clock ten days after the last run: refused as the start refuses it, changing nothing
    ran_at(&data_dir, std::time::SystemTime::now() - 10 * DAY).await;
    let before = files_in(&data_dir);
    let line = assert_one_line_failure(&check(false).await);
    let json_line = assert_one_line_failure(&check(true).await);
    assert_eq!(files_in(&data_dir), before, "the store's files changed");
    // (the start reads the store)
    let refused = match trmx_node::RunningNode::start(
        &sandbox.config,
        std::sync::Arc::new(trmx_node::core::ManualClock::new(
            std::time::SystemTime::now(),
        )),
    )
    .await
    {
        Err(trmx_node::core::NodeError::ClockJump(refused)) => refused,
        Err(other) => panic!("the start failed otherwise: {other}"),
        Ok(_) => panic!("the node started"),
    };
    for part in [
        "clock: the system clock reads ",
        "10.0 days after the last time the node ran on this store",
        "more than storage.max_downtime_secs (604800)",
        "run `trmx-node --config <its config> accept-clock` once as the node's user",
    ] {
        assert!(line.contains(part), "{part:?} in {line}");
        assert!(json_line.contains(part), "{part:?} in {json_line}");
        assert!(
            format!("clock: {refused}").contains(part),
            "{part:?} in {refused}"
        );
    }

    // a clock three hours behind the last run: the start's warning, and OK
    ran_at(
        &data_dir,
        std::time::SystemTime::now() + Duration::from_secs(3 * 3600),
    )
    .await;
    let before = files_in(&data_dir);
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let warning = "warning: clock: the system clock is behind the last time the node ran on \
                   this store: what it scheduled before comes that much later (behind: ";
    assert!(stderr(&output).starts_with(warning), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("\n# clock: OK, with the warning above: the system clock reads "),
        "{}",
        stdout(&output)
    );
    assert!(
        stdout(&output).contains("before the last run of a node on this store"),
        "{}",
        stdout(&output)
    );
    let json = report(&check(true).await);
    assert_eq!(json["clock"]["status"], "behind", "{json}");
    let warnings = json["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 1, "{json}");
    let said = warnings[0].as_str().expect("text");
    assert!(
        said.starts_with(warning.trim_start_matches("warning: ")),
        "{json}"
    );
    assert_eq!(files_in(&data_dir), before, "the store's files changed");
}

/// A system clock that jumped ahead while the node was down also makes its certificate
/// look expired. The start refuses for the clock, and `check-config` must say the same
/// (not send the operator to renew a certificate that is fine): the clock first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_a_clock_jump_before_the_certificate_it_makes_look_expired() {
    const DAY: Duration = Duration::from_secs(86_400);
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8").to_owned();
    let data_dir = sandbox.path().join("data");
    let node = sandbox.start().await;
    node.stop().await.expect("stop");
    // the node last ran 30 days before the clock; its certificate, good for 20 days from
    // then, looks expired since 10 days
    let last_run = std::time::SystemTime::now() - 30 * DAY;
    ran_at(&data_dir, last_run).await;
    let ca = trmx_certs::Ca::open(&sandbox.path().join("pki").join("ca")).expect("ca");
    let spec = trmx_certs::IssueSpec {
        validity_days: 20,
        ..trmx_certs::IssueSpec::participant("NL-NRM")
    };
    let paths = trmx_certs::CertPaths {
        cert: sandbox.config.tls.cert.clone(),
        key: sandbox.config.tls.key.clone(),
    };
    ca.issue_at(&spec, &paths, true, last_run).expect("issue");

    let refused = match trmx_node::RunningNode::start(
        &sandbox.config,
        std::sync::Arc::new(trmx_node::core::ManualClock::new(
            std::time::SystemTime::now(),
        )),
    )
    .await
    {
        Err(trmx_node::core::NodeError::ClockJump(refused)) => refused,
        Err(other) => panic!("the start failed otherwise: {other}"),
        Ok(_) => panic!("the node started"),
    };
    assert!(refused.contains("30.0 days after"), "{refused}");
    for json in [false, true] {
        let mut args = vec!["--config".to_owned(), config_arg.clone()];
        if json {
            args.push("--json".to_owned());
        }
        args.push("check-config".to_owned());
        let line = assert_one_line_failure(&run_async(args).await);
        assert!(
            line.contains("clock: the system clock reads ") && line.contains("30.0 days after"),
            "check-config said {line:?}, the start {refused:?}"
        );
    }
}

/// The last-run file is what check-config checks the clock against, and the store stays
/// the start's truth: a store without the file (last run by an older node) or with a
/// damaged one is "not checked", saying why and what writes the file, never a refusal or
/// a failure (the start checks the store). A file left behind without a store is a first
/// start, as the start sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_without_a_readable_last_run_file_does_not_check_the_clock() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let config_arg = config_path.to_str().expect("utf-8").to_owned();
    let data_dir = sandbox.path().join("data");
    sandbox.start().await.stop().await.expect("stop");
    let file = trmx_node::core::last_run::path(&data_dir);
    let check = |json: bool| {
        let mut args = vec!["--config".to_owned(), config_arg.clone()];
        if json {
            args.push("--json".to_owned());
        }
        args.push("check-config".to_owned());
        run_async(args)
    };

    // a store an older node ran on
    std::fs::remove_file(&file).expect("remove");
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    for part in [
        "\n# clock: not checked: the store in data_dir has no last-run.json beside it",
        "the node writes it at start and every minute",
        "the node checks the clock against its store when it starts\n# config OK",
    ] {
        assert!(
            stdout(&output).contains(part),
            "{part:?} in {}",
            stdout(&output)
        );
    }
    let output = check(true).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).expect("one object");
    assert_eq!(report["clock"]["status"], "notChecked", "{report}");
    assert_eq!(report["ok"], true, "{report}");

    // a damaged file
    std::fs::write(&file, "{\"format\": 1, \"last_run_ms\": \"soon\"").expect("write");
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    for part in [
        format!("\n# clock: not checked: {} is damaged: ", file.display()),
        "the node checks the clock against its store when it starts".to_owned(),
    ] {
        assert!(
            stdout(&output).contains(&part),
            "{part:?} in {}",
            stdout(&output)
        );
    }

    // a file without a store (the store was removed, the file left behind)
    std::fs::rename(&data_dir, sandbox.path().join("store-removed")).expect("rename");
    std::fs::create_dir(&data_dir).expect("mkdir");
    trmx_node::core::last_run::write(&data_dir, 0).expect("write");
    let output = check(false).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("\n# clock: first start"),
        "{}",
        stdout(&output)
    );
}

/// `check-config` makes the clock check of a start from `last-run.json` in the data
/// directory, never from the store: the file must hold what the store holds. The node
/// writes there, private to its user, the instant it records in its store at start, and
/// `accept-clock` the clock it accepts (else check-config would refuse the clock that the
/// start now accepts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_run_file_is_written_at_start_and_follows_accept_clock() {
    use std::os::unix::fs::PermissionsExt as _;
    use trmx_node::core::last_run::{self, LastRun};
    use trmx_proto::time::{from_millis, to_millis};

    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let data_dir = sandbox.path().join("data");
    // (an hour behind: what accept-clock records later is the system clock's time)
    let started = std::time::SystemTime::now() - Duration::from_secs(3600);
    let node = trmx_node::RunningNode::start(
        &sandbox.config,
        std::sync::Arc::new(trmx_node::core::ManualClock::new(started)),
    )
    .await
    .expect("node starts");
    assert_eq!(last_run::read(&data_dir), LastRun::At(to_millis(started)));
    let mode = std::fs::metadata(last_run::path(&data_dir))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    node.stop().await.expect("stop");

    let earliest = to_millis(std::time::SystemTime::now());
    let output = accept_clock_cli(&config_path).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).is_empty(), "{}", stderr(&output));
    let latest = to_millis(std::time::SystemTime::now());
    let LastRun::At(accepted) = last_run::read(&data_dir) else {
        panic!("no last run: {:?}", last_run::read(&data_dir));
    };
    assert!((earliest..=latest).contains(&accepted), "{accepted}");
    // the store recorded the same instant (to the second that accept-clock shows)
    let output = accept_clock_cli(&config_path).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let recorded = trmx_certs::format_time(from_millis(accepted));
    assert!(
        stdout(&output).contains(&format!("(it was {recorded})")),
        "{recorded}: {}",
        stdout(&output)
    );
}

/// The socket is the node's user's only (mode 0600): another user is told so and how
/// to run the command, not asked whether the node runs (it may well). Run as root, the
/// command is run as `nobody`.
#[test]
fn a_socket_of_another_user_says_to_run_as_the_nodes_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let output = if root {
        // (nobody cannot enter the temp dir, mode 0700: the same refusal)
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_trmx-node"))
            .args(["--socket", socket_arg, "status"])
            .env_remove("TRMX_NODE_SOCKET")
            .env_remove("TRMX_NODE_CONFIG")
            .output()
            .expect("setpriv runs (util-linux)")
    } else {
        run(&["--socket", socket_arg, "status"])
    };
    let line = assert_one_line_failure(&output);
    assert_eq!(
        line,
        format!(
            "cannot reach the trmx node at {socket_arg}: permission denied (only the node's \
             OS user may open its socket): run the command as that user, e.g. `sudo -u trmx \
             trmx-node …`"
        )
    );
}

/// A `--socket` path longer than a Unix socket path can be is said so, with the limit,
/// not with the system's "path must be shorter than SUN_LEN" and a question whether
/// the node runs.
#[test]
fn a_socket_path_too_long_is_said_so() {
    let socket = format!("/tmp/{}/node.sock", "d".repeat(110));
    let line = assert_one_line_failure(&run(&["--socket", &socket, "status"]));
    assert_eq!(
        line,
        format!(
            "cannot reach the trmx node at {socket}: the path is {} bytes long, and a Unix \
             socket path holds at most 107, so no node listens there: check --socket (or \
             TRMX_NODE_SOCKET), or use --config",
            socket.len()
        )
    );
}

/// A wrong file given to `send` (far larger than any document) is refused with its
/// name before anything is sent, not read into memory whole nor sent to come back as
/// "h2 protocol error"; the outbox stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_too_large_for_a_document_is_refused_with_its_name() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    // (a valid referral, padded past the local API's 16 MiB request limit)
    let padded = format!("{}{REFERRAL_JSON}", " ".repeat(17 * 1024 * 1024));
    let big = sandbox.write("big.json", &padded);
    for file in [big.to_str().expect("utf-8 path"), "/dev/zero"] {
        let output = run_async(
            [
                "--socket",
                &socket,
                "send",
                "--to",
                "BE-PAYOKE",
                "--kind",
                "referral",
                "--new-case",
                file,
            ]
            .map(str::to_owned)
            .to_vec(),
        )
        .await;
        let line = assert_one_line_failure(&output);
        assert_eq!(
            line,
            format!(
                "{file}: is larger than 16711680 bytes (15.94 MiB), the most a document can \
                 be (its attachments hold at most 2 MiB): is it the right file?"
            )
        );
    }
    let output = run_async(
        ["--socket", &socket, "--json", "outbox"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).is_empty(), "nothing was queued");
    node.stop().await.expect("stop");
}

/// `case` with a reference this node never saw (a typo, or an id of another kind) fails
/// like `show` of an unknown id, with what to check, in both forms: it does not read as
/// an empty case to a script (exit 0, no output) or to a caseworker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_of_an_unknown_reference_fails_with_what_to_check() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    let unknown = trmx_proto::CaseRef::new_random().to_string();
    for json in [false, true] {
        let mut args = vec!["--socket", socket.as_str(), "case", unknown.as_str()];
        if json {
            args.insert(0, "--json");
        }
        let output = run_async(args.into_iter().map(str::to_owned).collect()).await;
        let line = assert_one_line_failure(&output);
        assert_eq!(
            line,
            format!(
                "case {unknown}: this node has sent or received no message in it: check the \
                 reference (`trmx-node outbox` and `trmx-node inbox` show the case of each \
                 message)"
            )
        );
    }
    node.stop().await.expect("stop");
}

/// The node's answers name its request fields; the CLI user typed flags. A `--key` used
/// for another document says how to send this one, and a `watch --after` cursor past
/// the inbox names `--after`, not `after_seq`; nothing is queued by either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_key_and_a_cursor_from_elsewhere_say_what_to_type() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    let first = sandbox.write("first.json", REFERRAL_JSON);
    let other = sandbox.write(
        "other.json",
        &REFERRAL_JSON.replace("NRM-2026-0117-A", "NRM-2026-0118-B"),
    );
    let send = |file: &Path| {
        [
            "--socket",
            &socket,
            "send",
            "--to",
            "BE-PAYOKE",
            "--kind",
            "referral",
            "--new-case",
            "--key",
            "case-17",
            file.to_str().expect("utf-8 path"),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let output = run_async(send(&first)).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let line = assert_one_line_failure(&run_async(send(&other)).await);
    assert_eq!(
        line,
        "idempotency key case-17 was used for a different message: to send this document \
         as a new message, pass another --key"
    );

    let watch = ["--socket", &socket, "watch", "--after", "5"]
        .map(str::to_owned)
        .to_vec();
    let line = assert_one_line_failure(&run_async(watch).await);
    assert!(
        line.starts_with("--after 5 is past the last inbox seq"),
        "{line}"
    );
    assert!(line.ends_with("e.g. with --after 0"), "{line}");
    assert!(!line.contains("after_seq"), "{line}");

    let outbox = run_async(
        ["--socket", &socket, "--json", "outbox"]
            .map(str::to_owned)
            .to_vec(),
    )
    .await;
    assert_eq!(
        stdout(&outbox).lines().count(),
        1,
        "only the first was queued"
    );
    node.stop().await.expect("stop");
}

/// A malformed id or case reference given to `show`, `withdraw` or `case` names the
/// argument the user typed (as in the usage line), not the API's request field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_argument_names_the_argument() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    for (command, expected) in [
        ("show", "<ID>: must be a lower-case hyphenated UUID"),
        ("withdraw", "<ID>: must be a lower-case hyphenated UUID"),
        ("case", "<CASE>: must be a lower-case hyphenated UUID"),
    ] {
        let args = ["--socket", &socket, command, "NRM-2026-0117-A"]
            .map(str::to_owned)
            .to_vec();
        let line = assert_one_line_failure(&run_async(args).await);
        assert_eq!(line, expected, "{command}");
    }
    node.stop().await.expect("stop");
}

/// A node that is stuck or stopped (SIGSTOP) still has its connections accepted by the
/// kernel: a command must not wait for it for ever, and must say what to look at.
#[test]
fn a_node_that_never_answers_is_given_up_after_the_timeout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    // (accepts, never speaks: as the kernel does for a stopped process's listener)
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let accepted = std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
    });
    let socket_arg = socket.to_str().expect("utf-8 path");
    let started = std::time::Instant::now();
    let mut child = trmx_node()
        .args(["--socket", socket_arg, "--timeout", "1", "status"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run trmx-node");
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > Duration::from_secs(4) {
            let _ = child.kill();
            panic!("the command still waits after 4 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    let line = assert_one_line_failure(&output);
    assert_eq!(
        line,
        format!(
            "the trmx node at {socket_arg} did not answer within --timeout: it accepts \
             connections but may be stuck or stopped; see its log (e.g. `journalctl -u \
             trmx-node`), or pass a longer --timeout"
        )
    );
    accepted.join().expect("listener thread");
}

/// `--timeout` bounds the wait for an answer, not a `watch` waiting for new entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_outlasts_the_timeout() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    let mut child = trmx_node()
        .args(["--socket", &socket, "--timeout", "1", "watch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run trmx-node");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let still = child.try_wait().expect("wait");
    let _ = child.kill();
    let _ = child.wait();
    assert!(still.is_none(), "watch ended: {still:?}");
    node.stop().await.expect("stop");
}

/// A document of another kind than `--kind` (the wrong file, or a mistyped kind) says
/// which kind it reads as, besides the field that does not belong; nothing is sent.
#[test]
fn a_document_of_another_kind_says_which_kind_it_is() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let referral = dir.path().join("referral.json");
    std::fs::write(&referral, REFERRAL_JSON).expect("write");
    let output = run(&[
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "send",
        "--to",
        "BE-PAYOKE",
        "--kind",
        "follow-up",
        "--new-case",
        referral.to_str().expect("utf-8 path"),
    ]);
    let line = assert_one_line_failure(&output);
    assert_eq!(
        line,
        format!(
            "{}: follow_up: unknown field (the document reads as a referral: --kind \
             referral?)",
            referral.display()
        )
    );
}

/// A `due --page-token` of a listing by another date says which `--today` to ask with,
/// in the flags the user types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_token_of_another_date_names_the_flag() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    let token = format!(
        "due:2026-02-01:2026-01-01:{}",
        trmx_proto::MessageId::new_v7()
    );
    let args = [
        "--socket",
        &socket,
        "due",
        "--today",
        "2026-03-01",
        "--page-token",
        &token,
    ]
    .map(str::to_owned)
    .to_vec();
    let line = assert_one_line_failure(&run_async(args).await);
    assert_eq!(
        line,
        "--page-token: continues the listing of what is due by 2026-02-01, not by 2026-03-01: \
         ask with --today 2026-02-01 or without --today"
    );
    node.stop().await.expect("stop");
}

/// A `watch` ended by the node stopping exits 1 and says how to resume in the flag the
/// user types (`--after`), not in the API's `after_seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ended_by_the_node_says_how_to_resume_with_after() {
    let sandbox = Sandbox::new();
    let node = sandbox.start().await;
    let socket = node.socket_path().to_str().expect("utf-8 path").to_owned();
    let child = trmx_node()
        .args(["--socket", &socket, "watch"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run trmx-node");
    // (connected: the child holds a socket; then its Watch is open a moment later)
    let fds = format!("/proc/{}/fd", child.id());
    eventually("the watch to connect", Duration::from_secs(20), || {
        std::fs::read_dir(&fds).is_ok_and(|dir| {
            dir.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.stop().await.expect("stop");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("output");
    let line = assert_one_line_failure(&output);
    assert_eq!(
        line,
        "the node is stopping: resume with --after set to the last seq processed"
    );
}

/// `check-config` said "config OK" for a socket in a directory other users may write
/// (`/tmp`), which `run` then refuses: the check before a restart must refuse it too,
/// with the same words, and create nothing.
#[test]
fn check_config_refuses_a_socket_directory_that_run_refuses() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    for mode in [0o1777, 0o777] {
        let shared = sandbox.path().join(format!("shared-{mode:o}"));
        std::fs::create_dir(&shared).expect("dir");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let socket = shared.join("node.sock");
        let line = assert_one_line_failure(&run(&[
            "--config",
            config_path.to_str().expect("utf-8"),
            "--socket",
            socket.to_str().expect("utf-8"),
            "check-config",
        ]));
        assert_eq!(
            line,
            format!(
                "config: api.socket: the directory {} can be written by other users (mode \
                 {mode:o}), who could put their own socket in place of the node's: use a \
                 directory only the node's user can write (e.g. /run/trmx-node, mode 0700), \
                 or `chmod o-w` this one",
                shared.display()
            )
        );
        assert_eq!(std::fs::read_dir(&shared).expect("read").count(), 0);
    }
    // run as root, check-config finds the node's own directory another user's: it says
    // to run it as the node's user, as `run` as root would refuse that directory too
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    if root {
        let theirs = sandbox.path().join("theirs");
        std::fs::create_dir(&theirs).expect("dir");
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).expect("chown");
        let line = assert_one_line_failure(&run(&[
            "--config",
            config_path.to_str().expect("utf-8"),
            "--socket",
            theirs.join("node.sock").to_str().expect("utf-8"),
            "check-config",
        ]));
        assert!(
            line.contains("belongs to another user (uid 65534)")
                && line.ends_with(
                    "(check-config runs as root here: run it as the node's user, e.g. `sudo \
                     -u trmx trmx-node --config FILE check-config`)"
                ),
            "{line}"
        );
    }
    // a directory the node will make is its own
    let later = sandbox.path().join("run").join("node.sock");
    let output = run(&[
        "--config",
        config_path.to_str().expect("utf-8"),
        "--socket",
        later.to_str().expect("utf-8"),
        "check-config",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!sandbox.path().join("run").exists(), "check-config made it");
}

/// A node stand-in whose `Watch` yields an inbox entry every 20 ms, for ever; every other
/// call is unimplemented.
#[derive(Debug)]
struct EndlessInbox;

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl trmx_proto::pb::node_api_server::NodeApi for EndlessInbox {
    async fn send(&self, _: tonic::Request<pb::SendRequest>) -> Answer<pb::SendResponse> {
        Err(tonic::Status::unimplemented("send"))
    }
    async fn list_outbox(
        &self,
        _: tonic::Request<pb::ListOutboxRequest>,
    ) -> Answer<pb::ListOutboxResponse> {
        Err(tonic::Status::unimplemented("list_outbox"))
    }
    async fn list_inbox(
        &self,
        _: tonic::Request<pb::ListInboxRequest>,
    ) -> Answer<pb::ListInboxResponse> {
        Err(tonic::Status::unimplemented("list_inbox"))
    }
    async fn get_message(
        &self,
        _: tonic::Request<pb::GetMessageRequest>,
    ) -> Answer<pb::GetMessageResponse> {
        Err(tonic::Status::unimplemented("get_message"))
    }
    async fn get_case(&self, _: tonic::Request<pb::GetCaseRequest>) -> Answer<pb::GetCaseResponse> {
        Err(tonic::Status::unimplemented("get_case"))
    }
    async fn list_due(&self, _: tonic::Request<pb::ListDueRequest>) -> Answer<pb::ListDueResponse> {
        Err(tonic::Status::unimplemented("list_due"))
    }
    async fn list_participants(
        &self,
        _: tonic::Request<pb::ListParticipantsRequest>,
    ) -> Answer<pb::ListParticipantsResponse> {
        Err(tonic::Status::unimplemented("list_participants"))
    }
    async fn withdraw(
        &self,
        _: tonic::Request<pb::WithdrawMessageRequest>,
    ) -> Answer<pb::WithdrawMessageResponse> {
        Err(tonic::Status::unimplemented("withdraw"))
    }
    async fn get_node_status(
        &self,
        _: tonic::Request<pb::GetNodeStatusRequest>,
    ) -> Answer<pb::NodeStatus> {
        Err(tonic::Status::unimplemented("get_node_status"))
    }
    type WatchStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::InboxEntry, tonic::Status>> + Send + 'static>,
    >;
    async fn watch(&self, request: tonic::Request<pb::WatchRequest>) -> Answer<Self::WatchStream> {
        let after = request.into_inner().after_seq;
        let entries = futures::stream::unfold(after, |seq| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let entry = pb::InboxEntry {
                seq: seq + 1,
                ..Default::default()
            };
            Some((Ok(entry), seq + 1))
        });
        Ok(tonic::Response::new(Box::pin(entries)))
    }
}

/// `trmx-node watch | head -n 1` (a script waiting for the next message) must end once
/// its reader has gone: a closed pipe was taken for success and the watch went on for
/// ever, holding the pipeline open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ends_when_its_reader_has_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(trmx_proto::pb::node_api_server::NodeApiServer::new(
                EndlessInbox,
            ))
            .serve_with_incoming(incoming),
    );
    for json in [false, true] {
        let mut args = vec!["--socket", socket.to_str().expect("utf-8"), "watch"];
        if json {
            args.push("--json");
        }
        let mut child = trmx_node()
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run trmx-node");
        // (the reader takes a line, then goes, as `head -n 1` does)
        let stdout = child.stdout.take().expect("stdout");
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .expect("a line");
            line
        })
        .await
        .expect("join");
        assert!(!line.is_empty(), "json {json}");
        let started = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if started.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("watch still runs 5 s after its reader went (json {json})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status:?} (json {json})");
        let output = child.wait_with_output().expect("output");
        assert!(output.stderr.is_empty(), "{}", stderr(&output));
    }
    server.abort();
}

/// A `send` or `withdraw` cut by `--timeout` may have been done by a node that is only
/// slow: the line says how to find out and that the same `send` again sends nothing twice,
/// where "stuck or stopped" alone led to a new `--key`, or an edited file, and a second
/// message.
#[test]
fn a_send_cut_by_the_timeout_says_it_may_have_been_queued() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("node.sock");
    let document = dir.path().join("referral.json");
    std::fs::write(&document, REFERRAL_JSON).expect("document");
    // (accepts, never speaks; the thread ends with the test binary)
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in listener.incoming() {
            held.push(connection);
        }
    });
    let socket_arg = socket.to_str().expect("utf-8 path");
    let send = run(&[
        "--socket",
        socket_arg,
        "--timeout",
        "1",
        "send",
        "--to",
        "BE-PAYOKE",
        "--kind",
        "referral",
        "--new-case",
        document.to_str().expect("utf-8 path"),
    ]);
    let line = assert_one_line_failure(&send);
    assert_eq!(
        line,
        format!(
            "the trmx node at {socket_arg} did not answer within --timeout, and may have \
             queued the message all the same: `trmx-node outbox` shows it if so, and the same \
             command again does not send it twice (it prints the message's id and state); \
             the node may also be stuck or stopped: see its log (e.g. `journalctl -u \
             trmx-node`), or pass a longer --timeout"
        )
    );
    let id = "01J0000000000000000000000A";
    let withdraw = run(&["--socket", socket_arg, "--timeout", "1", "withdraw", id]);
    let line = assert_one_line_failure(&withdraw);
    assert_eq!(
        line,
        format!(
            "the trmx node at {socket_arg} did not answer within --timeout, and may have \
             withdrawn the message all the same: `trmx-node show {id}` tells; the node may \
             also be stuck or stopped: see its log (e.g. `journalctl -u trmx-node`), or pass \
             a longer --timeout"
        )
    );
}

/// A socket directory the node's user may not write in (root's `/run`, mode 0755, for a
/// node run as `trmx`) cannot hold the socket: the start says so of the directory
/// configured, not of the private directory the node makes there first (`/run/.t5js`, a
/// name the operator never gave). (Run as root, the test starts the node as `nobody`.)
#[test]
fn a_socket_directory_the_node_may_not_write_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let setpriv = Path::new("/usr/bin/setpriv");
    if !root || !setpriv.exists() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for name in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::write(dir.path().join(name), "x").expect("tls file");
    }
    // (root's, mode 0755: as /run)
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).expect("dir");
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "participant = \"NL-NRM\"\ndata_dir = \"{}\"\n[api]\nsocket = \"{}\"\n[broker]\n\
             address = \"127.0.0.1:1\"\nserver_name = \"localhost\"\n[tls]\nca = \"ca.pem\"\n\
             cert = \"cert.pem\"\nkey = \"key.pem\"\n",
            dir.path().join("data").display(),
            run_dir.join("node.sock").display()
        ),
    )
    .expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_trmx-node"))
        .args(["--config", config.to_str().expect("utf-8"), "run"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run trmx-node as nobody");
    let line = assert_one_line_failure(&output);
    assert_eq!(
        line,
        format!(
            "cannot start the node: config: api.socket: the node's user (uid 65534) cannot \
             make files in {} (Permission denied (os error 13)), where the node makes its \
             socket: use a directory that user owns, e.g. /run/trmx-node (systemd's \
             RuntimeDirectory=trmx-node)",
            run_dir.display()
        )
    );
}

/// `run` started with a node certificate hours from valid (by this clock), and the broker
/// refused every handshake; only `check-config` said it. It is refused now with
/// check-config's message, naming both clocks; minutes ahead start with a warning.
#[test]
fn run_refuses_a_node_certificate_not_valid_yet_and_warns_within_minutes() {
    let sandbox = Sandbox::new();
    let config_path = write_config(&sandbox, "NL-NRM");
    let ca = trmx_certs::Ca::open(&sandbox.path().join("pki").join("ca")).expect("ca");
    let c = &sandbox.config;
    let paths = trmx_certs::CertPaths {
        cert: c.tls.cert.clone(),
        key: c.tls.key.clone(),
    };
    let ready = sandbox.path().join("ready");
    // Runs the node until it exits or is ready (then stopped with SIGTERM): whether it
    // became ready, and its output.
    let start = |ahead: Duration| {
        let spec = trmx_certs::IssueSpec::participant("NL-NRM");
        let at = std::time::SystemTime::now() + ahead;
        let info = ca.issue_at(&spec, &paths, true, at).expect("issue");
        let _ = std::fs::remove_file(&ready);
        let mut child = spawn_run(&config_path, &ready);
        let became_ready = loop {
            if child.try_wait().expect("try_wait").is_some() {
                break false;
            }
            if std::fs::read_to_string(&ready).is_ok_and(|s| s.ends_with('\n')) {
                let killed = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()
                    .expect("kill");
                assert!(killed.success());
                break true;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            became_ready,
            child.wait_with_output().expect("output"),
            info,
        )
    };

    let (became_ready, output, info) = start(Duration::from_secs(2 * 3600));
    assert!(!became_ready, "it started: {}", stderr(&output));
    let line = assert_one_line_failure(&output);
    assert!(
        line.contains(&format!(
            "tls.cert: {}: it is not valid before {}, and this machine's clock says ",
            c.tls.cert.display(),
            trmx_certs::format_time(info.not_before)
        )),
        "{line}"
    );
    assert!(
        line.contains(
            "or the CA machine's clock was ahead when it issued the certificate (the broker \
             would refuse it until "
        ),
        "{line}"
    );

    let (became_ready, output, _) = start(Duration::from_secs(8 * 60));
    assert!(became_ready, "{}", stderr(&output));
    assert!(output.status.success(), "{}", stderr(&output));
    let said = stderr(&output);
    let warned = said
        .lines()
        .find(|l| l.contains("it is not valid before "))
        .unwrap_or_else(|| panic!("no warning in {said}"));
    assert!(warned.contains("WARN"), "{warned}");
    assert!(
        warned.contains(" minute(s) earlier: either this clock is behind"),
        "{warned}"
    );
}
