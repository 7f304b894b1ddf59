//! Apply stage: the only writer of replicated state.
//!
//! In: committed commands in log order, each with its [`Context`]. Out: the
//! command's [`Outcome`] for the caller, and the state after it — plugin
//! namespaces, the running [`Digest`] and the last applied index — identical
//! on every node that applied the same entries with the same plugins.
//!
//! A failed command is still applied: its error is the deterministic result,
//! its writes are dropped, and the digest records it. Only a local fault
//! ([`ApplyError::Host`]) stops the entry from being applied at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::runtime::{CommandError, Context, Outcome, Plugin};
use crate::state::{Digest, KvState};

/// A local fault while applying: this node cannot apply the entry and must
/// not pretend it did (other nodes may have applied it fine).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Storage or resource failure on this node.
    #[error("cannot apply entry {index}: {reason}")]
    Host {
        /// The entry.
        index: u64,
        /// What failed.
        reason: String,
    },
    /// Entries must be applied in order, each once.
    #[error("entry {index} is not after the last applied entry {last_applied}")]
    OutOfOrder {
        /// The entry offered.
        index: u64,
        /// The last one applied.
        last_applied: u64,
    },
}

/// The replicated state of one node, and the plugins that change it.
#[derive(Default)]
pub struct StateMachine {
    /// Active version of each plugin by name.
    plugins: BTreeMap<String, Arc<Plugin>>,
    /// Plugin key-value data.
    kv: KvState,
    /// Running digest of every applied entry's effects.
    digest: Digest,
    /// Index of the last applied entry (0 before the first).
    last_applied: u64,
}

impl StateMachine {
    /// Make `plugin` the active version of `name` for entries applied from
    /// now on.
    pub fn activate(&mut self, name: &str, plugin: Arc<Plugin>) {
        self.plugins.insert(name.to_owned(), plugin);
    }

    /// The active version of `name`.
    pub fn plugin(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// Apply one committed command at `ctx.index`.
    pub fn apply_command(
        &mut self,
        ctx: &Context,
        plugin: &str,
        command: &str,
        payload: &[u8],
    ) -> Result<Outcome, ApplyError> {
        if ctx.index <= self.last_applied {
            return Err(ApplyError::OutOfOrder { index: ctx.index, last_applied: self.last_applied });
        }
        let outcome = match self.plugins.get(plugin) {
            Some(p) => p.handle(ctx, command, payload, Box::new(self.kv.view(plugin))),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        };
        if let Err(CommandError::Host { reason }) = &outcome.result {
            return Err(ApplyError::Host { index: ctx.index, reason: reason.clone() });
        }
        self.kv.apply(plugin, &outcome.writes);
        self.digest = self.digest.chain(ctx.index, plugin, &outcome.effects());
        self.last_applied = ctx.index;
        Ok(outcome)
    }

    /// Run a read-only query against the current state.
    pub fn query(&self, ctx: &Context, plugin: &str, name: &str, payload: &[u8]) -> Outcome {
        match self.plugins.get(plugin) {
            Some(p) => p.query(ctx, name, payload, Box::new(self.kv.view(plugin))),
            None => Outcome::failed(CommandError::UnknownPlugin { name: plugin.to_owned() }),
        }
    }

    /// The plugin key-value data.
    pub fn kv(&self) -> &KvState {
        &self.kv
    }

    /// The running digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Index of the last applied entry.
    pub fn last_applied(&self) -> u64 {
        self.last_applied
    }
}
