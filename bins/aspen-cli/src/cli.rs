//! The command-line grammar: every command and option with its help text.

use std::path::PathBuf;

use aspen_api::limits::{MAX_SCAN_LIMIT, MAX_SQL_ROWS, MAX_SQL_TIMEOUT_MS};
use aspen_api::{Right, Secret};
use clap::{ArgGroup, Args, Parser, Subcommand};

/// Exit status when a command worked.
pub const EXIT_OK: u8 = 0;
/// Exit status when the operation failed (unreachable cluster, rejected request, ...).
pub const EXIT_ERROR: u8 = 1;
/// Exit status when `kv get` found no such key.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit status when a write may or may not have been applied (the client gave up).
pub const EXIT_OUTCOME_UNKNOWN: u8 = 4;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (a transaction whose compares failed still exits 0; see `succeeded`)
  1  the operation failed; `error: ...` on stderr (and {\"error\": ...} on stdout with --json)
  2  usage error
  3  `kv get`: the key does not exist
  4  a write's outcome is unknown: it may or may not have been applied (read the key to
     find out before writing again)";

/// Command-line client for Aspen, a replicated, linearizable key-value store.
#[derive(Debug, Parser)]
#[command(
    name = "aspen-cli",
    version,
    about = "Command-line client for Aspen: read and write keys, run transactions and SQL, \
             administer a cluster, or start a local dev cluster.",
    long_about = "Command-line client for Aspen: read and write keys, run transactions and SQL, \
                  administer a cluster, or start a local dev cluster.\n\n\
                  Which cluster: --peers (or ASPEN_PEERS) if given, else the cluster.env file in \
                  --cluster-dir, else ./aspen-dev/cluster.env as written by `aspen-cli dev`.\n\n\
                  Which token: the data token (--token-file FILE, ASPEN_TOKEN, or the cluster dir's \
                  `token` file) reads and writes keys; the admin token (--admin-token-file FILE, \
                  ASPEN_ADMIN_TOKEN, or the cluster dir's `admin-token` file) also administers the \
                  cluster. A command uses the token it needs if given, else the other one. Keep \
                  tokens in files only you can read (mode 0600) or in the variables: --token and \
                  --admin-token put a token on the command line, where every user of the machine \
                  can read it.\n\n\
                  Quick start:\n  \
                  aspen-cli dev                 # in one terminal: a 3-node cluster in ./aspen-dev\n  \
                  aspen-cli kv put hello world  # in another terminal, same directory\n  \
                  aspen-cli kv get hello",
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// How to reach the cluster.
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the cluster is and how to authenticate.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct ConnectionArgs {
    /// Comma-separated node addresses (<endpoint-id>@<ip:port> or tickets); any subset of
    /// the cluster's nodes works.
    #[arg(long, env = "ASPEN_PEERS", global = true, value_name = "ADDRS")]
    pub peers: Option<String>,
    /// File holding the data token (client_token on the nodes), which reads and writes keys;
    /// keep it mode 0600 (a file others can read gets a warning) [default: the cluster dir's
    /// `token` file].
    #[arg(long, env = "ASPEN_TOKEN_FILE", global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding the admin token (admin_token on the nodes), needed by cluster init,
    /// add-learner, promote, remove, snapshot and transfer-leader; mode 0600 [default: the
    /// cluster dir's `admin-token` file].
    #[arg(long, env = "ASPEN_ADMIN_TOKEN_FILE", global = true, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The data token itself. Prefer --token-file or ASPEN_TOKEN: a command line is visible
    /// to every user of the machine (`ps`).
    #[arg(long, env = "ASPEN_TOKEN", global = true, hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<Secret>,
    /// The admin token itself. Prefer --admin-token-file or ASPEN_ADMIN_TOKEN: a command
    /// line is visible to every user of the machine (`ps`).
    #[arg(long, env = "ASPEN_ADMIN_TOKEN", global = true, hide_env_values = true, value_name = "TOKEN")]
    pub admin_token: Option<Secret>,
    /// Directory holding a cluster.env (ASPEN_PEERS=...) and the `token` and `admin-token`
    /// files, as written by `aspen-cli dev`; used when --peers is not given [default:
    /// ./aspen-dev if it has one].
    #[arg(long, env = "ASPEN_CLUSTER_DIR", global = true, value_name = "DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// How long a command may take: it retries through leader elections and unreachable
    /// nodes until then, and waits for an answer no longer (each attempt gets at least
    /// 500 ms, so a command can overrun by about a second). A write given up on after an
    /// attempt that may have applied it exits 4 (outcome unknown).
    #[arg(long, global = true, default_value_t = 15, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_secs: u64,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read and write keys: get, put, delete, scan, txn.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Run one read-only SELECT over the `kv` view
    /// (columns: key, value, create_revision, mod_revision, version, lease).
    #[command(long_about = "Run one read-only SELECT over the `kv` view \
        (columns: key, value, create_revision, mod_revision, version, lease).\n\n\
        key and value are BLOBs, so compare them with blobs: \
        WHERE key = CAST('greeting' AS BLOB) (uses the key index), or CAST(value AS TEXT) LIKE 'h%'.\n\n\
        Example:\n  aspen-cli sql \"SELECT key, value, version FROM kv WHERE key >= CAST('app/' AS BLOB) LIMIT 10\"")]
    Sql(SqlArgs),
    /// Inspect and administer cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Start a local cluster of aspen-node processes; runs until Ctrl-C.
    #[command(long_about = "Start a local cluster of aspen-node processes and keep it running until \
    Ctrl-C or SIGTERM, then stop the nodes cleanly.\n\n\
    Node i listens on 127.0.0.1:(BASE_PORT+i-1), serves metrics on 127.0.0.1:(BASE_PORT+100+i-1) \
    and keeps its data and node.log in DATA_DIR/node-i. The cluster is initialized on first start; \
    restarting on the same data dir reuses it. A new cluster gets a random cluster secret, data \
    token and admin token, in DATA_DIR/secret, DATA_DIR/token and DATA_DIR/admin-token (mode \
    0600; the nodes read them from there, so no secret is on any command line). The peers are \
    written to DATA_DIR/cluster.env. Other aspen-cli commands run from the directory holding \
    DATA_DIR, or given --cluster-dir DATA_DIR, find both.")]
    Dev(DevArgs),
}

