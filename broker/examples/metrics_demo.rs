//! A stand-in broker for `ops/check.sh demo`: serves the admin endpoints of a registry that
//! synthetic traffic keeps moving, so Prometheus, the alert rules and the dashboard queries
//! can be checked without certificates or a store.
//!
//! `cargo run -p trmx-broker --example metrics_demo [-- 127.0.0.1:0]` prints
//! `listening http://ADDR/metrics` once it accepts, and runs until Ctrl-C / SIGTERM.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::net::TcpListener;
use trmx_broker::admin::{
    AdminState, CertRole, DeadLetterReason, DropReason, ExchangeMethod, HeldCert, Metrics,
    RefusalReason, serve_admin, sha256_label,
};
use trmx_broker::store::QueueStats;
use trmx_proto::{Kind, ParticipantId};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let local = listener.local_addr()?;

    let metrics = Arc::new(Metrics::new());
    let participants = ["NL-NRM", "BE-PAYOKE", "INT-IOM"]
        .into_iter()
        .map(ParticipantId::parse)
        .collect::<Result<Vec<_>, _>>()?;
    populate(&metrics, &participants);
    tokio::spawn(traffic(Arc::clone(&metrics), participants));

    // std's stdout is line-buffered: the line is out before the first scrape can come
    println!("listening http://{local}/metrics");
    std::io::stdout().flush()?;

    serve_admin(listener, AdminState::new(metrics), shutdown()).await;
    Ok(())
}

fn populate(metrics: &Metrics, participants: &[ParticipantId]) {
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    metrics.set_store_writable(true);
    // what the broker's timer loop measures every 2 s (`measure_disk`): the dashboard's
    // "Store on disk" panel and the low-disk alert read them
    metrics.set_disk(DISK_FREE, MIN_FREE_DISK, STORE_BYTES);
    // the CA file as a broker reads it: every CA labelled with the start of its fingerprint
    metrics.replace_cert_expiries(
        CertRole::Ca,
        [HeldCert {
            name: "trmx-demo-ca".to_owned(),
            sha256: Some(sha256_label(b"trmx-demo-ca")),
            not_after: now + day * 3650,
        }],
    );
    metrics.set_cert_expiry(CertRole::Broker, "broker-1", now + day * 90);
    metrics.set_cert_expiry(CertRole::Operator, "night-shift", now + day * 20);
    for (i, p) in participants.iter().enumerate() {
        metrics.set_cert_expiry(
            CertRole::Participant,
            p.as_str(),
            now + day * (200 + 100 * i as u32),
        );
    }
    metrics.set_crl_next_update(now + day);
    metrics.register_participants(participants);
    if let Some(first) = participants.first() {
        // (the demo's stream stays open: it is never counted down)
        let _open = metrics.stream_opened(first);
    }
    if let Some(last) = participants.last() {
        metrics.seen(last, now - Duration::from_secs(3600));
    }
}

/// Free bytes on the demo store's file system, its `limits.min_free_disk_bytes`, and the
/// store's own size at the start.
const DISK_FREE: u64 = 40 << 30;
const MIN_FREE_DISK: u64 = 1 << 30;
const STORE_BYTES: u64 = 300 << 20;

/// Moves every counter and histogram a little every 50 ms (a deterministic pseudo-random walk).
async fn traffic(metrics: Arc<Metrics>, participants: Vec<ParticipantId>) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let kind = Kind::APPLICATION[(n % Kind::APPLICATION.len() as u64) as usize];
        metrics.accepted(kind);
        metrics.delivered(kind, if n.is_multiple_of(7) { 2 } else { 1 });
        metrics.acknowledged(kind);
        metrics.acknowledged(Kind::DeliveryReceipt);
        metrics.observe_submit(Duration::from_micros(400 + (n * 7919) % 20_000));
        metrics.observe_flush(Duration::from_micros(100 + (n * 104_729) % 8_000));
        if n.is_multiple_of(5) {
            metrics.refused(RefusalReason::ALL[(n / 5 % RefusalReason::ALL.len() as u64) as usize]);
        }
        if n.is_multiple_of(11) {
            metrics.refused_in_progress(
                ExchangeMethod::ALL[(n / 11 % ExchangeMethod::ALL.len() as u64) as usize],
            );
        }
        if n.is_multiple_of(40) {
            metrics.dead_lettered(DeadLetterReason::MaxAttempts, 1);
            metrics.expired(1);
            metrics.dropped(DropReason::ALL[(n / 40 % DropReason::ALL.len() as u64) as usize]);
        }
        if n.is_multiple_of(20) {
            let now_ms = trmx_proto::time::to_millis(SystemTime::now());
            let stats: Vec<QueueStats> = participants
                .iter()
                .enumerate()
                .map(|(i, p)| QueueStats {
                    recipient: p.clone(),
                    depth: (n + i as u64 * 3) % 11,
                    in_flight: (n + i as u64) % 3,
                    oldest_accepted_at: Some(now_ms.saturating_sub(1000 * (i as u64 + 1) * 60)),
                    bytes: 4096 * ((n + i as u64) % 11),
                })
                .collect();
            metrics.set_queue(&stats);
            // the store grows as the traffic does, and the free space shrinks with it
            let grown = 64 * 1024 * n;
            metrics.set_disk(
                DISK_FREE.saturating_sub(grown),
                MIN_FREE_DISK,
                STORE_BYTES.saturating_add(grown),
            );
        }
    }
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
