//! The `synod` command line: parses arguments and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Synod: a replicated command log with WebAssembly plugins.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Action,
    /// Bearer token for the node's API (default: $SYNOD_TOKEN, else the
    /// file $SYNOD_TOKEN_FILE, else the dev cluster's admin token in
    /// ./.synod-dev).
    #[arg(long, global = true, env = "SYNOD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an HTTPS node (default: the dev
    /// cluster's own certificate when `synod dev --tls` made one here).
    #[arg(long, global = true, env = "SYNOD_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// How read commands print: `json` (pretty JSON, the default for a
    /// node's answer) or `table` (the main list as aligned columns).
    /// `synod logs` prints plain lines unless one is asked for; `synod
    /// watch` and `synod device watch` print lines, or JSON lines with `-o
    /// json`.
    #[arg(long, short = 'o', global = true, env = "SYNOD_OUTPUT")]
    output: Option<Output>,
}

/// How [`print`] shows a node's answer.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Json,
    Table,
}

static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// How the CLI reaches nodes: its token and the CA it trusts.
struct Reach {
    token: Option<String>,
    ca: Option<PathBuf>,
}

impl Reach {
    /// A client for `node`: HTTPS when the URL says so, or when it names no
    /// scheme and there is a CA to trust.
    fn client(&self, node: &str) -> anyhow::Result<synod::client::Client> {
        let url = if node.contains("://") {
            node.to_owned()
        } else if self.ca.is_some() {
            format!("https://{node}")
        } else {
            format!("http://{node}")
        };
        let client = synod::client::Client::new(&url).with_token(self.token.clone());
        Ok(match &self.ca {
            Some(ca) if url.starts_with("https://") => client.with_ca(ca)?,
            _ => client,
        })
    }
}

