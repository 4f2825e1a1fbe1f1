//! `cmq`: the command-line client of cmqd. See `cmq --help`.
//!
//! Every command makes one or two calls through [`cmqd::client`] and renders the result twice
//! over: readable text (the default) and one JSON document on stdout (`--json`), so scripts can
//! rely on the latter while the former is free to change. Exit codes: 0 success, 1 error,
//! 2 usage error, 3 "no message" (an empty receive).

mod cli;
mod cluster;
mod message;
mod outcome;
mod queue;
mod render;
mod subscription;
mod topic;

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

use cmqd::client::{Account, ClientConfig, QueueAttributeSet, SubscriptionAttributeSet};
use cmqd::clock::{Clock, SystemClock};
use cmqd::config;

use crate::cli::{
    Cli, ClusterCommand, Command, GlobalOptions, QueueCommand, SubCommand, TopicCommand,
};
use crate::message::{consume, delete, peek, receive, send};
use crate::outcome::{CliError, Outcome};
use crate::queue::queue_command;
use crate::render::{format_time, plural};
use crate::subscription::sub_command;
use crate::topic::topic_command;

/// Exit code of a failed command.
pub(crate) const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (clap uses the same).
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code of a receive that got no message (CMQ code 7000).
pub(crate) const EXIT_NO_MESSAGE: u8 = 3;

/// Where a broker started with no configured account saves its generated credentials.
const DEFAULT_DATA_DIR: &str = "./cmqd-data";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_output = cli.global.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return report_error(
                &CliError::Local(format!("cannot start the runtime: {error}")),
                json_output,
            )
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(outcome) => {
            let mut stdout = std::io::stdout().lock();
            let written = if json_output {
                writeln!(stdout, "{}", outcome.json)
            } else if outcome.text.is_empty() {
                Ok(())
            } else {
                writeln!(stdout, "{}", outcome.text.trim_end_matches('\n'))
            };
            match written.and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::from(outcome.exit),
                // A closed pipe (`cmq ... | head`) is not worth a message.
                Err(_) => ExitCode::from(EXIT_ERROR),
            }
        }
        Err(error) => report_error(&error, json_output),
    }
}

fn report_error(error: &CliError, json_output: bool) -> ExitCode {
    eprint!("error: {error}\n{}", error.details());
    if json_output {
        println!("{}", error.to_json());
    }
    ExitCode::from(error.exit_code())
}

/// The credentials to use: explicit id and key, else a credentials file.
fn credentials(global: &GlobalOptions) -> Result<(String, String), CliError> {
    match (&global.secret_id, &global.secret_key) {
        (Some(id), Some(key)) => return Ok((id.clone(), key.clone())),
        (Some(_), None) => {
            return Err(CliError::Usage(
                "--secret-id needs --secret-key (or CMQ_SECRET_KEY) too".to_string(),
            ))
        }
        (None, Some(_)) => {
            return Err(CliError::Usage(
                "--secret-key needs --secret-id (or CMQ_SECRET_ID) too".to_string(),
            ))
        }
        (None, None) => {}
    }
    let default_path = Path::new(DEFAULT_DATA_DIR).join(config::CREDENTIALS_FILE);
    let path = match &global.credentials {
        Some(path) => path.clone(),
        None if default_path.is_file() => default_path,
        None => {
            return Err(CliError::Local(format!(
                "no credentials: pass --secret-id and --secret-key (or set CMQ_SECRET_ID and \
                 CMQ_SECRET_KEY), or --credentials FILE (CMQ_CREDENTIALS); by default cmq reads \
                 {}, which a broker started in this directory with no configured account writes",
                default_path.display()
            )))
        }
    };
    let account = config::read_credentials(&path).map_err(|e| CliError::Local(e.to_string()))?;
    Ok((account.secret_id, account.secret_key))
}

