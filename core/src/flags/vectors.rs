//! flagd-core 2.0.0's own answers (tests/flags/vectors.json, written by
//! tests/flags/flagd_vectors.py) reproduced case by case: variant, value, reason or error.

use serde_json::{Map, Value};

use super::FlagSet;

const VECTORS: &str = include_str!("../../../tests/flags/vectors.json");

/// Cases where flagd-core's JsonLogic library (panzi-json-logic 1.0.1) and datalogic 5.4.0
/// disagree on a *built-in* operator given mixed-type operands. flagd's own semantics
/// (documents, evaluation order, `$flagd`, `fractional`, `sem_ver`, `starts_with`,
/// `ends_with`) are matched everywhere; JsonLogic built-ins are datalogic's, not re-written,
/// and each flagd implementation (Go, Java, Python) has its own library with its own
/// quirks here. Each entry is (flag, context, our answer, why); the test checks we still
/// give exactly that answer, so a change in datalogic shows up.
const JSONLOGIC_DIVERGENCES: &[(&str, &str, &str, &str)] = &[
    (
        "split-3way-by-email",
        r#"{}"#,
        r##"{"variant":"blue","value":"#0000ff","reason":"TARGETING_MATCH"}"##,
        "`cat` of a missing attribute: panzi writes null as \"null\", datalogic as \"\" (so a different, equally sticky bucket)",
    ),
    (
        "split-3way-by-email",
        r#"{"targetingKey":""}"#,
        r##"{"variant":"blue","value":"#0000ff","reason":"TARGETING_MATCH"}"##,
        "as above",
    ),
    (
        "split-3way-by-email",
        r#"{"account":"text","score":true,"targetingKey":"k","userId":null}"#,
        r##"{"variant":"blue","value":"#0000ff","reason":"TARGETING_MATCH"}"##,
        "as above",
    ),
    (
        "code-default",
        r#"{"plan":["pro"]}"#,
        r#"{"variant":null,"value":null,"reason":"DEFAULT"}"#,
        "`==` of an array and a string: panzi compares the array's text (\"pro\"), datalogic says false",
    ),
    (
        "bool-result",
        r#"{"age":"abc"}"#,
        r#"{"error":"GENERAL"}"#,
        "`>=` on a non-numeric string: panzi compares NaN (false), datalogic raises NaN",
    ),
    (
        "logic-mix",
        r#"{"country":""}"#,
        r#"{"variant":"z","value":"z","reason":"TARGETING_MATCH"}"#,
        "`missing`: panzi (as json-logic-js) counts \"\" as missing, datalogic does not",
    ),
];

fn vectors() -> (FlagSet, Vec<Value>) {
    let vectors: Value = serde_json::from_str(VECTORS).expect("vectors.json is JSON");
    assert_eq!(
        vectors["flagd_core"], "2.0.0",
        "vectors from the pinned flagd-core"
    );
    let set =
        FlagSet::parse(&vectors["document"].to_string()).expect("the vectors' document parses");
    let cases = vectors["cases"].as_array().expect("cases").clone();
    (set, cases)
}

#[test]
fn every_flagd_core_vector_is_reproduced() {
    let (set, cases) = vectors();
    assert!(cases.len() > 1000, "{} cases", cases.len());
    let empty = Map::new();
    let mut mismatches = Vec::new();
    let mut seen = 0;
    for case in &cases {
        let flag = case["flag"].as_str().expect("flag");
        let context = case["context"].as_object().unwrap_or(&empty);
        let got = match set.evaluate(flag, context, None) {
            Ok(e) => serde_json::json!({
                "flag": flag,
                "context": context,
                "variant": if e.uses_code_default() { Value::Null } else { e.variant.clone().into() },
                "value": e.value,
                "reason": e.reason.as_str(),
            }),
            Err(e) => serde_json::json!({"flag": flag, "context": context, "error": e.code()}),
        };
        let divergence = JSONLOGIC_DIVERGENCES.iter().find(|(f, c, _, _)| {
            *f == flag && serde_json::from_str::<Value>(c).ok().as_ref() == Some(&case["context"])
        });
        let mut expected = case.clone();
        if let Some((_, _, ours, _)) = divergence {
            let Some(expected) = expected.as_object_mut() else {
                continue;
            };
            expected.retain(|k, _| k == "flag" || k == "context");
            let ours: Map<String, Value> = serde_json::from_str(ours).expect("divergence answer");
            expected.extend(ours);
            seen += 1;
        }
        if got != expected {
            mismatches.push(format!("expected {expected}\n     got {got}"));
        }
    }
    assert_eq!(
        seen,
        JSONLOGIC_DIVERGENCES.len(),
        "every listed divergence is a vector"
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} vectors differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn fractional_splits_are_near_their_weights() {
    // Not a flagd rule, a sanity check on the vectors: 30/70 over ~170 keys.
    let (set, cases) = vectors();
    let (mut treatment, mut total) = (0, 0);
    for case in cases
        .iter()
        .filter(|c| c["flag"] == "split-30-70" && c.get("variant").is_some())
    {
        total += 1;
        if case["variant"] == "treatment" {
            treatment += 1;
        }
    }
    assert!(total > 100, "{total}");
    let share = f64::from(treatment) / f64::from(total);
    assert!((0.2..0.4).contains(&share), "{treatment} of {total}");
    assert_eq!(set.len(), 23);
}
