//! Rollout webhooks, Flagger-compatible: the registry leader calls each one (HTTP POST,
//! JSON body) at its stage of a canary rollout, and reads the answer's status code.
//!
//! The kinds and their names are Flagger's (`analysis.webhooks[].type`), so a hook
//! written for Flagger (its load tester, a gate, a Slack relay) works unchanged. The
//! payload and the caller live in the registry (`switchyard_registry::rollout_hooks`);
//! this module is the data and its validation, shared with the CLI.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ValidationError;

/// At most this many webhooks per rollout.
pub const MAX_WEBHOOKS: usize = 16;
/// At most this many bytes in one webhook URL.
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;

/// When in a rollout a webhook is called, with Flagger's meaning of its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WebhookKind {
    /// Before the canary gets any traffic; the rollout waits until it answers 2xx.
    ConfirmRollout,
    /// Before traffic is shifted to the canary; a failure counts as a failed check.
    PreRollout,
    /// On every analysis step, before the metric checks; a failure counts as a failed check.
    Rollout,
    /// Before each weight increase; the step waits until it answers 2xx.
    ConfirmTrafficIncrease,
    /// Before promotion; promotion waits until it answers 2xx.
    ConfirmPromotion,
    /// After promotion or rollback; a failure is only logged.
    PostRollout,
    /// During analysis or while waiting on a gate; a 2xx answer means "roll back now".
    Rollback,
}

impl WebhookKind {
    /// Every kind, in the order a rollout meets them.
    pub const ALL: [WebhookKind; 7] = [
        WebhookKind::ConfirmRollout,
        WebhookKind::PreRollout,
        WebhookKind::Rollout,
        WebhookKind::ConfirmTrafficIncrease,
        WebhookKind::ConfirmPromotion,
        WebhookKind::PostRollout,
        WebhookKind::Rollback,
    ];

    /// Flagger's name for the kind, as used in the CLI, in config and in the payload's
    /// `type` field.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::ConfirmRollout => "confirm-rollout",
            WebhookKind::PreRollout => "pre-rollout",
            WebhookKind::Rollout => "rollout",
            WebhookKind::ConfirmTrafficIncrease => "confirm-traffic-increase",
            WebhookKind::ConfirmPromotion => "confirm-promotion",
            WebhookKind::PostRollout => "post-rollout",
            WebhookKind::Rollback => "rollback",
        }
    }
}

impl fmt::Display for WebhookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WebhookKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WebhookKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = WebhookKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown webhook type {:?}: use one of {}",
                    shown(s),
                    names.join(", ")
                )
            })
    }
}

/// One webhook of a rollout. Serialized with Flagger's field name `type` for the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    #[serde(rename = "type")]
    pub kind: WebhookKind,
    pub url: String,
}

impl Webhook {
    /// Parses the CLI form `TYPE=URL`, e.g. `pre-rollout=http://loadtester.test/`, and
    /// checks the URL by the rules of [`validate_webhooks`].
    pub fn parse_flag(s: &str) -> Result<Webhook, String> {
        let Some((kind, url)) = s.split_once('=') else {
            return Err(format!(
                "webhook {:?} is not TYPE=URL (e.g. pre-rollout=http://loadtester.test/)",
                shown(s)
            ));
        };
        let kind: WebhookKind = kind.trim().parse()?;
        validate_url("webhook url", url).map_err(|e| e.to_string())?;
        Ok(Webhook {
            kind,
            url: url.to_string(),
        })
    }
}

/// Checks a rollout's webhooks: at most [`MAX_WEBHOOKS`], each URL plain `http://` with a
/// host, no userinfo, no whitespace or control characters, at most
/// [`MAX_WEBHOOK_URL_BYTES`]. Errors name the field, e.g. `rollout.webhooks[2].url`.
pub fn validate_webhooks(hooks: &[Webhook]) -> Result<(), ValidationError> {
    if hooks.len() > MAX_WEBHOOKS {
        return Err(ValidationError::new(
            "rollout.webhooks",
            format!(
                "{} webhooks given, at most {MAX_WEBHOOKS} are allowed: merge hooks or drop some",
                hooks.len()
            ),
        ));
    }
    for (i, hook) in hooks.iter().enumerate() {
        validate_url(&format!("rollout.webhooks[{i}].url"), &hook.url)?;
    }
    Ok(())
}

/// The rules for one webhook URL; `field` names it in the error.
fn validate_url(field: &str, url: &str) -> Result<(), ValidationError> {
    let err = |reason: String| Err(ValidationError::new(field, reason));
    if url.len() > MAX_WEBHOOK_URL_BYTES {
        return err(format!(
            "is {} bytes, at most {MAX_WEBHOOK_URL_BYTES} are allowed",
            url.len()
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return err(format!(
            "{} contains whitespace or a control character: percent-encode it (%20 for a space)",
            shown(url)
        ));
    }
    let scheme_is = |scheme: &str| {
        url.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
    };
    if scheme_is("https://") {
        return err(format!(
            "{} uses https: only plain http:// is supported until TLS lands; use an http:// URL (e.g. via a local relay)",
            shown(url)
        ));
    }
    if !url.starts_with("http://") {
        return err(format!("{} must start with http://", shown(url)));
    }
    let rest = &url["http://".len()..];
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return err(
            "has userinfo (user:password@) before the host: credentials in URLs leak into logs; put them in the path or query of a hook that expects them, or drop them"
                .to_string(),
        );
    }
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal: the host is what lies between the brackets.
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return err(format!(
            "{} has no host: write http://HOST[:PORT]/PATH",
            shown(url)
        ));
    }
    Ok(())
}