async fn connect(global: &GlobalOptions) -> Result<Account, CliError> {
    let (secret_id, secret_key) = credentials(global)?;
    let mut client_config = ClientConfig::default()
        .persistent_connection(true)
        .client_name(concat!("cmq/", env!("CARGO_PKG_VERSION")));
    if let Some(timeout) = global.timeout {
        client_config = client_config
            .connect_timeout(timeout)
            .request_timeout(timeout);
    }
    if let Some(ca) = &global.tls_ca {
        let client_cert = match (&global.tls_cert, &global.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        let tls = cmqd::tls::client_config(ca, client_cert)
            .map_err(|e| CliError::Local(e.to_string()))?;
        let host = global
            .endpoint
            .rsplit_once(':')
            .map_or(global.endpoint.as_str(), |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = global.tls_server_name.as_deref().unwrap_or(host);
        client_config = client_config.tls(tls, name)?;
    } else if global.tls_cert.is_some() {
        return Err(CliError::Usage(
            "--tls-cert needs --tls-ca (the CA to verify the broker against)".to_string(),
        ));
    }
    Ok(Account::connect(&global.endpoint, &secret_id, &secret_key, client_config).await?)
}

async fn run(cli: Cli) -> Result<Outcome, CliError> {
    // Check what can be checked before connecting.
    let stdin_body = match &cli.command {
        Command::Send { bodies, .. } | Command::Topic(TopicCommand::Publish { bodies, .. }) => {
            read_stdin_body(bodies)?
        }
        _ => None,
    };
    if let Command::Sub(SubCommand::Set { options, .. }) = &cli.command {
        if options.to_set() == SubscriptionAttributeSet::default() {
            return Err(CliError::Usage(
                "nothing to change: give at least one flag (see cmq sub set --help)".to_string(),
            ));
        }
    }
    if let Command::Queue(QueueCommand::Set {
        attributes,
        no_dead_letter: false,
        ..
    }) = &cli.command
    {
        if attributes.to_set() == QueueAttributeSet::default() {
            return Err(CliError::Usage(
                "nothing to change: give at least one attribute flag (see cmq queue set --help)"
                    .to_string(),
            ));
        }
    }
    let account = connect(&cli.global).await?;
    match cli.command {
        Command::Queue(command) => queue_command(&account, command).await,
        Command::Topic(command) => topic_command(&account, command, stdin_body).await,
        Command::Sub(command) => sub_command(&account, command).await,
        Command::Cluster(ClusterCommand::Status) => cluster::status(&account).await,
        Command::Send {
            queue,
            bodies,
            delay,
        } => {
            let bodies: Vec<Vec<u8>> = bodies
                .into_iter()
                .map(|body| match (&stdin_body, body.as_str()) {
                    (Some(stdin), "-") => stdin.clone(),
                    _ => body.into_bytes(),
                })
                .collect();
            send(&account.queue(&queue), bodies, delay).await
        }
        Command::Receive {
            queue,
            wait,
            count,
            delete,
        } => receive(&account.queue(&queue), wait, count, delete).await,
        Command::Consume {
            queue,
            count,
            credit,
            ack,
        } => consume(&account.queue(&queue), count, credit, ack, cli.global.json).await,
        Command::Delete { queue, handles } => delete(&account.queue(&queue), &handles).await,
        Command::ChangeVisibility {
            queue,
            handle,
            seconds,
        } => {
            account
                .queue(&queue)
                .change_message_visibility(&handle, seconds)
                .await?;
            Ok(Outcome::new(
                format!("message invisible for {seconds} s from now"),
                json!({"queue": queue, "receipt_handle": handle, "visibility_timeout_seconds": seconds}),
            ))
        }
        Command::Peek { queue, count } => peek(&account.queue(&queue), count).await,
        Command::Purge { queue } => {
            let count = account.queue(&queue).purge().await?;
            Ok(Outcome::new(
                format!("purged {}", plural(count, "message")),
                json!({"queue": queue, "purged": count}),
            ))
        }
        Command::Rewind {
            queue,
            since,
            seconds_ago,
        } => {
            let start = match (since, seconds_ago) {
                (Some(since), _) => since,
                (None, Some(ago)) => (SystemClock::new().now_ms() / 1000).saturating_sub(ago),
                (None, None) => {
                    return Err(CliError::Usage("give --since or --seconds-ago".to_string()))
                }
            };
            let count = account.queue(&queue).rewind(start).await?;
            Ok(Outcome::new(
                format!(
                    "rewound {} (sent since {})",
                    plural(count, "message"),
                    format_time(start.saturating_mul(1000))
                ),
                json!({"queue": queue, "rewound": count, "start_consume_time": start}),
            ))
        }
    }
}

/// Reads stdin once if a body is `-`.
fn read_stdin_body(bodies: &[String]) -> Result<Option<Vec<u8>>, CliError> {
    match bodies.iter().filter(|b| b.as_str() == "-").count() {
        0 => Ok(None),
        1 => {
            let mut body = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut body)
                .map_err(|e| CliError::Local(format!("cannot read stdin: {e}")))?;
            Ok(Some(body))
        }
        _ => Err(CliError::Usage(
            "`-` (a body read from stdin) may be given once".to_string(),
        )),
    }
}