#[derive(Subcommand)]
enum Action {
    /// Run a node.
    Node {
        /// The node's TOML config.
        #[arg(short, long)]
        config: PathBuf,
        /// Override `id`.
        #[arg(long)]
        id: Option<u64>,
        /// Override `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `http` (listen address).
        #[arg(long)]
        http: Option<std::net::SocketAddr>,
        /// Override `p2p` (listen multiaddr).
        #[arg(long)]
        p2p: Option<String>,
    },
    /// Run a three-node cluster on loopback (Ctrl-C stops it).
    Dev {
        /// Where the nodes keep their keys, configs, logs and data.
        #[arg(long, default_value = ".synod-dev")]
        dir: PathBuf,
        /// Serve the API over HTTPS only, with a self-signed certificate
        /// made in <dir>/tls (the CLI trusts it when run from here).
        #[arg(long)]
        tls: bool,
    },
    /// Bearer tokens: who may do what.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Show the audit trail of admin actions (tokens, plugins, membership,
    /// device definitions).
    Audit {
        /// Only records after this operation index.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Find where the members' states parted, if they did: the first
    /// divergent operation and what it did on each node.
    Divergence {
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Change the membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCmd,
    },
    /// Save a backup of the cluster's state (admin): every write acknowledged
    /// before it, every plugin, device and token, checked before it is kept.
    Backup {
        /// The file to write.
        file: PathBuf,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Start a new cluster from a backup: offline, into the empty data dir
    /// of the node `--config` describes; then start that node and add
    /// others as usual.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The new node's config (its data dir must be new).
        #[arg(long)]
        config: PathBuf,
        /// Restore into this data dir instead of the config's (it must be
        /// new; start the node with a config that names it).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Keep the backed-up cluster's network key (refused otherwise):
        /// only when every node of that cluster is gone for good.
        #[arg(long)]
        same_network_key: bool,
    },
    /// Disaster recovery, offline, on a stopped node's data dir: when a
    /// majority of the voters is lost for good, make this node the only
    /// voter of a new cluster that keeps everything in its log; start it,
    /// then add new nodes. Writes that reached only the lost nodes are
    /// gone (it prints the bound).
    Recover {
        /// Required: this rewrites the cluster's membership.
        #[arg(long)]
        force_new_cluster: bool,
        /// The surviving node's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The surviving node's id (default: the `id` in the data dir's
        /// `synod.toml`).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Print the PeerId of the key in a data dir (creating the key).
    NodeId {
        /// The node's data dir.
        data_dir: PathBuf,
    },
    /// Run a command through the cluster: `synod cmd counter increment '{"by":2}'`.
    Cmd {
        /// Plugin name.
        plugin: String,
        /// Command name.
        command: String,
        /// JSON payload.
        #[arg(default_value = "")]
        payload: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Ask a plugin a read-only question.
    Query {
        /// Plugin name.
        plugin: String,
        /// Query name.
        query: String,
        /// JSON payload.
        #[arg(default_value = "")]
        payload: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Follow the cluster live: each operation as it is applied (plugin,
    /// command, caller, result, fuel) and each change of leader or term.
    Watch {
        /// Start with this many of the latest operations.
        #[arg(long, default_value_t = 10)]
        tail: usize,
        /// One JSON object per line (`{"op": …}` or `{"cluster": …}`);
        /// the same as `-o json`.
        #[arg(long)]
        json: bool,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// What a plugin logged while its commands were applied on a node (the
    /// last 2,000 lines each node keeps).
    Logs {
        /// The plugin.
        plugin: String,
        /// How many of the latest lines to show first.
        #[arg(long, short = 'n', default_value_t = 100)]
        limit: usize,
        /// Keep printing new lines as they come (Ctrl-C stops).
        #[arg(long, short = 'f')]
        follow: bool,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Print a shell completion script: `synod completions bash >
    /// /etc/bash_completion.d/synod` (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the HTTP API's OpenAPI 3.1 document (what every node serves
    /// at `/openapi.json`), to generate a client from.
    Openapi,
    /// Show the cluster: leader, members, applied index and digest per node.
    Status {
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCmd,
    },
    /// Print this node's engine fingerprint (what peers compare).
    Engine,
    /// Work with device shadows.
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
    },
    /// Run a device simulator.
    Sim {
        #[command(subcommand)]
        command: SimCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a token; its secret is printed once and stored nowhere.
    Create {
        /// Who will hold it: the `caller` their commands run as.
        principal: String,
        /// A role (repeatable): admin, operator, reader, operator:<plugin>,
        /// reader:<plugin>.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// List tokens (ids, principals, roles; never secrets).
    List {
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Revoke a token by id, or every token of a principal.
    Revoke {
        /// A token id or a principal name.
        target: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Add a running node: its id, key, addresses and engine fingerprint
    /// are read from its /healthz, and the leader refuses it if its engine
    /// differs.
    Add {
        /// The new node's HTTP address.
        new: String,
        /// The leader's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Remove a node by id.
    Remove {
        /// Its id.
        id: u64,
        /// The leader's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
}

#[derive(Subcommand)]
enum SimCmd {
    /// A Modbus TCP server simulating thermostatic rooms (room k: input and
    /// holding register 16k = temperature × 10, coil 16k = heater).
    Modbus {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:5020")]
        listen: std::net::SocketAddr,
        /// Rooms to simulate.
        #[arg(long, default_value_t = 1)]
        devices: usize,
        /// Seed of the rooms' initial temperatures.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Heating rate at full power, °C per second.
        #[arg(long, default_value_t = 0.5)]
        heat_rate: f64,
        /// Cooling rate toward ambient, °C per second.
        #[arg(long, default_value_t = 0.25)]
        cool_rate: f64,
        /// Ambient temperature, °C.
        #[arg(long, default_value_t = 10.0)]
        ambient: f64,
        /// A fault for every room, to try a driver against: `delay:<ms>`,
        /// `drop` (never answer), `exception:<code>` or `disconnect`.
        #[arg(long)]
        fault: Option<String>,
    },
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Create or replace a device definition: `synod device put room-1 '{"driver": "modbus-room", ...}'`
    /// (or `@file.json`).
    Put {
        /// Device id.
        id: String,
        /// The definition (JSON, or `@path`).
        definition: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Show a device's shadow.
    Get {
        /// Device id.
        id: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// List devices.
    List {
        /// Only ids starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Merge a JSON object into a device's desired state (`null` removes a field).
    Desired {
        /// Device id.
        id: String,
        /// The patch.
        patch: String,
        /// Compare-and-set on the document version.
        #[arg(long)]
        expected_version: Option<u64>,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Remove a device.
    Delete {
        /// Device id.
        id: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Print a line each time a device's shadow changes: reported, desired,
    /// owner. Stops after `--count` changes (default: never).
    Watch {
        /// Device id.
        id: String,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
        /// How often to look, ms.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Build a plugin into a component: Rust (Cargo.toml: a crate or a
    /// workspace of them), JavaScript (package.json), Python
    /// (pyproject.toml) or C (Makefile). A missing toolchain is installed
    /// under ~/.cache/synod unless SYNOD_NO_TOOLCHAIN_INSTALL is set.
    Build {
        /// The plugin's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Only this package (repeatable).
        #[arg(short, long = "package")]
        packages: Vec<String>,
        /// Where to write the components (default: <target>/components).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Guest target dir (default: $SYNOD_PLUGIN_TARGET_DIR or target/ of
        /// the guest workspace).
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// Cargo features to enable (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
    },
    /// Write a new plugin that builds and passes its own test
    /// (`synod plugin test`).
    New {
        /// Plugin name (lowercase letters, digits, '-').
        name: String,
        /// rust, js, python or c.
        #[arg(long, default_value = "rust")]
        lang: synod::toolchain::Language,
        /// Where to write it (default: ./<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build a plugin and run its tests.json on a local runtime.
    Test {
        /// The plugin's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Guest target dir (as for `build`).
        #[arg(long)]
        target_dir: Option<PathBuf>,
    },
    /// Upload a component as a new version of a plugin (the first version
    /// of a plugin becomes active at once).
    Push {
        /// The component file.
        file: PathBuf,
        /// Plugin name.
        #[arg(long)]
        name: String,
        /// Version label.
        #[arg(long)]
        version: String,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// List plugins and their versions.
    List {
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Make a version active (hot reload; activate an older one to roll back).
    Activate {
        /// Plugin name.
        name: String,
        /// Version label.
        version: String,
        /// First replay this many recent commands on the version and report.
        #[arg(long)]
        replay: Option<usize>,
        /// Activate only if the replay passes (no trap, no command that
        /// worked before failing).
        #[arg(long, requires = "replay")]
        require_replay: bool,
        /// With --require-replay: also require identical outputs.
        #[arg(long, requires = "require_replay")]
        identical: bool,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Run an installed version on the plugin's recent commands against a
    /// scratch copy of its state and report how it differs from the
    /// active one (nothing is activated or written).
    Replay {
        /// Plugin name.
        name: String,
        /// The candidate version label.
        version: String,
        /// How many recent commands to replay.
        #[arg(long, default_value_t = 1000)]
        commands: usize,
        /// Pass only on identical outputs.
        #[arg(long)]
        identical: bool,
        /// A node's HTTP address.
        #[arg(long, env = "SYNOD_NODE", default_value = "127.0.0.1:7001")]
        node: String,
    },
    /// Validate a component as a command handler and print what it declares.
    Inspect {
        /// The component file.
        file: PathBuf,
    },
}

/// Progress on stderr while the CLI waits (drawn only on a terminal, so
/// scripts and pipes see nothing of it).
mod progress {
    use std::time::Duration;

    use indicatif::{ProgressBar, ProgressStyle};

    /// Bytes sent of an upload of `len` bytes.
    pub fn upload(len: u64, what: &str) -> ProgressBar {
        let bar = ProgressBar::new(len);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("uploading {what}"));
        bar
    }

    /// Turn `bar` into a spinner saying what is being waited for.
    pub fn wait(bar: &ProgressBar, message: &str) {
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
    }

    /// A spinner for a long operation.
    pub fn spinner(message: &str) -> ProgressBar {
        let bar = ProgressBar::new_spinner();
        wait(&bar, message);
        bar
    }
}

/// jemalloc, not glibc's malloc. A snapshot's rebase frees the writes it
/// froze (millions of small blocks after a bulk load) on the snapshot
/// thread while the apply thread allocates. glibc only handed that memory
/// back through `malloc_trim`, which holds each arena's lock while it walks
/// it: 57-110 ms at 10M keys, with the apply thread waiting on the arena
/// the frozen writes came from (the longest write at 1 in flight). jemalloc
/// returns freed pages on its own background threads, a few at a time.
/// Alternated 10M-key runs (README, "fifth round"): the longest write at 1
/// in flight 19-27 ms in five runs of six (90 ms in one) against 73-95 ms,
/// and 29% more writes per second at 64 in flight. Plugins' memory is
/// wasmtime's own mappings, not this allocator's, so nothing a command
/// computes depends on it.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node sets up its own (it may export traces: see `[telemetry]`).
    if !matches!(cli.command, Action::Node { .. }) {
        synod::telemetry::init_logs();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = e.downcast_ref::<synod::client::ClientError>().and_then(next_step) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to do about an error from a node, when there is something to say.
fn next_step(e: &synod::client::ClientError) -> Option<String> {
    use synod::client::ClientError;
    match e {
        ClientError::Unreachable { url, .. } => {
            // The node's address, without the path asked for.
            let node = url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
            Some(format!(
                "is a node listening at {node}? `synod dev` runs a local cluster; --node or SYNOD_NODE names another node"
            ))
        }
        ClientError::Status { status: 401, .. } => Some(
            "this needs a bearer token: --token or SYNOD_TOKEN (or SYNOD_TOKEN_FILE). `synod dev` prints the \
             cluster's first admin token and keeps it in .synod-dev/n1/admin.token, which the CLI reads when \
             run from that directory; an admin makes more with `synod token create <name> --role <role>`"
                .to_owned(),
        ),
        ClientError::Status { status: 403, body } => Some(format!(
            "the token lacks a role this needs ({}); an admin can grant one with `synod token create`",
            body["needs"]
        )),
        ClientError::Status { status: 503, body } if body["kind"] == "no_leader" => {
            Some(match body["leader"].as_str() {
                Some(leader) => format!("the leader is at {leader}: retry there (--node {leader})"),
                None => "the cluster has no leader right now (an election, or too few members up): retry in a few \
                     seconds, or ask another node with --node"
                    .to_owned(),
            })
        }
        ClientError::Status { status: 503, body } if body["kind"] == "unavailable" => Some(
            "the write may or may not have been applied: retry it with the same request id to get its first result"
                .to_owned(),
        ),
        ClientError::Status { status: 429, .. } => Some("the node is overloaded: retry after a moment".to_owned()),
        _ => None,
    }
}

fn print(value: &serde_json::Value) -> anyhow::Result<()> {
    match OUTPUT.get() {
        Some(Output::Table) => out(table(value)),
        _ => out(serde_json::to_string_pretty(value)?),
    }
}

/// A node's answer as a table: its main list (the first array of objects,
/// or object of objects, at the top or one level down) as aligned columns
/// of the scalar fields, nested values as compact JSON; anything else as
/// `key  value` lines.
fn table(value: &serde_json::Value) -> String {
    use serde_json::Value;
    /// A row: its key (for an object of objects) and its fields.
    type Row<'a> = (Option<String>, &'a serde_json::Map<String, Value>);
    fn rows(v: &Value) -> Option<Vec<Row<'_>>> {
        match v {
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
                Some(items.iter().filter_map(|i| i.as_object().map(|o| (None, o))).collect())
            }
            Value::Object(map) if !map.is_empty() && map.values().all(Value::is_object) => {
                Some(map.iter().filter_map(|(k, i)| i.as_object().map(|o| (Some(k.clone()), o))).collect())
            }
            _ => None,
        }
    }
    let cell = |v: &Value| -> String {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        if text.chars().count() > 48 { format!("{}…", text.chars().take(47).collect::<String>()) } else { text }
    };
    let found = rows(value).or_else(|| value.as_object().and_then(|m| m.values().find_map(rows)));
    let Some(rows) = found else {
        return match value.as_object() {
            Some(map) => map.iter().map(|(k, v)| format!("{k}  {}", cell(v))).collect::<Vec<_>>().join("\n"),
            None => cell(value),
        };
    };
    let keyed = rows.iter().any(|(k, _)| k.is_some());
    let mut columns: Vec<String> = if keyed { vec!["name".to_owned()] } else { Vec::new() };
    for (_, row) in &rows {
        for k in row.keys() {
            if !columns.contains(k) && columns.len() < 9 {
                columns.push(k.clone());
            }
        }
    }
    let grid: Vec<Vec<String>> = rows
        .iter()
        .map(|(key, row)| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if keyed && i == 0 {
                        key.clone().unwrap_or_default()
                    } else {
                        row.get(c).map_or_else(String::new, cell)
                    }
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| grid.iter().map(|r| r[i].chars().count()).chain([columns[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: &[String]| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    let mut lines = vec![line(&columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>())];
    lines.extend(grid.iter().map(|r| line(r)));
    lines.join("\n")
}

/// Print a line on stdout. A reader that went away (`synod status | head`)
/// is not an error: the rest of the output has nowhere to go.
fn out(line: impl std::fmt::Display) -> anyhow::Result<()> {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// `synod watch`: read `/v1/watch` and print what comes, until the node
/// closes the stream (or Ctrl-C).
async fn watch(client: &synod::client::Client, tail: usize, json: bool) -> anyhow::Result<()> {
    let mut response = client.stream(&format!("/v1/watch?tail={tail}")).await?;
    let mut buffer = String::new();
    let mut shown: Option<(Option<u64>, u64)> = None;
    while let Some(chunk) = response.chunk().await? {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut kind = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = k.trim();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            let Ok(body) = serde_json::from_str::<serde_json::Value>(&data) else { continue };
            match kind {
                "op" if json => out(serde_json::json!({ "op": body }))?,
                "op" => {
                    let result = if body["ok"] == true { body["output"].as_str().unwrap_or("") } else { "" };
                    let error = if body["ok"] == true { "" } else { body["output"].as_str().unwrap_or("") };
                    out(format!(
                        "{:>10}  {}.{}  by {}  {}{}  fuel {}",
                        body["index"],
                        body["plugin"].as_str().unwrap_or(""),
                        body["command"].as_str().unwrap_or(""),
                        body["caller"].as_str().unwrap_or(""),
                        result,
                        if error.is_empty() { String::new() } else { format!("error: {error}") },
                        body["fuel"],
                    ))?
                }
                "cluster" => {
                    let now = (body["leader"].as_u64(), body["term"].as_u64().unwrap_or(0));
                    if shown != Some(now) {
                        shown = Some(now);
                        if json {
                            out(serde_json::json!({ "cluster": body }))?;
                        } else {
                            out(format!(
                                "-- leader {}, term {}, divergence {}",
                                now.0.map_or_else(|| "none".to_owned(), |l| format!("node {l}")),
                                now.1,
                                body["divergence"]
                            ))?;
                        }
                    }
                }
                "gap" => out(format!("-- fell behind: operations after {} are no longer kept here", body["after"]))?,
                _ => {}
            }
        }
    }
    Ok(())
}

async fn node(
    config: PathBuf,
    id: Option<u64>,
    data_dir: Option<PathBuf>,
    http: Option<std::net::SocketAddr>,
    p2p: Option<String>,
) -> anyhow::Result<()> {
    let mut config = synod::config::NodeConfig::load(&config)?;
    config.id = id.unwrap_or(config.id);
    config.data_dir = data_dir.unwrap_or(config.data_dir);
    config.http = http.unwrap_or(config.http);
    config.p2p = p2p.unwrap_or(config.p2p);
    let telemetry = synod::telemetry::init_node(&config.telemetry, config.id)?;
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("binding the HTTP address {}", config.http))?;
    let node = synod::node::RunningNode::start(config, listener).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        // A storage fault (disk full, failing disk) stops Raft for good:
        // say why and exit non-zero, so a supervisor restarts the node once
        // the disk is fixed, rather than leave a member that answers and
        // never moves. Everything acknowledged is already on disk.
        fatal = node.fatal() => {
            tracing::error!(error = %fatal, "stopping: this node can no longer apply or vote");
            return Err(anyhow::anyhow!("{fatal} (free disk space or fix the disk, then restart the node; nothing acknowledged is lost)"));
        }
    }
    tracing::info!("shutting down");
    node.shutdown().await;
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(())
}

async fn device(reach: &Reach, command: DeviceCmd) -> anyhow::Result<()> {
    match command {
        DeviceCmd::Put { id, definition, node } => {
            let body = match definition.strip_prefix('@') {
                Some(path) => std::fs::read(path).with_context(|| format!("reading {path}"))?,
                None => definition.into_bytes(),
            };
            print(&reach.client(&node)?.put(&format!("/v1/devices/{id}"), body).await?)
        }
        DeviceCmd::Get { id, node } => print(&reach.client(&node)?.get(&format!("/v1/devices/{id}")).await?),
        DeviceCmd::List { prefix, node } => {
            print(&reach.client(&node)?.get(&format!("/v1/devices?prefix={prefix}")).await?)
        }
        DeviceCmd::Desired { id, patch, expected_version, node } => {
            let query = expected_version.map(|v| format!("?expected_version={v}")).unwrap_or_default();
            print(&reach.client(&node)?.patch(&format!("/v1/devices/{id}/desired{query}"), patch.into_bytes()).await?)
        }
        DeviceCmd::Delete { id, node } => print(&reach.client(&node)?.delete(&format!("/v1/devices/{id}")).await?),
        DeviceCmd::Watch { id, count, interval_ms, node } => {
            let client = reach.client(&node)?;
            let mut last = None;
            let mut seen = 0u64;
            loop {
                match client.get(&format!("/v1/devices/{id}?consistency=local")).await {
                    Ok(body) => {
                        let d = &body["device"];
                        let version = d["version"].as_u64();
                        if version != last {
                            last = version;
                            if OUTPUT.get() == Some(&Output::Json) {
                                out(serde_json::to_string(d)?)?;
                            } else {
                                out(format_args!(
                                    "v{} owner={} epoch={} reported={} desired={} delta={}",
                                    d["version"], d["owner"], d["epoch"], d["reported"], d["desired"], d["delta"]
                                ))?;
                            }
                            seen += 1;
                            if count.is_some_and(|c| seen >= c) {
                                return Ok(());
                            }
                        }
                    }
                    Err(e) => out(format_args!("({e})"))?,
                }
                tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
            }
        }
    }
}

fn payload(text: String) -> Vec<u8> {
    text.into_bytes()
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(output) = cli.output {
        let _ = OUTPUT.set(output);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run_async(cli))
}

async fn run_async(cli: Cli) -> anyhow::Result<()> {
    let reach = Reach { token: synod::client::find_token(cli.token), ca: synod::client::find_ca(cli.ca_file) };
    match cli.command {
        Action::Node { config, id, data_dir, http, p2p } => node(config, id, data_dir, http, p2p).await?,
        Action::Dev { dir, tls } => synod::dev::run(&dir, &std::env::current_exe()?, tls).await?,
        Action::Token { command: TokenCmd::Create { principal, roles, node } } => {
            let body = serde_json::to_vec(&serde_json::json!({ "principal": principal, "roles": roles }))?;
            let created = reach.client(&node)?.post("/v1/tokens", body).await?;
            print(&created)?;
            eprintln!("the token is shown only now: keep it (it is stored hashed)");
        }
        Action::Token { command: TokenCmd::List { node } } => print(&reach.client(&node)?.get("/v1/tokens").await?)?,
        Action::Token { command: TokenCmd::Revoke { target, node } } => {
            print(&reach.client(&node)?.delete(&format!("/v1/tokens/{target}")).await?)?
        }
        Action::Audit { after, limit, node } => {
            print(&reach.client(&node)?.get(&format!("/v1/audit?after={after}&limit={limit}")).await?)?
        }
        Action::Cluster { command: ClusterCmd::Add { new, node } } => {
            let health =
                reach.client(&new)?.get("/healthz").await.with_context(|| format!("asking {new} who it is"))?;
            let body = serde_json::json!({
                "id": health["id"], "peer_id": health["peer_id"], "p2p": health["p2p"], "http": health["http"],
                "engine": health["engine"], "protocol": health["protocol"],
            });
            print(&reach.client(&node)?.post("/v1/cluster/nodes", serde_json::to_vec(&body)?).await?)?
        }
        Action::Cluster { command: ClusterCmd::Remove { id, node } } => {
            print(&reach.client(&node)?.delete(&format!("/v1/cluster/nodes/{id}")).await?)?
        }
        Action::Backup { file, node } => {
            use futures::StreamExt as _;
            let client = reach.client(&node)?;
            let response = client.stream("/v1/backup").await?;
            let bar = progress::spinner("taking the backup");
            let mut saving = synod::backup::Saving::create(&file)?;
            let mut body = response.bytes_stream();
            while let Some(piece) = body.next().await {
                saving.write(&piece.context("receiving the backup (the node cut it short)")?)?;
                bar.set_message(format!("receiving the backup: {} MiB", saving.len() >> 20));
            }
            bar.finish_and_clear();
            let size = saving.len();
            let header = saving.finish().context("the backup received does not check out")?;
            print(&serde_json::to_value(&header)?)?;
            eprintln!(
                "saved {} ({size} bytes): the state at operation {}, digest {}",
                file.display(),
                header.operation_index,
                header.digest
            );
        }
        Action::Restore { file, config, data_dir, same_network_key } => {
            let mut config = synod::config::NodeConfig::load(&config)?;
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            let restored = synod::backup::restore(&file, &config, same_network_key).await?;
            print(&serde_json::to_value(&restored)?)?;
            eprintln!(
                "node {} holds the state at operation {} (digest {}): start it with `synod node --config …`, then add nodes",
                restored.node, restored.operation_index, restored.digest
            );
        }
        Action::Recover { force_new_cluster, data_dir, id } => {
            if !force_new_cluster {
                anyhow::bail!(
                    "recover rewrites the cluster's membership to this node alone: say so with --force-new-cluster"
                );
            }
            let id = match id {
                Some(id) => id,
                None => synod::config::NodeConfig::load(&data_dir.join("synod.toml"))
                    .map(|c| c.id)
                    .with_context(|| format!("no --id, and no synod.toml in {} to read it from", data_dir.display()))?,
            };
            let recovered = synod::recover::force_new_cluster(&data_dir, id).await?;
            print(&serde_json::to_value(&recovered)?)?;
            eprintln!(
                "node {id} is now the only voter (removed: {:?}). Start it, then add new nodes with `synod cluster add`. \
                 Writes acknowledged with an index above {} reached only the removed nodes and are lost.",
                recovered.removed, recovered.lost_above_operation_index
            );
        }
        Action::NodeId { data_dir } => {
            let key = synod::p2p::identity::load_or_create(&data_dir)?;
            out(key.public().to_peer_id())?;
        }
        Action::Cmd { plugin, command, payload: p, node } => {
            print(&reach.client(&node)?.post(&format!("/v1/commands/{plugin}/{command}"), payload(p)).await?)?
        }
        Action::Query { plugin, query, payload: p, node } => {
            print(&reach.client(&node)?.post(&format!("/v1/queries/{plugin}/{query}"), payload(p)).await?)?
        }
        Action::Status { node } => print(&reach.client(&node)?.get("/v1/cluster").await?)?,
        Action::Watch { tail, json, node } => {
            let json = json || OUTPUT.get() == Some(&Output::Json);
            watch(&reach.client(&node)?, tail, json).await?
        }
        Action::Logs { plugin, limit, follow, node } => {
            let client = reach.client(&node)?;
            let mut after = 0;
            loop {
                let body = client.get(&format!("/v1/plugins/{plugin}/logs?after={after}&limit={limit}")).await?;
                let lines = body["lines"].as_array().cloned().unwrap_or_default();
                let newest = lines.iter().filter_map(|l| l["index"].as_u64()).max();
                if OUTPUT.get().is_some() {
                    if !follow || !lines.is_empty() {
                        print(&body)?;
                    }
                } else {
                    for line in &lines {
                        out(format!(
                            "{:>10}  {:<5}  {}  {}",
                            line["index"],
                            line["level"].as_str().unwrap_or(""),
                            line["command"].as_str().unwrap_or(""),
                            line["message"].as_str().unwrap_or("")
                        ))?;
                    }
                }
                after = after.max(newest.unwrap_or(0));
                if !follow {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        Action::Openapi => out(synod::api::openapi_document())?,
        Action::Completions { shell } => {
            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "synod", &mut script);
            out(String::from_utf8_lossy(&script).trim_end())?;
        }
        Action::Plugin { command: PluginCmd::Push { file, name, version, node } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let client = reach.client(&node)?;
            let bar = progress::upload(bytes.len() as u64, &format!("{name} {version}"));
            let sent = {
                let (bar, total) = (bar.clone(), bytes.len() as u64);
                move |n: u64| {
                    bar.set_position(n);
                    if n == total {
                        progress::wait(&bar, "installing: checking, storing on a quorum, compiling on every node");
                    }
                }
            };
            let answer = client.post_with_progress(&format!("/v1/plugins/{name}?version={version}"), bytes, sent).await;
            bar.finish_and_clear();
            print(&answer?)?
        }
        Action::Plugin { command: PluginCmd::List { node } } => print(&reach.client(&node)?.get("/v1/plugins").await?)?,
        Action::Plugin { command: PluginCmd::Activate { name, version, replay, require_replay, identical, node } } => {
            let mut body = serde_json::json!({ "version": version });
            if let Some(n) = replay {
                body["replay"] = n.into();
                body["require_replay"] = require_replay.into();
                body["identical"] = identical.into();
            }
            let body = serde_json::to_vec(&body)?;
            let client = reach.client(&node)?;
            let bar = progress::spinner(&match replay {
                Some(n) => format!("replaying up to {n} commands on {name} {version}, then activating"),
                None => format!("activating {name} {version}"),
            });
            let answer = client.post(&format!("/v1/plugins/{name}/activate"), body).await;
            bar.finish_and_clear();
            print(&answer?)?
        }
        Action::Plugin { command: PluginCmd::Replay { name, version, commands, identical, node } } => {
            let body = serde_json::json!({ "version": version, "commands": commands, "identical": identical });
            let client = reach.client(&node)?;
            let bar = progress::spinner(&format!("replaying up to {commands} commands on {name} {version}"));
            let report = client.post(&format!("/v1/plugins/{name}/replay"), serde_json::to_vec(&body)?).await;
            bar.finish_and_clear();
            let report = report?;
            let passed = report["passed"].as_bool() == Some(true);
            print(&report)?;
            if !passed {
                anyhow::bail!("the replay did not pass");
            }
        }
        Action::Divergence { node } => print(&reach.client(&node)?.get("/v1/divergence").await?)?,
        Action::Plugin { command: PluginCmd::Build { dir, packages, out_dir, target_dir, features } } => {
            let options = synod::toolchain::BuildOptions { packages, target_dir, out_dir, features };
            for built in synod::toolchain::build(&dir, &options)? {
                let size = std::fs::metadata(&built.component)?.len();
                out(format_args!("{}\t{}\t{size} bytes", built.name, built.component.display()))?;
            }
        }
        Action::Plugin { command: PluginCmd::New { name, lang, dir } } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            for path in synod::toolchain::scaffold::new_plugin(&dir, &name, lang)? {
                out(format_args!("{}", path.display()))?;
            }
        }
        Action::Plugin { command: PluginCmd::Test { dir, target_dir } } => {
            let options = synod::toolchain::BuildOptions { target_dir, ..Default::default() };
            let tests = dir.join("tests.json");
            for built in synod::toolchain::build(&dir, &options)? {
                let bytes = std::fs::read(&built.component)?;
                let (n, failures) = synod::toolchain::plugin_test::run(&bytes, &tests)?;
                for f in &failures {
                    eprintln!("FAIL {} case {}: {}", built.name, f.case, f.message);
                }
                if !failures.is_empty() {
                    anyhow::bail!("{}: {} of {n} cases failed", built.name, failures.len());
                }
                out(format_args!("{}\t{n} cases passed", built.name))?;
            }
        }
        Action::Plugin { command: PluginCmd::Inspect { file } } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            if synod::driver::is_driver(&bytes) {
                synod::driver::DriverRuntime::new()?.compile(&bytes)?;
                let info = serde_json::json!({ "sha256": synod::artifacts::sha256_hex(&bytes), "kind": "driver" });
                return print(&info);
            }
            let runtime = synod::runtime::Runtime::new()?;
            let plugin = runtime.load(&bytes, synod::runtime::PluginLimits::default())?;
            let info = serde_json::json!({
                "sha256": plugin.sha256_hex(),
                "commands": plugin.info().commands,
                "queries": plugin.info().queries,
                "limits": plugin.limits(),
            });
            print(&info)?;
        }
        Action::Device { command } => device(&reach, command).await?,
        Action::Sim { command: SimCmd::Modbus { listen, devices, seed, heat_rate, cool_rate, ambient, fault } } => {
            use synod_sim::modbus::Fault;
            let fault = match fault.as_deref().map(|f| f.split_once(':').unwrap_or((f, ""))) {
                None => Fault::None,
                Some(("delay", ms)) => {
                    Fault::Delay(std::time::Duration::from_millis(ms.parse().context("delay:<ms>")?))
                }
                Some(("drop", "")) => Fault::Drop,
                Some(("exception", code)) => Fault::Exception(code.parse().context("exception:<code>")?),
                Some(("disconnect", "")) => Fault::Disconnect,
                Some(_) => anyhow::bail!("--fault must be delay:<ms>, drop, exception:<code> or disconnect"),
            };
            let config = synod_sim::modbus::SimConfig {
                rooms: devices,
                seed,
                ambient_c: ambient,
                heat_rate_c_per_s: heat_rate,
                cool_rate_c_per_s: cool_rate,
                ..Default::default()
            };
            let sim = synod_sim::modbus::start(listen, config).await?;
            sim.set_fault(None, fault);
            println!(
                "modbus simulator: {devices} room(s) on {} (room k: input/holding register 16k = temperature ×10, \
                 coil 16k = heater){}",
                sim.addr(),
                if fault == Fault::None { String::new() } else { format!("; fault {fault:?}") }
            );
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            sim.shutdown().await;
        }
        Action::Engine => {
            let runtime = synod::runtime::Runtime::new()?;
            print(&serde_json::to_value(runtime.fingerprint())?)?;
        }
    }
    Ok(())
}
