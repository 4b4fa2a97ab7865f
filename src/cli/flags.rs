//! `switchyard flags set|import|get|list|enable|disable|remove|history|rollback|eval`:
//! feature flags in the flagd flag-definition schema, per namespace.
//!
//! `set NAME --file F` takes one flag's definition (the object under `flags.NAME` in a
//! flagd document); `import --file F` a whole flagd document, merged in. Every change is
//! validated by the registry first (errors name the JSON path) and recorded, so
//! `history` and `rollback` work as they do for routing policies. `eval` evaluates a
//! flag here, from the registry's current document, with the rules every sidecar uses.

use clap::{Args, Subcommand};
use switchyard_core::flags::FlagSet;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::config_client::ConfigClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::{CliError, Output, EXIT_CONFIG};

#[derive(Args, Debug)]
pub struct FlagsArgs {
    #[command(subcommand)]
    pub verb: FlagsVerb,
    /// The namespace of the flags.
    #[arg(
        long,
        env = "SWITCHYARD_NAMESPACE",
        default_value = "default",
        global = true
    )]
    pub namespace: String,
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Subcommand, Debug)]
pub enum FlagsVerb {
    /// Create or replace one flag from a file holding its definition (`-` for stdin).
    Set {
        name: String,
        #[arg(long, env = "SWITCHYARD_FLAGS_FILE")]
        file: String,
    },
    /// Merge a whole flagd document in (its flags replace same-named ones).
    Import {
        #[arg(long, env = "SWITCHYARD_FLAGS_FILE")]
        file: String,
    },
    /// Print one flag's definition (no name: the whole document).
    Get { name: Option<String> },
    /// The flags, their state, variants and default variant.
    List,
    /// Set a flag's state to ENABLED.
    Enable { name: String },
    /// Set a flag's state to DISABLED (it then resolves to the caller's code default).
    Disable { name: String },
    /// Remove a flag.
    Remove { name: String },
    /// The recorded documents, oldest first.
    History,
    /// Restore an earlier document (default: the one before the current).
    Rollback {
        #[arg(long, env = "SWITCHYARD_FLAGS_TO_REVISION", default_value_t = 0)]
        to_revision: u64,
    },
    /// Evaluate a flag for a context, as a sidecar would.
    Eval {
        name: String,
        /// Context attributes: KEY=VALUE, VALUE read as JSON when it parses (numbers,
        /// true/false), else as a string. `targetingKey=...` sets the targeting key;
        /// `$switchyard.version=2.0.0` (and `.service`, `.zone`) stand for a sidecar's facts.
        #[arg(long = "context", short = 'c', value_name = "KEY=VALUE")]
        context: Vec<String>,
    },
}

fn read_file(path: &str) -> Result<String, CliError> {
    // read_value takes `@path` for a file and `-` for stdin.
    let arg = if path == "-" {
        "-".to_string()
    } else {
        format!("@{path}")
    };
    let bytes = super::kv::read_value(Some(&arg))?;
    String::from_utf8(bytes)
        .map_err(|_| CliError::new(EXIT_CONFIG, format!("{path} is not UTF-8 JSON")))
}

/// `KEY=VALUE` pairs into a context and the sidecar facts.
fn context(
    pairs: &[String],
) -> Result<
    (
        serde_json::Map<String, serde_json::Value>,
        Option<serde_json::Value>,
    ),
    CliError,
> {
    let mut ctx = serde_json::Map::new();
    let mut facts = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p.split_once('=').ok_or_else(|| {
            CliError::new(EXIT_CONFIG, format!("--context {p:?} is not KEY=VALUE"))
        })?;
        let value =
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        match k.strip_prefix("$switchyard.") {
            Some(fact) => {
                facts.insert(fact.to_string(), value);
            }
            None => {
                ctx.insert(k.to_string(), value);
            }
        }
    }
    Ok((
        ctx,
        (!facts.is_empty()).then_some(serde_json::Value::Object(facts)),
    ))
}

fn changed(output: Output, what: String, f: &pb::FlagsResponse) -> Result<(), CliError> {
    let revision = f.flags.as_ref().map_or(0, |d| d.revision);
    match output {
        Output::Json => print_json(&serde_json::json!({ "result": what, "revision": revision })),
        Output::Table => {
            println!("{what} (revision {revision})");
            Ok(())
        }
    }
}

