//! The failure-percentage check, off the request path: every interval, for each
//! service, read (and reset) what its endpoints counted with atomics since the last
//! interval and eject the outliers `outlier::failure_percentage_outliers` names, worst
//! first, under the service's cap.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use switchyard_core::model::State;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::outlier::{failure_percentage_outliers, EjectKind, IntervalCounts};
use crate::table::{EndpointTable, ServiceView};

/// Runs the check every `table.outlier().interval` until shutdown.
pub async fn run(
    table: Arc<EndpointTable>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(table.outlier().interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::stopped(&mut shutdown) => return,
        }
        for view in table.all() {
            check(&view, &metrics);
        }
    }
}

/// One interval of one service; returns the ids it ejected.
pub fn check(view: &ServiceView, metrics: &Metrics) -> Vec<String> {
    // Every endpoint's counters restart, judged or not, so an interval means one.
    let counts: Vec<IntervalCounts> = view
        .endpoints
        .iter()
        .map(|e| IntervalCounts {
            requests: u64::from(e.live.interval_requests.swap(0, Ordering::Relaxed)),
            failures: u64::from(e.live.interval_failures.swap(0, Ordering::Relaxed)),
            skip: e.live.is_ejected() || e.state != State::Serving,
        })
        .collect();
    if view.resilience.settings.max_ejection_percent == 0 {
        return Vec::new();
    }
    let mut ejected = Vec::new();
    for i in failure_percentage_outliers(&counts) {
        let Some(e) = view.endpoints.get(i) else {
            continue;
        };
        if e.live.eject(EjectKind::FailurePercentage) {
            tracing::debug!(
                service = %view.name,
                endpoint = %e.id,
                requests = counts[i].requests,
                failures = counts[i].failures,
                "failure percentage over the threshold"
            );
            metrics.ejection(&view.name, &e.id, EjectKind::FailurePercentage);
            ejected.push(e.id.clone());
        } else {
            // At the cap: the worse ones are already out.
            break;
        }
    }
    ejected
}
