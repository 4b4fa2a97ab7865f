//! `switchyard.v1.Rollouts`: start, read and steer canary rollouts.
//!
//! Every verb reads the service's newest rollout, builds the next state with
//! [`crate::rollout::transitions`], and proposes it as a compare-and-set on the rollout's
//! generation; when the leader's loop moved the rollout meanwhile, the verb reads it
//! again and retries (a few times), so a user's verb is never lost to a race with the
//! loop. Reads answer from this node's catalog.

use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use switchyard_proto::v1 as pb;
use switchyard_proto::v1::rollouts_server::Rollouts;

use super::convert::{rollout_spec_from_proto, rollout_to_proto};
use super::status;
use crate::auth;
use crate::catalog::{ApplyError, Catalog, Command, Reply, RolloutPolicy};
use crate::model::acl::Right;
use crate::model::rollout::{PauseReason, Phase, Rollout, RolloutSpec, RolloutStatus};
use crate::model::{validate_name, validate_namespace, State};
use crate::raft::propose::{ProposeError, Proposer};
use crate::rollout::{now_ms, transitions};
use crate::shared::Shared;

/// Concurrent `Watch` streams per node.
pub const MAX_ROLLOUT_WATCHERS: usize = 256;
/// How often a `Watch` stream looks for a change.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Tries of a verb that lost a race with the loop.
const ATTEMPTS: usize = 5;

pub struct RolloutsApi {
    shared: Arc<Shared>,
    proposer: Proposer,
    watchers: Arc<Semaphore>,
}

fn target(namespace: &str, service: &str) -> Result<String, Status> {
    let namespace = validate_namespace("namespace", namespace)?;
    validate_name("service", service)?;
    Ok(namespace)
}

/// The namespace and spec a `Start` proposes, checked at the edge; a baseline left out
/// is the service's main serving version in the catalog `catalog` reads. Public
/// (hidden) for the `write_requests` fuzz target.
#[doc(hidden)]
pub fn start_spec<C: Deref<Target = Catalog>>(
    catalog: impl Fn() -> C,
    namespace: &str,
    service: &str,
    spec: Option<pb::RolloutSpec>,
) -> Result<(String, RolloutSpec), Status> {
    let namespace = target(namespace, service)?;
    let mut spec = rollout_spec_from_proto(spec.unwrap_or_default())?;
    if spec.baseline.is_empty() {
        spec.baseline = serving_version(&catalog(), &namespace, service, &spec.canary)?;
    }
    Ok((namespace, spec))
}

/// The version with the most serving instances that is not the canary: what
/// `--baseline` means when left out.
fn serving_version(
    catalog: &Catalog,
    namespace: &str,
    service: &str,
    canary: &str,
) -> Result<String, Status> {
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in catalog.resolve(namespace, service, "") {
        if i.state == State::Serving && i.version != canary {
            *counts.entry(i.version.clone()).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v)
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "service {service:?} has no serving version other than {canary:?} to use as the baseline: register the current version first, or give --baseline"
            ))
        })
}

fn response(r: &Rollout) -> pb::RolloutResponse {
    pb::RolloutResponse {
        rollout: Some(rollout_to_proto(r)),
    }
}

/// What a verb does with the newest rollout: the transition, or a refusal.
type Verb<'a> = dyn Fn(&Rollout, Option<&crate::model::Policy>) -> Result<transitions::Transition, Status>
    + Send
    + Sync
    + 'a;

impl RolloutsApi {
    pub fn new(shared: Arc<Shared>, proposer: Proposer) -> Self {
        Self {
            shared,
            proposer,
            watchers: Arc::new(Semaphore::new(MAX_ROLLOUT_WATCHERS)),
        }
    }

