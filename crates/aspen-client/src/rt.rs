//! The one place the client touches an async runtime: tokio in production, madsim's
//! clock and seeded randomness under `--cfg madsim` (the deterministic simulator runs this
//! crate's logic, and one seed must replay one execution exactly). Instants come from
//! `std::time::Instant`, which madsim's clock drives in a simulated build.

use std::future::Future;
use std::time::Duration;

/// Waits for `duration` of runtime time.
pub(crate) async fn sleep(duration: Duration) {
    #[cfg(not(madsim))]
    {
        tokio::time::sleep(duration).await
    }
    #[cfg(madsim)]
    {
        madsim::time::sleep(duration).await
    }
}

/// The deadline passed before the future completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Elapsed;

/// Runs `future` for at most `duration` of runtime time.
pub(crate) async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    #[cfg(not(madsim))]
    {
        tokio::time::timeout(duration, future).await.map_err(|_| Elapsed)
    }
    #[cfg(madsim)]
    {
        madsim::time::timeout(duration, future).await.map_err(|_| Elapsed)
    }
}

/// 128 random bits for a session id: from the OS, or from the simulation's seed.
pub(crate) fn random_u128() -> Result<u128, String> {
    #[cfg(not(madsim))]
    {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|error| error.to_string())?;
        Ok(u128::from_le_bytes(bytes))
    }
    #[cfg(madsim)]
    {
        Ok(u128::from(madsim::rand::random::<u64>()) << 64 | u128::from(madsim::rand::random::<u64>()))
    }
}
