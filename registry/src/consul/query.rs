//! The query string of a Consul read: `passing` in every spelling Consul accepts,
//! repeated `tag=`, `dc`, `ns`, `node-meta`, the blocking pair `index` + `wait` (Go
//! durations), the consistency modes, and `token`. Unknown parameters are ignored, as
//! Consul does; a malformed known one is a 400 naming it.

use std::time::Duration;

/// Consul's default `wait` for a blocking query.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Consul's cap on `wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Longest query string read: a stranger's URL is bounded before it is parsed.
pub const MAX_QUERY_BYTES: usize = 8 * 1024;
/// Most `tag=` and `node-meta=` filters one query may carry.
pub const MAX_FILTERS: usize = 64;

/// The parameters of one read, parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Query {
    pub passing: bool,
    pub tags: Vec<String>,
    pub dc: Option<String>,
    pub namespace: Option<String>,
    pub node_meta: Vec<(String, String)>,
    /// `index=N` with N > 0: hold the request until the index passes N.
    pub index: Option<u64>,
    pub wait: Option<Duration>,
    /// `?split=1`: a subset drawn by the service's current split (see `view`).
    pub split: bool,
    /// `?token=` (Consul's legacy way to pass a token).
    pub token: Option<String>,
    /// `?recurse`, `?enable=`, `?reason=` and the rest of what some endpoints read.
    pub enable: Option<bool>,
    pub reason: Option<String>,
    /// `?note=` of a check pass, warn or fail: the check's output.
    pub note: Option<String>,
    /// KV: `?recurse`, `?keys`, `?separator=`, `?raw`, `?cas=`, `?flags=`.
    pub recurse: bool,
    pub keys: bool,
    pub separator: Option<String>,
    pub raw: bool,
    pub cas: Option<u64>,
    pub flags: Option<u64>,
}

/// A parameter that does not parse, as a 400's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid query parameter {name:?}: {reason}")]
pub struct QueryError {
    pub name: String,
    pub reason: String,
}

fn bad(name: &str, reason: impl Into<String>) -> QueryError {
    QueryError {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// A Consul boolean flag: present bare, `1`, `true` (any case) or `yes` mean on; `0`,
/// `false`, `no` mean off; anything else is an error.
fn flag(name: &str, value: &str) -> Result<bool, QueryError> {
    match value.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "t" | "yes" => Ok(true),
        "0" | "false" | "f" | "no" => Ok(false),
        _ => Err(bad(name, "use true or false (or the bare name)")),
    }
}

impl Query {
    /// Parses a raw query string (without the `?`).
    pub fn parse(raw: Option<&str>) -> Result<Self, QueryError> {
        let mut q = Query::default();
        let Some(raw) = raw else {
            return Ok(q);
        };
        if raw.len() > MAX_QUERY_BYTES {
            return Err(bad(
                "query",
                format!("{} bytes, at most {MAX_QUERY_BYTES}", raw.len()),
            ));
        }
        for (name, value) in form_urlencoded::parse(raw.as_bytes()) {
            let value = value.as_ref();
            match name.as_ref() {
                "passing" => q.passing = flag("passing", value)?,
                "tag" => {
                    if q.tags.len() == MAX_FILTERS {
                        return Err(bad("tag", format!("at most {MAX_FILTERS} tags")));
                    }
                    q.tags.push(value.to_string());
                }
                "dc" if !value.is_empty() => q.dc = Some(value.to_string()),
                "ns" | "namespace" if !value.is_empty() => q.namespace = Some(value.to_string()),
                "node-meta" => {
                    if q.node_meta.len() == MAX_FILTERS {
                        return Err(bad("node-meta", format!("at most {MAX_FILTERS} filters")));
                    }
                    let (k, v) = value.split_once(':').ok_or_else(|| {
                        bad(
                            "node-meta",
                            "use KEY:VALUE, for example node-meta=zone:eu-1",
                        )
                    })?;
                    q.node_meta.push((k.to_string(), v.to_string()));
                }
                "index" => {
                    let n: u64 = value
                        .parse()
                        .map_err(|_| bad("index", "must be a non-negative integer"))?;
                    q.index = (n > 0).then_some(n);
                }
                "wait" => q.wait = Some(go_duration(value).map_err(|e| bad("wait", e))?),
                "split" => q.split = flag("split", value)?,
                "token" if !value.is_empty() => q.token = Some(value.to_string()),
                "enable" => q.enable = Some(flag("enable", value)?),
                "reason" => q.reason = Some(value.to_string()),
                "note" => q.note = Some(value.to_string()),
                "recurse" => q.recurse = flag("recurse", value)?,
                "keys" => q.keys = flag("keys", value)?,
                "raw" => q.raw = flag("raw", value)?,
                "separator" if !value.is_empty() => q.separator = Some(value.to_string()),
                "cas" => {
                    q.cas = Some(
                        value
                            .parse()
                            .map_err(|_| bad("cas", "must be a non-negative integer (a ModifyIndex, or 0 for \"only if absent\")"))?,
                    )
                }
                "flags" => {
                    q.flags = Some(
                        value
                            .parse()
                            .map_err(|_| bad("flags", "must be an unsigned 64-bit integer"))?,
                    )
                }
                // Consistency modes: every read is served from this node's applied state
                // (what `stale` asks for); `consistent` and `cached` are accepted too.
                "stale" | "consistent" | "cached" | "leader" => {}
                _ => {}
            }
        }
        Ok(q)
    }

    /// How long a blocking read may hold: `wait` capped at [`MAX_WAIT`] (default
    /// [`DEFAULT_WAIT`]), plus up to wait/16 of jitter so that watchers started together
    /// do not all come back together, as Consul does.
    pub fn hold(&self) -> Duration {
        let wait = self.wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT);
        let jitter = wait / 16;
        wait + jitter.mul_f64(fastrand::f64())
    }
}