    fn newest(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<(Rollout, Option<Arc<crate::model::Policy>>), Status> {
        let catalog = self.shared.catalog.read();
        let r = catalog.rollout(namespace, service).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "service {service:?} has no rollout in namespace {namespace:?}: start one with `switchyard rollout start {service} --canary VERSION`"
            ))
        })?;
        Ok((r, catalog.current_policy(namespace, service)))
    }

    async fn propose(
        &self,
        rollout: Rollout,
        expected: u64,
        start: bool,
        policy: RolloutPolicy,
    ) -> Result<Result<Rollout, ProposeError>, Status> {
        match self
            .proposer
            .propose(Command::PutRollout {
                rollout: Box::new(rollout),
                expected_generation: expected,
                start,
                policy,
                at_ms: now_ms(),
            })
            .await
        {
            Ok(Reply::Rollout { rollout, .. }) => Ok(Ok(*rollout)),
            Ok(_) => Err(Status::internal("a rollout change produced no rollout")),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Applies `verb` to the newest rollout, retrying when the loop won a race.
    async fn steer(
        &self,
        namespace: &str,
        service: &str,
        verb: &Verb<'_>,
    ) -> Result<Rollout, Status> {
        let namespace = target(namespace, service)?;
        for attempt in 0..ATTEMPTS {
            let (current, policy) = self.newest(&namespace, service)?;
            let t = verb(&current, policy.as_deref())?;
            match self
                .propose(t.rollout, current.status.generation, false, t.policy)
                .await?
            {
                Ok(r) => return Ok(r),
                Err(ProposeError::Refused(ApplyError::RolloutChanged { .. }))
                    if attempt + 1 < ATTEMPTS =>
                {
                    // Let this node catch up with what the leader applied.
                    tokio::time::sleep(Duration::from_millis(50 * (attempt as u64 + 1))).await;
                }
                Err(e) => return Err(status(e)),
            }
        }
        Err(Status::aborted("the rollout kept changing: try again"))
    }

    async fn start(&self, req: pb::StartRolloutRequest) -> Result<Rollout, Status> {
        let (namespace, spec) = start_spec(
            || self.shared.catalog.read(),
            &req.namespace,
            &req.service,
            req.spec,
        )?;
        for attempt in 0..ATTEMPTS {
            let (expected, base) = {
                let catalog = self.shared.catalog.read();
                (
                    catalog.rollout_generation(&namespace, &req.service),
                    catalog
                        .policy(&namespace, &req.service)
                        .map_or(0, |r| r.revision),
                )
            };
            let now = now_ms();
            let rollout = Rollout {
                namespace: namespace.clone(),
                service: req.service.clone(),
                spec: spec.clone(),
                status: RolloutStatus::pending(0, now, base),
            };
            match self
                .propose(rollout, expected, true, RolloutPolicy::Keep)
                .await?
            {
                Ok(r) => return Ok(r),
                Err(ProposeError::Refused(ApplyError::RolloutChanged { .. }))
                    if attempt + 1 < ATTEMPTS =>
                {
                    tokio::time::sleep(Duration::from_millis(50 * (attempt as u64 + 1))).await;
                }
                Err(e) => return Err(status(e)),
            }
        }
        Err(Status::aborted(
            "the service's rollouts kept changing: try again",
        ))
    }

    fn get(&self, req: pb::RolloutRef) -> Result<pb::RolloutResponse, Status> {
        let namespace = target(&req.namespace, &req.service)?;
        Ok(response(&self.newest(&namespace, &req.service)?.0))
    }

    fn list(&self, req: pb::ListRolloutsRequest) -> Result<pb::ListRolloutsResponse, Status> {
        let namespace = validate_namespace("namespace", &req.namespace)?;
        let catalog = self.shared.catalog.read();
        Ok(pb::ListRolloutsResponse {
            rollouts: catalog
                .rollouts(&namespace)
                .into_iter()
                .map(rollout_to_proto)
                .collect(),
        })
    }
}

fn active(r: &Rollout, verb: &str) -> Result<(), Status> {
    if r.status.phase.is_active() {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "the rollout of {} to {} is {}: nothing to {verb} (start a new one, or retry an aborted one)",
        r.service,
        r.spec.canary,
        r.status.phase.as_str()
    )))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Rollouts for RolloutsApi {
    async fn start(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = match auth::check(
            &self.shared,
            request.metadata(),
            "RolloutStart",
            Right::Rollout,
            &service,
        ) {
            Ok(_) => RolloutsApi::start(self, request.into_inner())
                .await
                .map(|r| response(&r)),
            Err(e) => Err(e),
        };
        self.shared
            .metrics
            .observe("RolloutStart", r)
            .map(Response::new)
    }

    async fn get(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        let service = request.get_ref().service.clone();
        let r = auth::check(
            &self.shared,
            request.metadata(),
            "RolloutGet",
            Right::Read,
            &service,
        )
        .and_then(|_| RolloutsApi::get(self, request.into_inner()));
        self.shared
            .metrics
            .observe("RolloutGet", r)
            .map(Response::new)
    }

    async fn list(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        // Only the services the caller may read.
        let r = auth::caller(&self.shared, request.metadata()).and_then(|caller| {
            RolloutsApi::list(self, request.into_inner()).map(|mut l| {
                l.rollouts.retain(|r| caller.may(Right::Read, &r.service));
                l
            })
        });
        self.shared
            .metrics
            .observe("RolloutList", r)
            .map(Response::new)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutWatch",
            Right::Read,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let namespace = target(&req.namespace, &req.service)?;
        let first = self.newest(&namespace, &req.service)?.0;
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this registry node serves its maximum of {MAX_ROLLOUT_WATCHERS} rollout watches: retry later or on another node"
            ))
        })?;
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        let mut shutdown = self.shared.shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut seen = first.status.generation;
            if tx.send(Ok(response(&first))).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => return,
                }
                let newest = shared
                    .catalog
                    .read()
                    .rollout(&namespace, &req.service)
                    .cloned();
                let Some(r) = newest else { return };
                if r.status.generation != seen {
                    seen = r.status.generation;
                    if tx.send(Ok(response(&r))).await.is_err() {
                        return;
                    }
                }
            }
        });
        self.shared.metrics.grpc("RolloutWatch", tonic::Code::Ok);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutPromote",
            Right::Rollout,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let full = req.full;
        let r = self
            .steer(&req.namespace, &req.service, &|r, policy| {
                active(r, "promote")?;
                let now = now_ms();
                Ok(if full {
                    transitions::promoting(r, "promoted in full by hand: promoting".into(), now)
                } else if matches!(r.status.phase, Phase::Pending | Phase::Initializing) {
                    transitions::enter_step(r, 0, now, policy)
                } else {
                    transitions::advance(r, now, policy)
                })
            })
            .await
            .map(|r| response(&r));
        self.shared
            .metrics
            .observe("RolloutPromote", r)
            .map(Response::new)
    }

    async fn pause(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutPause",
            Right::Rollout,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let r = self
            .steer(&req.namespace, &req.service, &|r, policy| {
                active(r, "pause")?;
                Ok(transitions::pause(
                    r,
                    PauseReason::Manual,
                    format!(
                        "paused by hand at {}%: `switchyard rollout promote {}` goes on",
                        r.status.weight, r.service
                    ),
                    now_ms(),
                    policy,
                ))
            })
            .await
            .map(|r| response(&r));
        self.shared
            .metrics
            .observe("RolloutPause", r)
            .map(Response::new)
    }

    async fn abort(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutAbort",
            Right::Rollout,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let r = self
            .steer(&req.namespace, &req.service, &|r, policy| {
                active(r, "abort")?;
                Ok(transitions::abort(
                    r,
                    "aborted by hand: every request goes to the baseline".into(),
                    now_ms(),
                    policy,
                ))
            })
            .await
            .map(|r| response(&r));
        self.shared
            .metrics
            .observe("RolloutAbort", r)
            .map(Response::new)
    }

    async fn retry(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutRetry",
            Right::Rollout,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let r = self
            .steer(&req.namespace, &req.service, &|r, _| {
                if r.status.phase != Phase::Aborted {
                    return Err(Status::failed_precondition(format!(
                        "the rollout of {} is {}: only an aborted rollout can be retried",
                        r.service,
                        r.status.phase.as_str()
                    )));
                }
                Ok(transitions::retry(r, now_ms()))
            })
            .await
            .map(|r| response(&r));
        self.shared
            .metrics
            .observe("RolloutRetry", r)
            .map(Response::new)
    }

    async fn undo(
        &self,
        request: Request<pb::UndoRolloutRequest>,
    ) -> Result<Response<pb::RolloutResponse>, Status> {
        auth::check(
            &self.shared,
            request.metadata(),
            "RolloutUndo",
            Right::Rollout,
            &request.get_ref().service,
        )?;
        let req = request.into_inner();
        let to = req.to_revision;
        let r = self
            .steer(&req.namespace, &req.service, &|r, policy| {
                let now = now_ms();
                let target = if to == 0 { r.status.base_policy_revision } else { to };
                let mut t = if r.status.phase.is_active() {
                    transitions::abort(r, String::new(), now, policy)
                } else {
                    transitions::observe(r, r.status.clone())
                };
                t.rollout.status.updated_at_ms = now;
                if target == 0 {
                    // Nothing was in force before the rollout: all to the baseline.
                    t.rollout.status.message =
                        "undone: every request goes to the baseline (there was no policy before the rollout)".into();
                    t.policy = transitions::abort(r, String::new(), now, policy).policy;
                } else {
                    t.rollout.status.message = format!("undone: policy revision {target} restored");
                    t.policy = RolloutPolicy::Restore(target);
                }
                Ok(t)
            })
            .await
            .map(|r| response(&r));
        self.shared
            .metrics
            .observe("RolloutUndo", r)
            .map(Response::new)
    }
}
