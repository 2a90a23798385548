//! Config loading and validation: errors name the field.

use std::path::Path;

use trmx_node::NodeConfig;
use trmx_node::core::NodeError;

const MINIMAL: &str = r#"
participant = "BE-PAYOKE"
data_dir = "data"

[broker]
address = "localhost:7443"
server_name = "localhost"

[tls]
ca = "pki/ca.pem"
cert = "pki/BE-PAYOKE.pem"
key = "pki/BE-PAYOKE.key"
"#;

fn config_error(text: &str) -> String {
    let parsed = NodeConfig::parse(text).and_then(|c| c.validate().map(|()| c));
    match parsed {
        Err(NodeError::Config(message)) => message,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn the_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("node.example.toml");
    let config = NodeConfig::load(&path).expect("node.example.toml loads");
    assert_eq!(config.participant, "NL-NRM");
    assert_eq!(
        config.socket_path(),
        Path::new("/var/lib/trmx-node/node.sock")
    );
    let core = config.core_config().expect("core config");
    assert_eq!(core.broker_addr, "broker.trm.example.eu:7443");
    assert_eq!(core.max_in_flight, 32);
    let limits = config.api_limits();
    assert_eq!((limits.max_connections, limits.max_watch_streams), (64, 64));
    assert_eq!(
        core.default_lifetime,
        Some(std::time::Duration::from_secs(720 * 3600))
    );
}

/// An operator reads `node.example.toml` as the reference: every setting the node takes
/// is in it (set, or commented out where its default depends on another), and every value
/// it sets is the default, but for those that have none. The destructurings name every
/// field, so a new setting does not compile here until the example has it.
#[test]
fn the_example_config_shows_every_setting_with_its_default() {
    use trmx_node::config::{ApiSection, BrokerSection, StorageSection, TlsSection};

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("node.example.toml");
    let text = std::fs::read_to_string(&path).expect("node.example.toml reads");
    let example = NodeConfig::parse(&text).expect("node.example.toml parses");
    let defaults = NodeConfig::parse(MINIMAL).expect("minimal parses");

    let NodeConfig {
        participant: _,
        data_dir: _,
        log_level: _,
        broker,
        tls,
        api,
        storage,
    } = &example;
    let BrokerSection {
        address: _,
        server_name: _,
        max_in_flight: _,
        reconnect_min_ms: _,
        reconnect_max_ms: _,
        message_lifetime_hours: _,
        outbox_check_interval_secs: _,
        redrive_watch_secs: _,
        submit_answer_timeout_secs: _,
    } = broker;
    let TlsSection {
        ca: _,
        cert: _,
        key: _,
        crl: _,
    } = tls;
    let ApiSection {
        socket: _,
        max_connections: _,
        max_watch_streams: _,
    } = api;
    let StorageSection {
        cache_capacity_mb: _,
        retention_check_interval_secs: _,
        max_clock_step_secs: _,
        max_downtime_secs: _,
    } = storage;
    let sections: [(&str, &[&str]); 5] = [
        ("", &["participant", "data_dir", "log_level"]),
        (
            "broker",
            &[
                "address",
                "server_name",
                "max_in_flight",
                "reconnect_min_ms",
                "reconnect_max_ms",
                "message_lifetime_hours",
                "outbox_check_interval_secs",
                "redrive_watch_secs",
                "submit_answer_timeout_secs",
            ],
        ),
        ("tls", &["ca", "cert", "key", "crl"]),
        ("api", &["socket", "max_connections", "max_watch_streams"]),
        (
            "storage",
            &[
                "cache_capacity_mb",
                "retention_check_interval_secs",
                "max_clock_step_secs",
                "max_downtime_secs",
            ],
        ),
    ];
    // each key, set or commented out (`# key = …`), in its own section of the file
    let mut section = "";
    let mut shown = std::collections::HashSet::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
            continue;
        }
        let setting = line.trim_start_matches('#').trim_start();
        if let Some((key, _)) = setting.split_once(" = ") {
            shown.insert((section, key));
        }
    }
    for (section, keys) in sections {
        for key in keys {
            assert!(
                shown.contains(&(section, *key)),
                "node.example.toml does not show [{section}] {key}"
            );
        }
    }

    // what the example sets is the default, but for what has none
    let mut expected = example.clone();
    expected.participant = defaults.participant.clone();
    expected.data_dir = defaults.data_dir.clone();
    expected.broker.address = defaults.broker.address.clone();
    expected.broker.server_name = defaults.broker.server_name.clone();
    expected.tls = defaults.tls.clone();
    let message = "node.example.toml sets a value other than the default (left: the example)";
    assert_eq!(expected.log_level, defaults.log_level, "{message}");
    assert_eq!(expected.broker, defaults.broker, "[broker]: {message}");
    assert_eq!(expected.api, defaults.api, "[api]: {message}");
    assert_eq!(expected.storage, defaults.storage, "[storage]: {message}");
    assert_eq!(expected, defaults, "{message}");
}