/// A Go `time.Duration` string: `300ms`, `10s`, `5m0s`, `1m30.5s`, `1h`, `120000ms`,
/// `1.5h`, `2us`, or a bare number of seconds (Consul accepts `wait=10`).
pub fn go_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str = "use a Go duration such as 10s, 5m0s or 120000ms";
    if text.is_empty() || text.len() > 64 {
        return Err(HINT.into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs.min(MAX_WAIT.as_secs() * 10)));
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} lacks a unit: {HINT}"))?;
        if digits == 0 {
            return Err(format!("{text:?}: {HINT}"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: {HINT}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => return Err(format!("{text:?} has unknown unit {unit:?}: {HINT}")),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    // Past a day means nothing here (waits are capped at 10 minutes) and would overflow.
    Ok(Duration::from_secs_f64(total.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_writes_them() {
        let d = |s| go_duration(s).expect("as expected");
        assert_eq!(d("10s"), Duration::from_secs(10));
        assert_eq!(d("5m0s"), Duration::from_secs(300));
        assert_eq!(d("120000ms"), Duration::from_secs(120));
        assert_eq!(d("1m30.5s"), Duration::from_millis(90_500));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("250us"), Duration::from_micros(250));
        assert_eq!(d("55"), Duration::from_secs(55));
        for bad in ["", "s", "10x", "1m30", "-5s", "..s", "ten seconds"] {
            assert!(go_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn passing_is_on_in_every_consul_spelling_and_off_for_false() {
        for raw in [
            "passing",
            "passing=",
            "passing=1",
            "passing=true",
            "passing=TRUE",
        ] {
            assert!(
                Query::parse(Some(raw)).expect("as expected").passing,
                "{raw}"
            );
        }
        for raw in ["passing=false", "passing=0", "", "tag=a"] {
            assert!(
                !Query::parse(Some(raw)).expect("as expected").passing,
                "{raw}"
            );
        }
        let e = Query::parse(Some("passing=maybe")).expect_err("refused");
        assert_eq!(e.name, "passing");
    }

    #[test]
    fn tags_repeat_and_index_wait_and_modes_parse() {
        let q = Query::parse(Some(
            "tag=a&tag=b%3Dc&dc=dc1&ns=team&node-meta=zone:eu-1&index=42&wait=10s&stale&consistent",
        ))
        .expect("as expected");
        assert_eq!(q.tags, ["a", "b=c"]);
        assert_eq!(q.dc.as_deref(), Some("dc1"));
        assert_eq!(q.namespace.as_deref(), Some("team"));
        assert_eq!(q.node_meta, [("zone".to_string(), "eu-1".to_string())]);
        assert_eq!(q.index, Some(42));
        let hold = q.hold();
        assert!(hold >= Duration::from_secs(10) && hold <= Duration::from_millis(10_625));
        // index=0 is "do not block".
        assert_eq!(
            Query::parse(Some("index=0")).expect("as expected").index,
            None
        );
        assert_eq!(
            Query::parse(Some("index=x")).expect_err("refused").name,
            "index"
        );
        assert_eq!(
            Query::parse(Some("wait=forever"))
                .expect_err("refused")
                .name,
            "wait"
        );
        assert_eq!(
            Query::parse(Some("node-meta=zone"))
                .expect_err("refused")
                .name,
            "node-meta"
        );
        // The cap: 10 minutes plus jitter.
        let q = Query::parse(Some("wait=1h")).expect("as expected");
        assert!(q.hold() <= MAX_WAIT + MAX_WAIT / 16);
        assert!(Query::parse(Some(&"tag=a&".repeat(65))).is_err());
        assert!(Query::parse(Some(&"x".repeat(MAX_QUERY_BYTES + 1))).is_err());
    }
}
