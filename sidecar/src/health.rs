//! Health checks of the local service: HTTP path, TCP connect, or gRPC health. A result
//! flips the service's health only after N consecutive results agree (pingora's rule),
//! so one slow probe does not pull an instance out of rotation.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// How to probe the local service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// No probe: the service is taken as healthy while the sidecar runs.
    None,
    /// `GET path`; 2xx and 3xx are healthy.
    Http { path: String },
    /// A TCP connect succeeds.
    Tcp,
    /// `grpc.health.v1.Health/Check` with the empty service name answers SERVING.
    Grpc,
}

#[derive(Clone, Debug)]
pub struct HealthConfig {
    pub check: Check,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passes that make a failing service healthy again.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy service failing.
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check: Check::None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// A prober for one local service.
pub struct Prober {
    target: SocketAddr,
    config: HealthConfig,
    http: Client<HttpConnector, Empty<Bytes>>,
}

impl Prober {
    pub fn new(target: SocketAddr, config: HealthConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        Self {
            target,
            http: Client::builder(TokioExecutor::new()).build(connector),
            config,
        }
    }

    pub fn config(&self) -> &HealthConfig {
        &self.config
    }

    /// One probe; `Err` says why it failed.
    pub async fn probe(&self) -> Result<(), String> {
        let fut = async {
            match &self.config.check {
                Check::None => Ok(()),
                Check::Tcp => tokio::net::TcpStream::connect(self.target)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("TCP connect to {} failed: {e}", self.target)),
                Check::Http { path } => {
                    let uri = format!("http://{}{}", self.target, path);
                    let uri: http::Uri =
                        uri.parse().map_err(|e| format!("bad health path: {e}"))?;
                    let resp = self
                        .http
                        .get(uri)
                        .await
                        .map_err(|e| format!("GET {path} failed: {e}"))?;
                    let status = resp.status();
                    if status.is_success() || status.is_redirection() {
                        Ok(())
                    } else {
                        Err(format!("GET {path} answered {status}"))
                    }
                }
                Check::Grpc => {
                    use tonic_health::pb::health_check_response::ServingStatus;
                    use tonic_health::pb::health_client::HealthClient;
                    use tonic_health::pb::HealthCheckRequest;
                    let url = format!("http://{}", self.target);
                    let channel = tonic::transport::Endpoint::from_shared(url)
                        .map_err(|e| e.to_string())?
                        .connect()
                        .await
                        .map_err(|e| format!("gRPC connect to {} failed: {e}", self.target))?;
                    let mut client = HealthClient::new(channel);
                    let resp = client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .map_err(|s| format!("grpc.health.v1 Check failed: {}", s.message()))?;
                    if resp.into_inner().status == ServingStatus::Serving as i32 {
                        Ok(())
                    } else {
                        Err("grpc.health.v1 Check answered NOT_SERVING".into())
                    }
                }
            }
        };
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.config.timeout)),
        }
    }
}

/// Turns a stream of probe results into a health verdict with hysteresis.
#[derive(Debug)]
pub struct Verdict {
    healthy: bool,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Verdict {
    pub fn new(initially_healthy: bool, cfg: &HealthConfig) -> Self {
        Self {
            healthy: initially_healthy,
            streak: 0,
            healthy_threshold: cfg.healthy_threshold.max(1),
            unhealthy_threshold: cfg.unhealthy_threshold.max(1),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Records one result; returns `Some(new verdict)` when it flips.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if passed {
            self.healthy_threshold
        } else {
            self.unhealthy_threshold
        };
        if self.streak >= needed {
            self.healthy = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_flips_only_after_enough_consecutive_results() {
        let cfg = HealthConfig::default();
        let mut v = Verdict::new(true, &cfg);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(true), None, "a pass resets the failure streak");
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), Some(true));
    }
}