pub async fn run(args: FlagsArgs) -> Result<(), CliError> {
    use pb::put_flags_request::Change;
    let mut client = ConfigClient::new(channel(&args.registry.registry).await?);
    let (namespace, output) = (args.namespace, args.output.output);
    let put = |change: Change| pb::PutFlagsRequest {
        namespace: namespace.clone(),
        change: Some(change),
        expected_revision: None,
    };
    let current = |client: &mut ConfigClient<super::client::AuthChannel>| {
        let namespace = namespace.clone();
        let mut client = client.clone();
        async move {
            let r = client
                .get_flags(pb::GetFlagsRequest { namespace })
                .await
                .map_err(|e| status_error("cannot read the flags", e))?
                .into_inner();
            let doc = r.flags.unwrap_or_default();
            let set = FlagSet::parse(&doc.document)
                .map_err(|e| CliError::new(1, format!("the registry's flags do not parse here ({e}): use a CLI of the registry's release")))?;
            Ok::<_, CliError>((set, doc.revision))
        }
    };
    match args.verb {
        FlagsVerb::Set { name, file } => {
            let definition = read_file(&file)?;
            let r = client
                .put_flags(put(Change::Set(pb::FlagDefinition {
                    key: name.clone(),
                    definition,
                })))
                .await
                .map_err(|e| status_error("cannot set the flag", e))?
                .into_inner();
            changed(output, format!("set {name}"), &r)
        }
        FlagsVerb::Import { file } => {
            let document = read_file(&file)?;
            let r = client
                .put_flags(put(Change::Import(document)))
                .await
                .map_err(|e| status_error("cannot import the flags", e))?
                .into_inner();
            changed(output, format!("imported {file}"), &r)
        }
        FlagsVerb::Enable { name } => {
            let r = client
                .put_flags(put(Change::State(pb::FlagState {
                    key: name.clone(),
                    enabled: true,
                })))
                .await
                .map_err(|e| status_error("cannot enable the flag", e))?
                .into_inner();
            changed(output, format!("enabled {name}"), &r)
        }
        FlagsVerb::Disable { name } => {
            let r = client
                .put_flags(put(Change::State(pb::FlagState {
                    key: name.clone(),
                    enabled: false,
                })))
                .await
                .map_err(|e| status_error("cannot disable the flag", e))?
                .into_inner();
            changed(output, format!("disabled {name}"), &r)
        }
        FlagsVerb::Remove { name } => {
            let r = client
                .put_flags(put(Change::Remove(name.clone())))
                .await
                .map_err(|e| status_error("cannot remove the flag", e))?
                .into_inner();
            changed(output, format!("removed {name}"), &r)
        }
        FlagsVerb::Rollback { to_revision } => {
            let r = client
                .rollback_flags(pb::RollbackFlagsRequest {
                    namespace: namespace.clone(),
                    to_revision,
                })
                .await
                .map_err(|e| status_error("cannot roll the flags back", e))?
                .into_inner();
            changed(output, "rolled back".to_string(), &r)
        }
        FlagsVerb::Get { name } => {
            let (set, revision) = current(&mut client).await?;
            let value = match &name {
                Some(n) => set.flag_json(n).ok_or_else(|| {
                    CliError::new(
                        1,
                        format!(
                            "no flag {n:?} in namespace {namespace:?}: see `switchyard flags list`"
                        ),
                    )
                })?,
                None => serde_json::from_str(set.document())
                    .map_err(|e| CliError::new(1, format!("cannot read the document: {e}")))?,
            };
            if output == Output::Table && name.is_none() {
                eprintln!("revision {revision}");
            }
            print_json(&value)
        }
        FlagsVerb::List => {
            let (set, revision) = current(&mut client).await?;
            let rows: Vec<Vec<String>> = set
                .keys()
                .map(|k| {
                    let f = set.flag_json(k).unwrap_or_default();
                    let variants = f
                        .get("variants")
                        .and_then(|v| v.as_object())
                        .map(|m| m.keys().cloned().collect::<Vec<_>>().join(","))
                        .unwrap_or_default();
                    vec![
                        k.to_string(),
                        f.get("state")
                            .and_then(|s| s.as_str())
                            .unwrap_or("")
                            .to_string(),
                        f.get("defaultVariant")
                            .and_then(|s| s.as_str())
                            .unwrap_or("")
                            .to_string(),
                        variants,
                        if f.get("targeting")
                            .is_some_and(|t| !t.is_null() && t != &serde_json::json!({}))
                        {
                            "yes"
                        } else {
                            "no"
                        }
                        .to_string(),
                    ]
                })
                .collect();
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "revision": revision,
                    "flags": rows.iter().map(|r| serde_json::json!({
                        "key": r[0], "state": r[1], "defaultVariant": r[2], "variants": r[3].split(',').filter(|s| !s.is_empty()).collect::<Vec<_>>(), "targeting": r[4] == "yes",
                    })).collect::<Vec<_>>(),
                })),
                Output::Table => {
                    if rows.is_empty() {
                        eprintln!("no flags in namespace {namespace:?}: add one with `switchyard flags set NAME --file F`");
                        return Ok(());
                    }
                    print_table(
                        &["FLAG", "STATE", "DEFAULT", "VARIANTS", "TARGETING"],
                        &rows,
                    );
                    Ok(())
                }
            }
        }
        FlagsVerb::History => {
            let r = client
                .flag_history(pb::FlagHistoryRequest { namespace })
                .await
                .map_err(|e| status_error("cannot read the flag history", e))?
                .into_inner();
            match output {
                Output::Json => print_json(
                    &r.records
                        .iter()
                        .map(|c| serde_json::json!({
                            "revision": c.revision, "at_ms": c.at_ms, "action": c.action,
                            "document": serde_json::from_str::<serde_json::Value>(&c.document).unwrap_or_default(),
                        }))
                        .collect::<Vec<_>>(),
                ),
                Output::Table => {
                    let rows: Vec<Vec<String>> = r
                        .records
                        .iter()
                        .map(|c| {
                            let flags = FlagSet::parse(&c.document).map(|s| s.keys().collect::<Vec<_>>().join(",")).unwrap_or_default();
                            vec![c.revision.to_string(), c.action.clone(), flags]
                        })
                        .collect();
                    print_table(&["REVISION", "ACTION", "FLAGS"], &rows);
                    Ok(())
                }
            }
        }
        FlagsVerb::Eval {
            name,
            context: pairs,
        } => {
            let (set, revision) = current(&mut client).await?;
            let (ctx, facts) = context(&pairs)?;
            match set.evaluate(&name, &ctx, facts.as_ref()) {
                Ok(e) => match output {
                    Output::Json => print_json(&serde_json::json!({
                        "key": name, "value": e.value, "variant": e.variant,
                        "reason": e.reason.as_str(), "revision": revision,
                    })),
                    Output::Table => {
                        println!(
                            "{name} = {} (variant {:?}, {})",
                            e.value, e.variant, e.reason
                        );
                        Ok(())
                    }
                },
                Err(e) => Err(CliError::new(1, format!("{name}: {} ({e})", e.code()))),
            }
        }
    }
}
