//! The clock TLS checks the peer's certificate on.
//!
//! rustls checks a certificate's validity (and, where enforced, a CRL's `nextUpdate`) at
//! the operating system's time. A broker that holds its own time through a jump of the
//! system clock (its `GuardedClock`) passes that time to its server config
//! ([`crate::ServerTls::load_with_clock`]), so that a clock set a year ahead does not
//! refuse every node as expired while the broker carries on; a node passes its own to its
//! client config ([`crate::ClientOptions::clock`]), so that the same jump does not make the
//! broker's certificate look expired and cut the node off.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::UnixTime;
use rustls::time_provider::TimeProvider;

/// The clock TLS checks the peer's certificate on: the system clock by default.
#[derive(Clone)]
pub struct TlsClock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl TlsClock {
    /// The operating system's clock.
    pub fn system() -> Self {
        Self(Arc::new(SystemTime::now))
    }

    /// The time `now` gives.
    pub fn new(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// The current time as rustls reads it (the system clock's if this one is before
    /// 1970, which rustls cannot represent).
    pub(crate) fn unix_time(&self) -> UnixTime {
        self.current_time().unwrap_or_else(UnixTime::now)
    }

    /// This clock as rustls takes it.
    pub(crate) fn provider(&self) -> Arc<dyn TimeProvider> {
        Arc::new(self.clone())
    }
}

impl Default for TlsClock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for TlsClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TlsClock").field(&self.now()).finish()
    }
}

/// Two handles on one clock are equal (options compare equal when they share it).
impl PartialEq for TlsClock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TlsClock {}

impl TimeProvider for TlsClock {
    fn current_time(&self) -> Option<UnixTime> {
        self.now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rustls_reads_the_time_it_is_given() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        let clock = TlsClock::new(move || at);
        assert_eq!(clock.unix_time().as_secs(), 4_000_000_000);
        assert_eq!(clock, clock.clone());
        assert_ne!(clock, TlsClock::system());
    }
}