impl Command {
    /// Whether the command writes keys (a transaction counts, whatever its branches hold).
    pub fn writes(&self) -> bool {
        matches!(self, Command::Kv(KvCommand::Put { .. } | KvCommand::Delete { .. } | KvCommand::Txn(_)))
    }
}

/// Key-value commands. Keys and values are UTF-8 text; results show bytes that are not
/// UTF-8 as 0x-prefixed hex.
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Read one key (exit code 3 when it does not exist).
    #[command(after_help = EXIT_CODES_HELP)]
    Get {
        /// The key.
        key: String,
        /// Serve from the contacted node's state machine (faster, may lag the leader).
        #[arg(long)]
        stale: bool,
    },
    /// Set a key to a value.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Attach the key to an existing lease; the key is removed when the lease ends.
        #[arg(long, value_name = "ID")]
        lease: Option<u64>,
    },
    /// Delete one key, or every key under a prefix.
    Delete {
        /// The key (or the prefix with --prefix).
        key: String,
        /// Delete every key that starts with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// List keys in order: all, under a prefix, or in [--from, --to).
    Scan(ScanArgs),
    /// Run a transaction: compares, then one branch of operations, atomically.
    #[command(long_about = "Run a transaction: compares, then one branch of operations, atomically.\n\n\
            Syntax (keywords case-insensitive, `#` comments, strings in double quotes with \
            \\\" \\\\ \\n \\t \\xHH escapes):\n\n  \
            if version(\"k\") == 0 and value(\"a\") != \"x\" and mod_revision(\"b\") > 5\n  \
            then put \"k\" \"v\"; get \"a\"\n  \
            else get \"k\"; delete \"b\"\n\n\
            Compares: value(KEY) against a string; version, create_revision, mod_revision \
            against a number; with ==, !=, < or >. A missing key has version and revisions 0.\n\
            Operations: put KEY VALUE, get KEY, delete KEY, delete-prefix PREFIX.\n\
            Without `if` the operations always run (`then` is optional) and there is no `else`.")]
    Txn(TxnArgs),
}

/// Options of `kv scan`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Only keys starting with this prefix.
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub prefix: Option<String>,
    /// First key of the range (inclusive).
    #[arg(long, value_name = "KEY")]
    pub from: Option<String>,
    /// End of the range (exclusive).
    #[arg(long, value_name = "KEY")]
    pub to: Option<String>,
    /// Most keys to return.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=MAX_SCAN_LIMIT as i64))]
    pub limit: u32,
    /// Show keys and revisions without values.
    #[arg(long)]
    pub keys_only: bool,
    /// Print only the number of matching keys.
    #[arg(long, conflicts_with_all = ["keys_only", "after"])]
    pub count: bool,
    /// Continue after this key: the token printed when more keys remain (0x-hex, or plain text).
    #[arg(long, value_name = "TOKEN")]
    pub after: Option<String>,
    /// Serve from the contacted node's state machine (faster, may lag the leader).
    #[arg(long)]
    pub stale: bool,
}

