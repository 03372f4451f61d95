//! The one place Aspen's consensus and storage touch an async runtime.
//!
//! Production builds use tokio. Builds with `--cfg madsim` (the deterministic simulator,
//! `cargo xtask sim`) use madsim: its clock, its scheduler and its seeded randomness, so one
//! seed replays one execution exactly. Everything above this module, openraft included
//! (through [`TypeConfig`](crate::TypeConfig)'s `AsyncRuntime`), is the same code in both.
//!
//! Blocking storage work (redb commits, SQLite transactions) runs on tokio's blocking pool
//! in production. Under the simulator it runs inline on the simulated task: file I/O takes
//! no simulated time, which keeps it deterministic while still exercising the real files.

use std::future::Future;
use std::time::Duration;

/// Runs blocking work (file I/O) without stalling the async executor.
///
/// Returns `Err` with a description if the work panicked or was cancelled.
pub async fn blocking<T, F>(work: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    #[cfg(not(madsim))]
    {
        tokio::task::spawn_blocking(work).await.map_err(|error| error.to_string())
    }
    #[cfg(madsim)]
    {
        Ok(work())
    }
}

/// This node's wall-clock time in ms since the Unix epoch (madsim's simulated clock under the
/// simulator, so a seed replays exactly). Only for times that are then replicated, such as a
/// proposal's stamp: nodes' clocks differ, so no decision reads it directly.
pub fn wall_clock_ms() -> u64 {
    #[cfg(not(madsim))]
    let now = std::time::SystemTime::now();
    #[cfg(madsim)]
    let now = madsim::time::TimeHandle::current().now_time();
    now.duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// Spawns a task on the current runtime (the current simulated node under madsim).
pub fn spawn<F>(future: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    #[cfg(not(madsim))]
    {
        tokio::spawn(future);
    }
    #[cfg(madsim)]
    {
        madsim::task::spawn(future);
    }
}

/// Waits for `duration` of runtime time.
pub async fn sleep(duration: Duration) {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("deadline of {0:?} elapsed")]
pub struct Elapsed(pub Duration);

/// Runs `future` for at most `duration` of runtime time.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    #[cfg(not(madsim))]
    {
        tokio::time::timeout(duration, future).await.map_err(|_| Elapsed(duration))
    }
    #[cfg(madsim)]
    {
        madsim::time::timeout(duration, future).await.map_err(|_| Elapsed(duration))
    }
}

#[cfg(madsim)]
pub use self::sim::{MadsimRuntime, set_timer_rate};

/// The runtime openraft runs on: tokio in production, madsim in the simulator.
#[cfg(not(madsim))]
pub type RaftRuntime = openraft_rt_tokio::TokioRuntime;
/// The runtime openraft runs on: tokio in production, madsim in the simulator.
#[cfg(madsim)]
pub type RaftRuntime = MadsimRuntime;

#[cfg(madsim)]
mod sim {
    //! openraft's `AsyncRuntime` over madsim. Channels and mutexes are tokio's `sync`
    //! types (runtime-independent, the same ones production uses); time, tasks and
    //! randomness are madsim's.

    use std::future::Future;
    use std::ops::{Add, AddAssign, Sub, SubAssign};
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use openraft::rt::{AsyncRuntime, OptionalSend};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    /// The simulated runtime.
    #[derive(Debug, Default)]
    pub struct MadsimRuntime;

    thread_local! {
        /// Per simulated node: how much longer than asked its timers take (clock skew).
        static TIMER_RATES: std::cell::RefCell<std::collections::HashMap<madsim::task::NodeId, f64>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }

    /// Makes openraft's timers on simulated `node` take `rate` times their duration (1.0 =
    /// true time, 2.0 = a clock running at half speed). The simulator's clock-skew fault.
    pub fn set_timer_rate(node: madsim::task::NodeId, rate: f64) {
        TIMER_RATES.with(|rates| {
            let mut rates = rates.borrow_mut();
            if rate == 1.0 {
                rates.remove(&node);
            } else {
                rates.insert(node, rate);
            }
        });
    }

    fn skewed(duration: Duration) -> Duration {
        let rate = TIMER_RATES.with(|rates| rates.borrow().get(&madsim::plugin::node()).copied()).unwrap_or(1.0);
        if rate == 1.0 { duration } else { duration.mul_f64(rate) }
    }

