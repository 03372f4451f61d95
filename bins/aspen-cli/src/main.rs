//! aspen-cli: parse the command line, run one command against the cluster (or start a dev
//! cluster), print the result, and exit with a code scripts can rely on (see `cli`).

mod cli;
mod cluster;
mod connect;
mod dev;
mod kv;
mod output;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aspen_api::Right;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_OK, EXIT_OUTCOME_UNKNOWN};
use crate::connect::{connect, release};

/// How a command that did not fail ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked.
    Done,
    /// The key it read does not exist.
    NotFound,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // Usage errors exit with clap's code 2 here, before anything runs.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    for (id, flag) in [("token", "--token"), ("admin_token", "--admin-token")] {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            tracing::warn!(
                "{flag} puts a token on the command line, where every local user can read it (ps); \
                 use {flag}-file or the ASPEN_* variable"
            );
        }
    }
    let json = cli.json;
    let writes = cli.command.writes();
    match run(cli).await {
        Ok(Outcome::Done) => ExitCode::from(EXIT_OK),
        Ok(Outcome::NotFound) => ExitCode::from(EXIT_NOT_FOUND),
        Err(error) => {
            let message = format!("{error:#}");
            let unknown = outcome_unknown(&error);
            eprintln!("error: {message}");
            if unknown {
                eprintln!(
                    "The write may or may not have been applied: the client gave up before the cluster \
                     answered. Read the key to find out before writing again."
                );
            } else if writes && gave_up(&error) {
                eprintln!(
                    "The write was not applied: no node could take it before the deadline \
                     (--timeout-secs). Running the command again is safe."
                );
            }
            if json {
                // Best effort: the error is already on stderr.
                let _ = output::print_json(&serde_json::json!({ "error": message, "outcome_unknown": unknown }));
            }
            ExitCode::from(if unknown { EXIT_OUTCOME_UNKNOWN } else { EXIT_ERROR })
        }
    }
}

/// Whether `error` says a write's outcome is unknown.
fn outcome_unknown(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<aspen_client::ClientError>(),
            Some(aspen_client::ClientError::Kv(aspen_api::KvError::OutcomeUnknown(_)))
        )
    })
}

/// Whether `error` says the client gave up at its deadline (see `ClientError::Unavailable`;
/// for a write, only when no attempt can have been applied: otherwise the outcome is unknown).
fn gave_up(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| matches!(cause.downcast_ref(), Some(aspen_client::ClientError::Unavailable(_))))
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let deadline = Duration::from_secs(cli.connection.timeout_secs);
    let json = cli.json;
    match cli.command {
        Command::Dev(args) => dev::run(&args, json).await,
        Command::Kv(command) => {
            let client = Arc::new(connect(&cli.connection, Right::Data).await?);
            let outcome = kv::run(&client, command, json).await;
            release(client).await;
            outcome
        }
        Command::Sql(args) => {
            let client = Arc::new(connect(&cli.connection, Right::Data).await?);
            let outcome = kv::sql(&client, args, json).await;
            release(client).await;
            outcome
        }
        Command::Cluster(command) => {
            let client = Arc::new(connect(&cli.connection, command.right()).await?);
            let outcome = cluster::run(Arc::clone(&client), command, json, deadline).await;
            release(client).await;
            outcome
        }
    }
}