/// Options of `kv txn`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["spec", "file"])))]
pub struct TxnArgs {
    /// The transaction text, or `-` to read it from stdin.
    pub spec: Option<String>,
    /// Read the transaction text from this file (`-` for stdin).
    #[arg(long, short, value_name = "FILE")]
    pub file: Option<PathBuf>,
}

/// Options of `sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// One SELECT statement (quote it for the shell), or `-` to read it from stdin.
    pub query: String,
    /// Most rows to return; the output says when more existed.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=MAX_SQL_ROWS as i64))]
    pub limit: u32,
    /// Longest the query may run on the node, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_SQL_TIMEOUT_MS))]
    pub timeout_ms: u64,
    /// Serve from the contacted node's state machine (faster, may lag the leader).
    #[arg(long)]
    pub stale: bool,
}

/// Cluster administration commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Status of every configured node: id, role, term, leader, log and apply progress.
    Status,
    /// Initialize a new cluster whose voters are all the configured nodes.
    Init,
    /// Add a node as a learner (it replicates without voting; promote it afterwards).
    AddLearner {
        /// The new node's id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        /// Its address, <endpoint-id>@<ip:port> or a ticket (see its DATA_DIR/node.addr).
        addr: String,
    },
    /// Make a learner a voter (the current voters plus ID).
    Promote {
        /// The learner's id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Build a snapshot now on the node that answers.
    Snapshot,
    /// Hand leadership to another voter.
    TransferLeader {
        /// The voter that should lead.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
    /// Print a node's Prometheus metrics.
    Metrics {
        /// The node to ask [default: the first configured node].
        #[arg(long, value_name = "ADDR")]
        node: Option<String>,
    },
}

impl ClusterCommand {
    /// The right the command needs: status and metrics read, the others administer.
    pub fn right(&self) -> Right {
        match self {
            ClusterCommand::Status | ClusterCommand::Metrics { .. } => Right::Data,
            ClusterCommand::Init
            | ClusterCommand::AddLearner { .. }
            | ClusterCommand::Promote { .. }
            | ClusterCommand::Remove { .. }
            | ClusterCommand::Snapshot
            | ClusterCommand::TransferLeader { .. } => Right::Admin,
        }
    }
}

/// Options of `dev`. Its secret and tokens are made up per cluster, never options.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=7))]
    pub nodes: u8,
    /// Directory for the nodes' data and logs, cluster.env and the secret and token files.
    #[arg(long, default_value = "./aspen-dev", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Port of node 1; node i uses BASE_PORT+i-1, its metrics BASE_PORT+100+i-1.
    #[arg(long, default_value_t = 7101, value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1024..=65000))]
    pub base_port: u16,
    /// The aspen-node binary [default: next to aspen-cli, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub node_bin: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn txn_needs_a_spec_or_a_file_and_scan_prefix_excludes_a_range() {
        let usage_errors: &[&[&str]] = &[
            &["aspen-cli", "kv", "txn"],
            &["aspen-cli", "kv", "scan", "--prefix", "a", "--from", "b"],
            &["aspen-cli", "kv", "scan", "--limit", "0"],
            &["aspen-cli", "dev", "--nodes", "8"],
            &["aspen-cli", "cluster", "promote", "0"],
        ];
        for args in usage_errors {
            assert!(Cli::try_parse_from(*args).is_err(), "{args:?}");
        }
        let cli = Cli::try_parse_from(["aspen-cli", "--json", "kv", "txn", "-f", "t.txt"]).expect("parses");
        assert!(cli.json);
        assert!(matches!(cli.command, Command::Kv(KvCommand::Txn(TxnArgs { spec: None, file: Some(_) }))));
    }

    #[test]
    fn global_options_work_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["aspen-cli", "kv", "get", "k", "--token", "t", "--admin-token", "a"]).expect("parses");
        assert_eq!(cli.connection.token.as_ref().map(Secret::expose), Some("t"));
        assert_eq!(cli.connection.admin_token.as_ref().map(Secret::expose), Some("a"));
        assert!(!format!("{cli:?}").contains("\"t\""), "Debug shows no token: {cli:?}");
        let cli = Cli::try_parse_from(["aspen-cli", "kv", "get", "k", "--json", "--peers", "p"]).expect("parses");
        assert!(cli.json);
        assert_eq!(cli.connection.peers.as_deref(), Some("p"));
    }
}