#[test]
fn defaults_and_relative_paths() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, MINIMAL).expect("write");
    let config = NodeConfig::load(&path).expect("loads");
    assert_eq!(config.data_dir, dir.path().join("data"));
    assert_eq!(config.tls.key, dir.path().join("pki/BE-PAYOKE.key"));
    assert_eq!(config.socket_path(), dir.path().join("data/node.sock"));
    assert_eq!(config.log_level, "info");
    assert_eq!(config.broker.max_in_flight, 32);
    assert_eq!(config.storage.cache_capacity_mb, 64);
    assert_eq!(config.tls.crl, None);
    let limits = config.api_limits();
    assert_eq!((limits.max_connections, limits.max_watch_streams), (64, 64));
    // the CRL is optional; given, it is a path like the others
    let with_crl = MINIMAL.replace(
        "key = \"pki/BE-PAYOKE.key\"",
        "key = \"pki/BE-PAYOKE.key\"\ncrl = \"pki/ca.crl\"",
    );
    std::fs::write(&path, with_crl).expect("write");
    let config = NodeConfig::load(&path).expect("loads");
    assert_eq!(config.tls.crl, Some(dir.path().join("pki/ca.crl")));
    assert_eq!(
        config.core_config().expect("core").crl,
        Some(dir.path().join("pki/ca.crl"))
    );
    let message = config_error(&MINIMAL.replace(
        "key = \"pki/BE-PAYOKE.key\"",
        "key = \"pki/BE-PAYOKE.key\"\ncrl = \"\"",
    ));
    assert!(message.contains("tls.crl"), "{message}");
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let message = config_error(&MINIMAL.replace("server_name", "server_nme"));
    assert!(message.contains("server_nme"), "{message}");
    let message = config_error(&format!("{MINIMAL}\n[storage]\ncache_mb = 3\n"));
    assert!(message.contains("cache_mb"), "{message}");
}

#[test]
fn missing_required_fields_are_named() {
    let message = config_error(&MINIMAL.replace("participant = \"BE-PAYOKE\"", ""));
    assert!(message.contains("participant"), "{message}");
}

#[test]
fn validation_errors_name_the_field() {
    let cases = [
        (
            MINIMAL.replace("BE-PAYOKE\"\ndata", "payoke\"\ndata"),
            "participant:",
        ),
        (
            MINIMAL.replace("localhost:7443", "localhost"),
            "broker.address:",
        ),
        (
            MINIMAL.replace("server_name = \"localhost\"", "server_name = \"\""),
            "broker.server_name:",
        ),
        (
            MINIMAL.replace(
                "server_name = \"localhost\"",
                "server_name = \"localhost\"\nmax_in_flight = 0",
            ),
            "broker.max_in_flight:",
        ),
        (
            MINIMAL.replace(
                "server_name = \"localhost\"",
                "server_name = \"localhost\"\nreconnect_min_ms = 5000\nreconnect_max_ms = 100",
            ),
            "broker.reconnect_max_ms:",
        ),
        (
            format!("{MINIMAL}\n[storage]\nretention_check_interval_secs = 0\n"),
            "storage.retention_check_interval_secs:",
        ),
        (
            format!("{MINIMAL}\n[storage]\nmax_clock_step_secs = 0\n"),
            "storage.max_clock_step_secs:",
        ),
        (
            format!("{MINIMAL}\n[api]\nsocket = \"/{}\"\n", "x".repeat(120)),
            "api.socket:",
        ),
        (
            format!("{MINIMAL}\n[api]\nmax_connections = 0\n"),
            "api.max_connections:",
        ),
        (
            format!("{MINIMAL}\n[api]\nmax_connections = 100000\n"),
            "api.max_connections:",
        ),
        (
            format!("{MINIMAL}\n[api]\nmax_watch_streams = 0\n"),
            "api.max_watch_streams:",
        ),
        (
            format!("{MINIMAL}\n[storage]\nmax_downtime_secs = 60\n"),
            "storage.max_downtime_secs:",
        ),
        (
            MINIMAL.replace(
                "data_dir = \"data\"",
                &format!("data_dir = \"/{}\"", "d".repeat(100)),
            ),
            "data_dir: is too long for the default socket",
        ),
        (
            format!("log_level = \"info,=bad[\"\n{MINIMAL}"),
            "log_level:",
        ),
    ];
    for (text, field) in cases {
        let message = config_error(&text);
        assert!(message.starts_with(field), "expected {field} in: {message}");
    }
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, MINIMAL.replace("localhost:7443", "nowhere")).expect("write");
    let message = NodeConfig::load(&path).expect_err("invalid").to_string();
    assert!(message.contains("node.toml"), "{message}");
    assert!(
        message.contains("broker.address: must be host:port"),
        "{message}"
    );
    let missing = NodeConfig::load(&dir.path().join("absent.toml"))
        .expect_err("missing")
        .to_string();
    assert!(missing.contains("absent.toml"), "{missing}");
}

/// A submit's wait for the broker's answer counts the time its envelope takes to send:
/// a node on a slow link whose large envelopes take longer than the default 5 min to
/// send would have them cut and sent again for good, every message queued behind them
/// waiting. An operator sets it (as the broker's `limits.request_timeout`); too short a
/// one is refused, naming the setting.
#[test]
fn the_submit_answer_timeout_is_a_setting() {
    let config = NodeConfig::parse(&MINIMAL.replace(
        "server_name = \"localhost\"",
        "server_name = \"localhost\"\nsubmit_answer_timeout_secs = 1800",
    ))
    .expect("parses");
    config.validate().expect("valid");
    assert_eq!(
        config.core_config().expect("core").submit_answer_timeout,
        std::time::Duration::from_secs(1800)
    );
    let default = NodeConfig::parse(MINIMAL).expect("parses");
    assert_eq!(
        default.core_config().expect("core").submit_answer_timeout,
        trmx_node::core::SUBMIT_ANSWER_TIMEOUT
    );
    let message = config_error(&MINIMAL.replace(
        "server_name = \"localhost\"",
        "server_name = \"localhost\"\nsubmit_answer_timeout_secs = 5",
    ));
    assert!(
        message.contains("broker.submit_answer_timeout_secs"),
        "{message}"
    );
}
