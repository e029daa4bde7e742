//! Waiting in tests for another task or process to reach a state: poll with a deadline and
//! name what did not happen, never sleep for a guessed time.
//!
//! A test sleeps only while it waits for something outside its control (another task, a
//! broker process, the kernel), and then in a loop like these. Time that must pass in the
//! code under test is a shorter configured period, a time handed in (`Store::sweep(now)`), or
//! paused tokio time in the crate's own unit tests.

use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] looks again.
const EVERY: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, and returns that; panics saying that `what` did not
/// happen within `limit`.
pub async fn eventually_some<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(EVERY).await;
    }
}

/// Polls `check` until it holds; panics saying that `what` did not happen within `limit`.
pub async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    eventually_some(what, limit, async || check().await.then_some(())).await;
}
