//! Waiting for a condition without a bare sleep: poll it, and fail the test once a
//! bound has passed. The clock is tokio's, so these work under paused time too.

use std::future::Future;
use std::time::Duration;

use switchyard_proto::v1 as pb;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`; panics after.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it is true, for at most `limit`; panics naming `what` after.
pub async fn assert_eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The next event of a watch stream, failing the test after `limit`.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchEvent>,
    limit: Duration,
) -> pb::WatchEvent {
    tokio::time::timeout(limit, stream.message())
        .await
        .expect("a watch event in time")
        .expect("stream healthy")
        .expect("stream open")
}
