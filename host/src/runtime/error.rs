//! Errors of the runtime stage: why a component cannot be loaded, and why a
//! command did not succeed.

use serde::{Deserialize, Serialize};

/// Why bytes offered as a plugin cannot become a [`super::Plugin`].
///
/// Every variant is the uploader's problem and says what to change; the node
/// is never harmed by a bad component.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bigger than the node accepts.
    #[error("plugin is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size offered.
        size: usize,
        /// The node's limit.
        limit: usize,
    },
    /// Not WebAssembly at all.
    #[error("not a WebAssembly binary (it does not start with the `\\0asm` magic)")]
    NotWasm,
    /// A core module: it needs wrapping into a component.
    #[error(
        "this is a core WebAssembly module, not a component; build plugins with \
         `synod plugin build`, which turns the module into a component"
    )]
    CoreModule,
    /// wasmtime refused to compile it (malformed, truncated, unsupported
    /// proposal).
    #[error("the component does not compile: {reason}")]
    Compile {
        /// wasmtime's explanation.
        reason: String,
    },
    /// It does not export the `synod:plugin/handler` interface.
    #[error(
        "the component does not implement the command-handler world: it exports no \
         `synod:plugin/handler` interface (it exports: {exports})"
    )]
    WrongWorld {
        /// What it does export, comma-separated.
        exports: String,
    },
    /// It targets a `synod:plugin` version this node does not speak.
    #[error(
        "the component was built against synod:plugin@{found}; this node supports \
         synod:plugin@{supported} (rebuild the plugin with a matching synod-sdk)"
    )]
    IncompatibleVersion {
        /// Version in the component.
        found: String,
        /// Version this node implements.
        supported: String,
    },
    /// It imports something a command handler may not use.
    #[error(
        "the component imports `{name}`, which a command handler cannot use (allowed: \
         synod:plugin/state, events, log, random)"
    )]
    UnsupportedImport {
        /// The import's name.
        name: String,
    },
    /// Its imports or exports have the right names but the wrong types.
    #[error("the component does not match the command-handler world: {reason}")]
    Mismatch {
        /// wasmtime's type-check message.
        reason: String,
    },
    /// `describe` failed, so the host cannot know its commands.
    #[error("the plugin's `describe` failed: {0}")]
    Describe(CommandError),
    /// `describe` listed a name the host cannot route.
    #[error("the plugin's `describe` lists a bad name: {0}")]
    BadName(#[from] crate::state::NameError),
    /// Limits asked for beyond what this node can grant.
    #[error("invalid plugin limits: {reason}")]
    Limits {
        /// Which limit and why.
        reason: String,
    },
}

/// Why a command produced no output.
///
/// All variants but [`CommandError::Host`] are deterministic: every node
/// reaches the same one at the same point, so they are results to commit
/// (with the command's writes dropped), not faults.
///
/// Serialized with postcard in the log and between nodes, so no serde
/// attribute that needs a self-describing format (internal tags, flatten).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    /// No plugin of this name is installed.
    #[error("unknown plugin `{name}`")]
    UnknownPlugin {
        /// The name asked for.
        name: String,
    },
    /// A plugin lifecycle operation could not be applied (unknown version,
    /// a version label reused for other bytes).
    #[error("{message}")]
    Lifecycle {
        /// What was wrong.
        message: String,
    },
    /// The plugin does not list this command in `describe`.
    #[error("unknown command `{name}`")]
    UnknownCommand {
        /// The name asked for.
        name: String,
    },
    /// The plugin does not list this query in `describe`.
    #[error("unknown query `{name}`")]
    UnknownQuery {
        /// The name asked for.
        name: String,
    },
    /// The plugin could not understand the payload.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// The plugin's message.
        message: String,
    },
    /// The plugin understood and refused the command.
    #[error("rejected: {message}")]
    Rejected {
        /// The plugin's message.
        message: String,
    },
    /// The plugin reported an internal failure.
    #[error("plugin error: {message}")]
    Internal {
        /// The plugin's message.
        message: String,
    },
    /// The command used up its fuel budget.
    #[error("out of fuel: the command used its whole budget of {limit} fuel")]
    OutOfFuel {
        /// The budget.
        limit: u64,
    },
    /// The command tried to grow memory past its limit and then trapped.
    #[error("out of memory: the command needed more than {limit} bytes of linear memory")]
    OutOfMemory {
        /// The limit.
        limit: usize,
    },
    /// Recursion exhausted the wasm stack.
    #[error("stack overflow: the command exhausted its wasm stack")]
    StackOverflow,
    /// Any other trap (a Rust panic in the plugin ends here).
    #[error("trap: {message}")]
    Trap {
        /// The trap's description.
        message: String,
    },
    /// The output (or error message) was bigger than the plugin may return.
    #[error("output too large: {size} bytes, over the limit of {limit} bytes")]
    OutputTooLarge {
        /// Size returned.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A client request id was used again with another payload: a retry
    /// must repeat the request exactly (409).
    #[error("request id `{id}` was already used for a different payload; use a new id for a new request")]
    RequestIdReused {
        /// The id.
        id: String,
    },
    /// A local fault of this node (storage read failed, resource pool
    /// exhausted). Not deterministic: the caller must not commit it as a
    /// result, since other nodes did not see it.
    #[error("host failure: {reason}")]
    Host {
        /// What failed.
        reason: String,
    },
    /// The thing named does not exist (a device) (404).
    #[error("{message}")]
    NotFound {
        /// What was missing.
        message: String,
    },
    /// A compare-and-set failed: the `expected_version` or epoch given is
    /// not the current one (409).
    #[error("{message}")]
    Conflict {
        /// Expected and current.
        message: String,
    },
    /// A device report from a node that no longer owns the device, or with
    /// an epoch that is not the device's current one (409).
    #[error("{message}")]
    Fenced {
        /// Whose epoch, and the current one.
        message: String,
    },
}

impl CommandError {
    /// False only for [`CommandError::Host`], which another node would not
    /// have seen.
    pub fn is_deterministic(&self) -> bool {
        !matches!(self, CommandError::Host { .. })
    }
}
