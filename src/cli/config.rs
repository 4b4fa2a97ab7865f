//! What the server roles' typed config structs share: the one merge of a `--config` TOML
//! file into parsed flags, and the value formats (durations, TTLs, `KEY = VALUE` tables)
//! used both on the command line and in the file.
//!
//! Each role (`registry`, `sidecar`) has ONE struct deriving clap's `Args` and serde's
//! `Serialize`/`Deserialize`: clap fills it from flags, `SWITCHYARD_*` variables and
//! defaults, then [`overlay_file`] replaces the fields still at their default with the
//! file's keys. Precedence: flag > environment > file > default.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{CliError, EXIT_CONFIG};

/// Overlays the TOML file at `path` onto `args`: a key of the file replaces the field of
/// the same name unless that field was given as a flag or an environment variable.
/// Unknown keys and values of the wrong type are an error (exit 64), even for a key a
/// flag overrides, so a typo in the file never goes unnoticed.
///
/// How: `args` is serialized to a TOML table (the flags' values in the file's format),
/// the file's keys are written over it, and the table is deserialized back into the
/// struct; serde's `deny_unknown_fields` refuses keys that are not fields, and fields
/// marked `#[serde(skip)]` (e.g. `config` itself) are not keys either.
pub fn overlay_file<T>(args: &T, matches: Option<&ArgMatches>, path: &Path) -> Result<T, CliError>
where
    T: Serialize + DeserializeOwned,
{
    let invalid = |e: &dyn std::fmt::Display| {
        CliError::new(
            EXIT_CONFIG,
            format!("invalid --config {}: {e}", path.display()),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format!("cannot read --config {}: {e}", path.display()),
        )
    })?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| invalid(&e))?;
    let base = match toml::Value::try_from(args) {
        Ok(toml::Value::Table(t)) => t,
        Ok(_) => return Err(invalid(&"internal: flags are not a table")),
        Err(e) => return Err(invalid(&format!("cannot merge with the flags: {e}"))),
    };
    // Pass 1: every key of the file, whatever overrides it, must be a valid field (the
    // error names the key: the table no longer has the file's line numbers).
    let mut all = base.clone();
    all.extend(file.clone());
    T::deserialize(all).map_err(|e| invalid(&e))?;
    // Pass 2: only the keys whose field still holds its default.
    let mut merged = base;
    for (key, value) in file {
        if !explicit(matches, &key) {
            merged.insert(key, value);
        }
    }
    T::deserialize(merged).map_err(|e| invalid(&e))
}

/// Whether the argument with this id was given on the command line or through its
/// environment variable (unknown ids, and `None` matches for a config built in code,
/// count as not given).
fn explicit(matches: Option<&ArgMatches>, id: &str) -> bool {
    let Some(m) = matches else { return false };
    // `value_source` panics on an unknown id in debug builds; `try_get_raw` tells.
    if m.try_get_raw(id).is_err() {
        return false;
    }
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Parses a duration: `250ms`, `5s`, `2m`, `1h 30m` (humantime's units), or a bare
/// number of seconds as the hand-written parser before it accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too long a duration"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 250ms, 5s or 2m ({e})"))
}

/// Parses a lease TTL: a duration of whole seconds from 1 s to 1 h (`10s`, `2m`, `1h`, or
/// a bare number of seconds).
pub fn parse_ttl(s: &str) -> Result<u32, String> {
    let d = parse_duration(s).map_err(|_| format!("{s:?} is not a duration like 10s, 2m or 1h"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!("{s} is not a whole number of seconds"));
    }
    match u32::try_from(d.as_secs()) {
        Ok(secs) if (1..=3600).contains(&secs) => Ok(secs),
        _ => Err(format!("{s} is outside 1s-1h")),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` from Unix milliseconds (UTC, whole seconds); times past the
/// year 9999 print as its last second.
pub fn rfc3339(ms: u64) -> String {
    // humantime cannot format past 9999-12-31T23:59:59Z (its Display fails there).
    const LAST_SECOND: u64 = 253_402_300_799;
    let secs = (ms / 1000).min(LAST_SECOND);
    let t: SystemTime = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Serde format of a duration in the file: a string such as `"250ms"` or `"5s"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde format of a lease TTL in the file: a string such as `"10s"`.
pub mod ttl {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(secs: &u32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{secs}s"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_ttl(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde format of repeatable `NAME=VALUE` flags in the file: a table `{ NAME = VALUE }`
/// (keys in sorted order, as the file's table had them).
pub mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K, V, S>(v: &[(K, V)], s: S) -> Result<S::Ok, S::Error>
    where
        K: Serialize + Ord,
        V: Serialize,
        S: Serializer,
    {
        v.iter()
            .map(|(k, v)| (k, v))
            .collect::<BTreeMap<_, _>>()
            .serialize(s)
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<Vec<(K, V)>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(BTreeMap::<K, V>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_keep_the_old_inputs() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5_400)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("99999999999999999999999").is_err());
    }

    #[test]
    fn durations_round_trip_through_the_file_format() {
        for d in ["100ms", "5s", "2m", "15s", "1s 500ms"] {
            let parsed = parse_duration(d).expect("valid");
            assert_eq!(humantime::format_duration(parsed).to_string(), d);
        }
    }

    #[test]
    fn ttls_are_whole_seconds_from_one_second_to_an_hour() {
        assert_eq!(parse_ttl("10s"), Ok(10));
        assert_eq!(parse_ttl("2m"), Ok(120));
        assert_eq!(parse_ttl("1h"), Ok(3_600));
        assert_eq!(parse_ttl("30"), Ok(30));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("2h").is_err());
        assert!(parse_ttl("1500ms").is_err());
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn rfc3339_formats_unix_milliseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_700_000_000), "2026-11-26T13:33:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_700_000_999), "2026-11-26T13:33:20Z");
        assert_eq!(rfc3339(u64::MAX), "9999-12-31T23:59:59Z");
    }
}
