//! `switchyard acl`: bootstrap the ACL system, create, list, read and delete tokens, and
//! ask who a token is. A secret is printed once, by `bootstrap` and `token create`, and
//! nowhere else (not in `token list`, not in errors).

use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use switchyard_proto::v1 as pb;
use switchyard_proto::v1::acl_client::AclClient;

use super::client::{channel, print_json, print_table, status_error, OutputFlag, RegistryFlag};
use super::config::parse_duration;
use super::{CliError, Output};

#[derive(Args, Debug)]
pub struct AclArgs {
    #[command(subcommand)]
    pub verb: AclVerb,
    #[command(flatten)]
    pub registry: RegistryFlag,
    #[command(flatten)]
    pub output: OutputFlag,
}

#[derive(Subcommand, Debug)]
pub enum AclVerb {
    /// Create the first operator token and switch the default to deny (once only). The
    /// secret is printed once: keep it.
    Bootstrap {
        /// What the token is for.
        #[arg(long, env = "SWITCHYARD_ACL_DESCRIPTION", default_value = "")]
        description: String,
    },
    /// Tokens: create, list, read, delete.
    Token {
        #[command(subcommand)]
        verb: TokenVerb,
    },
    /// The calling token (--token) and its rules.
    Whoami,
}

#[derive(Subcommand, Debug)]
pub enum TokenVerb {
    /// Create a token; its secret is printed once.
    Create {
        /// KIND:PATTERN:RIGHTS, repeatable: service:web:register,read,
        /// service:web-*:policy,rollout, service:*:read, kv:config/:read,write,
        /// operator::members,acl,ca.
        #[arg(long = "rule", env = "SWITCHYARD_ACL_RULES", value_delimiter = ';')]
        rules: Vec<String>,
        /// Consul's service identity: register on NAME, read on every service (what a
        /// sidecar needs).
        #[arg(long, env = "SWITCHYARD_ACL_SERVICE_IDENTITY")]
        service_identity: Option<String>,
        #[arg(long, env = "SWITCHYARD_ACL_DESCRIPTION", default_value = "")]
        description: String,
        /// Lifetime (e.g. 720h); 0s: never expires.
        #[arg(long, env = "SWITCHYARD_ACL_TTL", default_value = "0s", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Every token (accessor ids and rules, never secrets).
    List,
    /// One token by accessor id.
    Read { accessor: String },
    /// Delete a token: every registry node refuses it from then on.
    Delete { accessor: String },
}

#[derive(Serialize)]
struct TokenDoc {
    accessor_id: String,
    description: String,
    rules: Vec<String>,
    created_at_ms: u64,
    expires_at_ms: Option<u64>,
}

#[derive(Serialize)]
struct SecretDoc {
    accessor_id: String,
    secret: String,
}

fn doc(t: &pb::TokenInfo) -> TokenDoc {
    TokenDoc {
        accessor_id: t.accessor_id.clone(),
        description: t.description.clone(),
        rules: t.rules.clone(),
        created_at_ms: t.created_at_ms,
        expires_at_ms: (t.expires_at_ms > 0).then_some(t.expires_at_ms),
    }
}

fn print_secret(s: pb::TokenSecret, output: Output) -> Result<(), CliError> {
    let t = s.token.unwrap_or_default();
    match output {
        Output::Json => print_json(&SecretDoc {
            accessor_id: t.accessor_id,
            secret: s.secret,
        }),
        Output::Table => {
            println!("accessor:  {}", t.accessor_id);
            println!("secret:    {}", s.secret);
            println!("rules:     {}", t.rules.join(" "));
            println!("(the secret is shown only now: store it, e.g. as SWITCHYARD_TOKEN)");
            Ok(())
        }
    }
}

fn print_tokens(tokens: &[pb::TokenInfo], output: Output) -> Result<(), CliError> {
    match output {
        Output::Json => print_json(&tokens.iter().map(doc).collect::<Vec<_>>()),
        Output::Table => {
            let rows: Vec<Vec<String>> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.accessor_id.clone(),
                        t.description.clone(),
                        t.rules.join(" "),
                    ]
                })
                .collect();
            print_table(&["ACCESSOR", "DESCRIPTION", "RULES"], &rows);
            Ok(())
        }
    }
}

pub async fn run(args: AclArgs) -> Result<(), CliError> {
    let mut client = AclClient::new(channel(&args.registry.registry).await?);
    let output = args.output.output;
    match args.verb {
        AclVerb::Bootstrap { description } => {
            let s = client
                .bootstrap(pb::BootstrapRequest { description })
                .await
                .map_err(|e| status_error("cannot bootstrap ACLs", e))?
                .into_inner();
            print_secret(s, output)
        }
        AclVerb::Whoami => {
            let t = client
                .who_am_i(pb::WhoAmIRequest {})
                .await
                .map_err(|e| status_error("cannot ask who this token is", e))?
                .into_inner();
            if t.anonymous {
                match output {
                    Output::Json => print_json(&serde_json::json!({
                        "anonymous": true,
                        "acl_enabled": t.acl_enabled,
                        "rules": t.rules,
                    })),
                    Output::Table => {
                        println!("{}", t.description);
                        for rule in &t.rules {
                            println!("  {rule}");
                        }
                        if t.rules.is_empty() && t.acl_enabled {
                            println!("  (none)");
                        }
                        Ok(())
                    }
                }
            } else {
                print_tokens(&[t], output)
            }
        }
        AclVerb::Token { verb } => match verb {
            TokenVerb::Create {
                rules,
                service_identity,
                description,
                ttl,
            } => {
                let s = client
                    .create_token(pb::CreateTokenRequest {
                        description,
                        rules,
                        service_identity: service_identity.unwrap_or_default(),
                        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                    })
                    .await
                    .map_err(|e| status_error("cannot create the token", e))?
                    .into_inner();
                print_secret(s, output)
            }
            TokenVerb::List => {
                let l = client
                    .list_tokens(pb::ListTokensRequest {})
                    .await
                    .map_err(|e| status_error("cannot list tokens", e))?
                    .into_inner();
                print_tokens(&l.tokens, output)
            }
            TokenVerb::Read { accessor } => {
                let t = client
                    .read_token(pb::TokenRef {
                        accessor_id: accessor,
                    })
                    .await
                    .map_err(|e| status_error("cannot read the token", e))?
                    .into_inner();
                print_tokens(&[t], output)
            }
            TokenVerb::Delete { accessor } => {
                client
                    .delete_token(pb::TokenRef {
                        accessor_id: accessor.clone(),
                    })
                    .await
                    .map_err(|e| status_error("cannot delete the token", e))?;
                println!("deleted token {accessor}");
                Ok(())
            }
        },
    }
}
