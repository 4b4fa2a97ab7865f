//! `switchyard kv get|put|delete|list`: the replicated KV store (Consul's `consul kv`).
//!
//! A value comes from the argument, from a file (`@path`), or from stdin (`-`, or no
//! value at all). `get` of one key prints the value itself (as `consul kv get` does);
//! with `--recurse`, or with `-o json`, it prints the entries.

use std::io::Read;

use base64::Engine as _;
use clap::{Args, Subcommand};
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::config_client::ConfigClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::{CliError, Output};

/// Largest value read from a file or stdin (the registry's own bound).
const MAX_VALUE_BYTES: usize = 512 * 1024;

#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(subcommand)]
    pub verb: KvVerb,
    /// The namespace of the keys.
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
pub enum KvVerb {
    /// Print a key's value (with --recurse: every entry under the prefix).
    Get {
        key: String,
        #[arg(long, env = "SWITCHYARD_KV_RECURSE", default_value_t = false)]
        recurse: bool,
    },
    /// Write a key. VALUE, @FILE, or - (and no value) for stdin.
    Put {
        key: String,
        value: Option<String>,
        /// An opaque number stored with the value (Consul's flags).
        #[arg(long, env = "SWITCHYARD_KV_FLAGS", default_value_t = 0)]
        flags: u64,
        /// Write only if the key's modify revision is N (0: only if it does not exist).
        #[arg(long, env = "SWITCHYARD_KV_CAS")]
        cas: Option<u64>,
    },
    /// Delete a key (with --recurse: every key starting with it).
    Delete {
        key: String,
        #[arg(long, env = "SWITCHYARD_KV_RECURSE", default_value_t = false)]
        recurse: bool,
        /// Delete only if the key's modify revision is N.
        #[arg(long, env = "SWITCHYARD_KV_CAS")]
        cas: Option<u64>,
    },
    /// List the keys under a prefix (every key when none).
    List {
        #[arg(default_value = "")]
        prefix: String,
    },
}

/// The value to write: the argument, a file's bytes (`@path`) or stdin's (`-`/none).
pub fn read_value(value: Option<&str>) -> Result<Vec<u8>, CliError> {
    let from_stdin = || -> Result<Vec<u8>, CliError> {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(MAX_VALUE_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| CliError::new(1, format!("cannot read the value from stdin: {e}")))?;
        Ok(buf)
    };
    let bytes = match value {
        None | Some("-") => from_stdin()?,
        Some(v) => match v.strip_prefix('@') {
            Some(path) => std::fs::read(path).map_err(|e| {
                CliError::new(super::EXIT_CONFIG, format!("cannot read {path}: {e}"))
            })?,
            None => v.as_bytes().to_vec(),
        },
    };
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(CliError::new(
            super::EXIT_CONFIG,
            format!("the value is larger than {MAX_VALUE_BYTES} bytes (the registry's limit)"),
        ));
    }
    Ok(bytes)
}

fn entry_json(e: &pb::KvEntry) -> serde_json::Value {
    let text = std::str::from_utf8(&e.value).ok();
    serde_json::json!({
        "key": e.key,
        "flags": e.flags,
        "create_revision": e.create_revision,
        "modify_revision": e.modify_revision,
        "value": text,
        "value_base64": base64::engine::general_purpose::STANDARD.encode(&e.value),
    })
}

fn shown(value: &[u8]) -> String {
    match std::str::from_utf8(value) {
        Ok(s) if s.chars().count() <= 60 => s.replace('\n', "\\n"),
        Ok(s) => format!(
            "{}…",
            s.chars().take(60).collect::<String>().replace('\n', "\\n")
        ),
        Err(_) => format!("({} bytes, binary)", value.len()),
    }
}

fn written(output: Output, verb: &str, key: &str, r: pb::KvWriteResponse) -> Result<(), CliError> {
    match output {
        Output::Json => print_json(&serde_json::json!({
            "key": key, "applied": r.applied, "revision": r.revision,
        }))?,
        Output::Table if r.applied => println!("{verb} {key} (revision {})", r.revision),
        Output::Table => {}
    }
    if r.applied {
        Ok(())
    } else {
        Err(CliError::new(
            1,
            format!(
                "{key} changed since that revision (--cas did not match): read it again and retry"
            ),
        ))
    }
}

pub async fn run(args: KvArgs) -> Result<(), CliError> {
    let mut client = ConfigClient::new(channel(&args.registry.registry).await?);
    let (namespace, output) = (args.namespace, args.output.output);
    match args.verb {
        KvVerb::Get {
            key,
            recurse: false,
        } => {
            let r = client
                .get(pb::KvGetRequest {
                    namespace,
                    key: key.clone(),
                })
                .await
                .map_err(|e| status_error("cannot read the key", e))?
                .into_inner();
            let Some(e) = r.entry else {
                return Err(CliError::new(1, format!("{key} does not exist")));
            };
            match output {
                Output::Json => print_json(&entry_json(&e)),
                Output::Table => {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&e.value)
                        .and_then(|()| {
                            if e.value.ends_with(b"\n") {
                                Ok(())
                            } else {
                                out.write_all(b"\n")
                            }
                        })
                        .map_err(|e| CliError::new(1, format!("cannot write the value: {e}")))
                }
            }
        }
        KvVerb::Get { key, recurse: true } => {
            let r = client
                .list(pb::KvListRequest {
                    namespace,
                    prefix: key,
                    keys_only: false,
                })
                .await
                .map_err(|e| status_error("cannot list the keys", e))?
                .into_inner();
            match output {
                Output::Json => print_json(&r.entries.iter().map(entry_json).collect::<Vec<_>>()),
                Output::Table => {
                    let rows: Vec<Vec<String>> = r
                        .entries
                        .iter()
                        .map(|e| {
                            vec![
                                e.key.clone(),
                                e.modify_revision.to_string(),
                                e.flags.to_string(),
                                shown(&e.value),
                            ]
                        })
                        .collect();
                    print_table(&["KEY", "REVISION", "FLAGS", "VALUE"], &rows);
                    Ok(())
                }
            }
        }
        KvVerb::Put {
            key,
            value,
            flags,
            cas,
        } => {
            let value = read_value(value.as_deref())?;
            let r = client
                .put(pb::KvPutRequest {
                    namespace,
                    key: key.clone(),
                    value,
                    flags,
                    cas,
                })
                .await
                .map_err(|e| status_error("cannot write the key", e))?
                .into_inner();
            written(output, "wrote", &key, r)
        }
        KvVerb::Delete { key, recurse, cas } => {
            let r = client
                .delete(pb::KvDeleteRequest {
                    namespace,
                    key: key.clone(),
                    recurse,
                    cas,
                })
                .await
                .map_err(|e| status_error("cannot delete the key", e))?
                .into_inner();
            written(output, "deleted", &key, r)
        }
        KvVerb::List { prefix } => {
            let r = client
                .list(pb::KvListRequest {
                    namespace,
                    prefix,
                    keys_only: true,
                })
                .await
                .map_err(|e| status_error("cannot list the keys", e))?
                .into_inner();
            match output {
                Output::Json => print_json(&r.entries.iter().map(|e| &e.key).collect::<Vec<_>>()),
                Output::Table => {
                    for e in &r.entries {
                        println!("{}", e.key);
                    }
                    Ok(())
                }
            }
        }
    }
}