    fn skewed_deadline(deadline: SimInstant) -> std::time::Instant {
        let now = madsim::time::Instant::now();
        now + skewed(deadline.0.saturating_duration_since(now))
    }

    /// A simulated instant.
    #[derive(Clone, Copy, Debug, Eq, PartialEq, Ord, PartialOrd)]
    pub struct SimInstant(std::time::Instant);

    impl Add<Duration> for SimInstant {
        type Output = Self;
        fn add(self, rhs: Duration) -> Self {
            SimInstant(self.0 + rhs)
        }
    }

    impl AddAssign<Duration> for SimInstant {
        fn add_assign(&mut self, rhs: Duration) {
            self.0 += rhs;
        }
    }

    impl Sub<Duration> for SimInstant {
        type Output = Self;
        fn sub(self, rhs: Duration) -> Self {
            SimInstant(self.0 - rhs)
        }
    }

    impl Sub<SimInstant> for SimInstant {
        type Output = Duration;
        fn sub(self, rhs: SimInstant) -> Duration {
            self.0.saturating_duration_since(rhs.0)
        }
    }

    impl SubAssign<Duration> for SimInstant {
        fn sub_assign(&mut self, rhs: Duration) {
            self.0 -= rhs;
        }
    }

    impl openraft::rt::Instant for SimInstant {
        fn now() -> Self {
            SimInstant(madsim::time::Instant::now())
        }
    }

    /// A future bounded by a simulated deadline.
    pub struct Timeout<T> {
        future: Pin<Box<T>>,
        sleep: Pin<Box<madsim::time::Sleep>>,
    }

    impl<R, T: Future<Output = R>> Future for Timeout<T> {
        type Output = Result<R, super::Elapsed>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            if let Poll::Ready(value) = self.future.as_mut().poll(cx) {
                return Poll::Ready(Ok(value));
            }
            match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(super::Elapsed(Duration::ZERO))),
                Poll::Pending => Poll::Pending,
            }
        }
    }

    impl AsyncRuntime for MadsimRuntime {
        type JoinError = madsim::task::JoinError;
        type JoinHandle<T: OptionalSend + 'static> = madsim::task::JoinHandle<T>;
        type Sleep = madsim::time::Sleep;
        type Instant = SimInstant;
        type TimeoutError = super::Elapsed;
        type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<T>;
        type ThreadLocalRng = SmallRng;

        fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
        where
            T: Future + OptionalSend + 'static,
            T::Output: OptionalSend + 'static,
        {
            madsim::task::spawn(future)
        }

        fn sleep(duration: Duration) -> Self::Sleep {
            madsim::time::sleep(skewed(duration))
        }

        fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
            madsim::time::sleep_until(skewed_deadline(deadline))
        }

        fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
            Timeout { future: Box::pin(future), sleep: Box::pin(madsim::time::sleep(skewed(duration))) }
        }

        fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
            deadline: Self::Instant,
            future: F,
        ) -> Self::Timeout<R, F> {
            Timeout { future: Box::pin(future), sleep: Box::pin(madsim::time::sleep_until(skewed_deadline(deadline))) }
        }

        fn is_panic(join_error: &Self::JoinError) -> bool {
            join_error.is_panic()
        }

        fn thread_rng() -> Self::ThreadLocalRng {
            // Seeded from the simulation's global generator: a function of the seed.
            SmallRng::seed_from_u64(madsim::rand::random::<u64>())
        }

        type Mpsc = openraft_rt_tokio::TokioMpsc;
        type Watch = openraft_rt_tokio::TokioWatch;
        type Oneshot = openraft_rt_tokio::TokioOneshot;
        type Mutex<T: OptionalSend + 'static> = openraft_rt_tokio::TokioMutex<T>;

        fn new(_threads: usize) -> Self {
            MadsimRuntime
        }

        fn block_on<F, T>(&mut self, future: F) -> T
        where
            F: Future<Output = T>,
        {
            madsim::runtime::Runtime::new().block_on(future)
        }

        fn spawn_blocking<F, T>(f: F) -> impl Future<Output = Result<T, std::io::Error>> + Send
        where
            F: FnOnce() -> T + Send + 'static,
            T: Send + 'static,
        {
            // No system threads in the simulation: run it on the simulated task.
            std::future::ready(Ok(f()))
        }
    }
}