/// Shows a user-supplied value in an error without letting it flood the message.
fn shown(value: &str) -> String {
    let mut s: String = value.chars().take(80).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str) -> Webhook {
        Webhook {
            kind: WebhookKind::Rollout,
            url: url.to_string(),
        }
    }

    fn refused(url: &str) -> ValidationError {
        match validate_webhooks(&[hook("http://ok.test/"), hook(url)]) {
            Err(e) => e,
            Ok(()) => panic!("{url:?} was accepted"),
        }
    }

    #[test]
    fn kinds_round_trip_through_flaggers_names() {
        for kind in WebhookKind::ALL {
            assert_eq!(kind.as_str().parse::<WebhookKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!(
            WebhookKind::ConfirmTrafficIncrease.as_str(),
            "confirm-traffic-increase"
        );
    }

    #[test]
    fn an_unknown_kind_lists_the_valid_names() {
        let e = "pre-rolout".parse::<WebhookKind>().expect_err("unknown");
        for kind in WebhookKind::ALL {
            assert!(e.contains(kind.as_str()), "{e}");
        }
    }

    #[test]
    fn parse_flag_reads_type_equals_url() {
        let h = Webhook::parse_flag("pre-rollout=http://lt.test/run?cmd=a=b").expect("parse");
        assert_eq!(h.kind, WebhookKind::PreRollout);
        assert_eq!(h.url, "http://lt.test/run?cmd=a=b");
        assert!(Webhook::parse_flag("http://lt.test/")
            .expect_err("no type")
            .contains("TYPE=URL"));
        assert!(Webhook::parse_flag("gate=http://lt.test/")
            .expect_err("bad type")
            .contains("confirm-rollout"));
        assert!(Webhook::parse_flag("rollout=https://lt.test/")
            .expect_err("https")
            .contains("plain http"));
    }

    #[test]
    fn plain_http_urls_are_accepted() {
        let hooks = [
            hook("http://loadtester.test/"),
            hook("http://10.0.0.1:8080/gate/check?token=x"),
            hook("http://[::1]:9000"),
        ];
        assert_eq!(validate_webhooks(&hooks), Ok(()));
    }

    #[test]
    fn at_most_sixteen_hooks() {
        let hooks = vec![hook("http://a.test/"); MAX_WEBHOOKS];
        assert_eq!(validate_webhooks(&hooks), Ok(()));
        let hooks = vec![hook("http://a.test/"); MAX_WEBHOOKS + 1];
        let e = validate_webhooks(&hooks).expect_err("17 hooks");
        assert_eq!(e.field, "rollout.webhooks");
    }

    #[test]
    fn https_is_refused_until_tls_lands() {
        let e = refused("https://gate.test/");
        assert_eq!(e.field, "rollout.webhooks[1].url");
        assert!(e.reason.contains("only plain http"), "{}", e.reason);
        assert!(e.reason.contains("until TLS lands"), "{}", e.reason);
    }

    #[test]
    fn other_schemes_are_refused() {
        for url in ["ftp://gate.test/", "gate.test/", "", "http:/gate.test"] {
            let e = refused(url);
            assert_eq!(e.field, "rollout.webhooks[1].url");
            assert!(e.reason.contains("http://"), "{}", e.reason);
        }
    }

    #[test]
    fn urls_are_bounded_in_bytes() {
        let base = "http://a.test/";
        let fits = format!("{base}{}", "x".repeat(MAX_WEBHOOK_URL_BYTES - base.len()));
        assert_eq!(validate_webhooks(&[hook(&fits)]), Ok(()));
        let e = refused(&format!("{fits}x"));
        assert_eq!(e.field, "rollout.webhooks[1].url");
        assert!(e.reason.contains("2048"), "{}", e.reason);
    }

    #[test]
    fn a_host_is_required() {
        for url in [
            "http://",
            "http:///path",
            "http://:8080/",
            "http://?q",
            "http://[]:80/",
        ] {
            let e = refused(url);
            assert!(e.reason.contains("no host"), "{url}: {}", e.reason);
        }
    }

    #[test]
    fn userinfo_is_refused() {
        for url in ["http://user:pw@gate.test/", "http://@gate.test/"] {
            let e = refused(url);
            assert!(e.reason.contains("userinfo"), "{url}: {}", e.reason);
            assert!(!e.reason.contains("pw"), "the password is not echoed");
        }
        // An `@` after the host (in the path or query) is not userinfo.
        assert_eq!(
            validate_webhooks(&[hook("http://gate.test/notify?to=a@b.test")]),
            Ok(())
        );
    }

    #[test]
    fn whitespace_and_control_characters_are_refused() {
        for url in [
            "http://gate.test/a b",
            "http://gate.test/\r\nX-Injected: 1",
            "http://gate.test/\u{7f}",
            "http://gate.test/\u{a0}",
        ] {
            let e = refused(url);
            assert!(e.reason.contains("whitespace"), "{url:?}: {}", e.reason);
        }
    }
}
