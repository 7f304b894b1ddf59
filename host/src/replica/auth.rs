//! Replica stage: who may do what — bearer tokens (as hashes), their roles,
//! and the audit trail of admin actions.
//!
//! In: [`AuthOp`]s from the log (bootstrap, create, revoke, and audit notes
//! for changes that travel outside our own operations, like membership),
//! and the admin operations the replica applies elsewhere (plugin
//! lifecycle, device definitions), each with the principal that made it.
//! Out: the token table every node verifies bearer tokens against — the
//! same on every node at the same index, so a revocation takes effect
//! cluster-wide at one log index — and [`AuditRecord`]s, kept (the last
//! [`AUDIT_KEEP`]) in the replicated state and published as
//! `synod.evt.audit.<action>` events.
//!
//! Only a token's SHA-256 is ever stored or replicated: the secret is shown
//! once, to whoever created it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

/// Audit records kept in the replicated state (older ones remain in the
/// event stream).
pub const AUDIT_KEEP: usize = 10_000;

/// Tokens a cluster may hold.
pub const MAX_TOKENS: usize = 10_000;

/// Subject family of audit events; no plugin may take the name.
pub const AUDIT_FAMILY: &str = "audit";

/// The principal of the first admin token, made at bootstrap.
pub const BOOTSTRAP_PRINCIPAL: &str = "admin";

/// SHA-256 of a bearer token.
pub type TokenHash = [u8; 32];

/// The hash a token is stored and looked up under.
pub fn token_hash(token: &str) -> TokenHash {
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A token's public id: the first 12 hex digits of its hash (what `synod
/// token list` shows and `revoke` takes; it reveals nothing of the secret).
pub fn token_id(hash: &TokenHash) -> String {
    hex::encode(&hash[..6])
}

/// What a role lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Everything: plugins, membership, tokens, device definitions, and all
    /// an operator may do.
    Admin,
    /// Commands on every plugin, device desired state, and all reads.
    Operator,
    /// Queries, state, devices, plugins and the cluster.
    Reader,
    /// Commands, queries and state of one plugin (`operator:thermostat`).
    OperatorOf(String),
    /// Queries and state of one plugin (`reader:thermostat`).
    ReaderOf(String),
}

impl Role {
    /// Parse `admin`, `operator`, `reader`, `operator:<plugin>` or
    /// `reader:<plugin>`.
    pub fn parse(raw: &str) -> Result<Role, String> {
        let scoped = |plugin: &str| -> Result<String, String> {
            crate::state::parse_name("plugin", plugin.as_bytes()).map(|_| plugin.to_owned()).map_err(|e| e.to_string())
        };
        match raw.split_once(':') {
            None => match raw {
                "admin" => Ok(Role::Admin),
                "operator" => Ok(Role::Operator),
                "reader" => Ok(Role::Reader),
                other => Err(format!(
                    "unknown role {other:?}: roles are admin, operator, reader, operator:<plugin>, reader:<plugin>"
                )),
            },
            Some(("operator", p)) => Ok(Role::OperatorOf(scoped(p)?)),
            Some(("reader", p)) => Ok(Role::ReaderOf(scoped(p)?)),
            Some((other, _)) => {
                Err(format!("unknown role {raw:?}: only operator and reader take a plugin ({other}:…)"))
            }
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Admin => f.write_str("admin"),
            Role::Operator => f.write_str("operator"),
            Role::Reader => f.write_str("reader"),
            Role::OperatorOf(p) => write!(f, "operator:{p}"),
            Role::ReaderOf(p) => write!(f, "reader:{p}"),
        }
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Read something of one plugin (its queries, its state).
    ReadPlugin(&'a str),
    /// Read cluster-wide things (plugins, devices, cluster, digests).
    Read,
    /// Run a command of one plugin.
    Command(&'a str),
    /// Change a device's desired state.
    Desired,
    /// Plugins, membership, tokens, device definitions, the audit trail.
    Admin,
}

impl Access<'_> {
    /// Whether `role` grants this.
    pub fn granted_by(&self, role: &Role) -> bool {
        match (self, role) {
            (_, Role::Admin) => true,
            (Access::Admin, _) => false,
            (Access::Command(_) | Access::Desired | Access::Read | Access::ReadPlugin(_), Role::Operator) => true,
            (Access::Read | Access::ReadPlugin(_), Role::Reader) => true,
            (Access::Command(p) | Access::ReadPlugin(p), Role::OperatorOf(q)) => p == q,
            (Access::ReadPlugin(p), Role::ReaderOf(q)) => p == q,
            _ => false,
        }
    }

    /// The roles that would grant it, for the 403 message.
    pub fn wanted(&self) -> String {
        match self {
            Access::Admin => "`admin`".into(),
            Access::Command(p) => format!("`operator` or `operator:{p}`"),
            Access::Desired => "`operator`".into(),
            Access::Read => "`reader` (or `operator`)".into(),
            Access::ReadPlugin(p) => format!("`reader`, `reader:{p}` or `operator:{p}`"),
        }
    }

    /// What it is, for people.
    pub fn describe(&self) -> String {
        match self {
            Access::Admin => "an admin action".into(),
            Access::Command(p) => format!("a command of `{p}`"),
            Access::Desired => "a desired-state change".into(),
            Access::Read => "a read".into(),
            Access::ReadPlugin(p) => format!("a read of `{p}`"),
        }
    }
}

/// Check a principal name: 1–64 of `a-z 0-9 . _ - @`, not a name the
/// system uses for itself.
pub fn check_principal(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_@".contains(&b));
    if !ok {
        return Err(format!("principal {name:?} must be 1-64 characters of a-z, 0-9, '.', '-', '_', '@'"));
    }
    if [crate::node::ANONYMOUS, crate::node::SYSTEM].contains(&name) {
        return Err(format!("principal {name:?} is reserved"));
    }
    Ok(())
}

/// One token, as every node knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id (see [`token_id`]).
    pub id: String,
    /// Who holds it: the `caller` their commands run as.
    pub principal: String,
    /// What it may do.
    pub roles: Vec<Role>,
    /// Log time of its creation, ms.
    pub created_at_ms: u64,
    /// The principal that created it.
    pub created_by: String,
    /// Operation index of its creation.
    pub created_index: u64,
}

impl TokenRecord {
    /// Its public JSON (no hash).
    pub fn public(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "principal": self.principal,
            "roles": self.roles.iter().map(Role::to_string).collect::<Vec<_>>(),
            "created_at_ms": self.created_at_ms,
            "created_by": self.created_by,
            "created_index": self.created_index,
        })
    }
}

/// The auth operations the log carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthOp {
    /// The bootstrap node's first admin token: applied only while the
    /// cluster has never had a token, so a retry (or a second node that
    /// wrongly believes it bootstraps) changes nothing.
    Bootstrap {
        /// Hash of the token the bootstrap node wrote to its data dir.
        hash: TokenHash,
    },
    /// A new token.
    Create {
        /// Its hash.
        hash: TokenHash,
        /// Its holder.
        principal: String,
        /// Its roles.
        roles: Vec<Role>,
    },
    /// Revoke the token with this id, or every token of this principal.
    Revoke {
        /// A token id or a principal name.
        target: String,
    },
    /// Record an admin action that is not itself one of our operations (a
    /// membership change, which is openraft's own entry).
    Note {
        /// `membership.add`, `membership.remove`.
        action: String,
        /// What it acted on.
        target: String,
    },
}

impl AuthOp {
    /// The audit action name.
    pub fn action(&self) -> String {
        match self {
            AuthOp::Bootstrap { .. } => "token.bootstrap".into(),
            AuthOp::Create { .. } => "token.create".into(),
            AuthOp::Revoke { .. } => "token.revoke".into(),
            AuthOp::Note { action, .. } => action.clone(),
        }
    }
}

/// One admin action, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "index": 7000, "at_ms": 1795700000000_u64, "principal": "admin", "action": "plugin.activate", "target": "counter@2",
    "ok": true, "detail": "{\"active\":true,\"plugin\":\"counter\",\"sha256\":\"5be1c0d2…\",\"version\":\"2\"}"
}))]
pub struct AuditRecord {
    /// Operation index it was applied at.
    pub index: u64,
    /// Log time, ms.
    pub at_ms: u64,
    /// Who did it.
    pub principal: String,
    /// `token.create`, `plugin.install`, `device.put`, `membership.add`, …
    pub action: String,
    /// What it acted on (a plugin, a device id, a token id, a node id).
    pub target: String,
    /// Whether it took effect.
    pub ok: bool,
    /// The result or the error, short.
    pub detail: String,
}

/// Tokens and the audit trail as plain data (in snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthImage {
    /// Tokens by hash.
    pub tokens: Vec<(TokenHash, TokenRecord)>,
    /// Whether the cluster has ever had a token.
    pub bootstrapped: bool,
    /// The last [`AUDIT_KEEP`] audit records, oldest first.
    pub audit: Vec<AuditRecord>,
}

/// The replicated auth state.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: BTreeMap<TokenHash, TokenRecord>,
    bootstrapped: bool,
    audit: VecDeque<AuditRecord>,
}

/// Everything a request needs to look up a token, shared with request
/// handlers: replaced whole when the table changes (rarely), so a lookup
/// never waits for apply.
pub type TokenTable = std::sync::Arc<BTreeMap<TokenHash, TokenRecord>>;

impl Auth {
    /// Apply `op` at `index` for `caller`; the result (JSON for the caller,
    /// or why it was refused). Deterministic: the same on every node.
    pub fn apply(&mut self, op: &AuthOp, index: u64, at_ms: u64, caller: &str) -> Result<Vec<u8>, String> {
        let result = match op {
            AuthOp::Bootstrap { hash } => {
                if self.bootstrapped {
                    Err("auth is already bootstrapped: the cluster has had tokens".to_owned())
                } else {
                    let record = self.insert(*hash, BOOTSTRAP_PRINCIPAL, vec![Role::Admin], index, at_ms, caller);
                    Ok(record.public())
                }
            }
            AuthOp::Create { hash, principal, roles } => {
                if let Err(e) = check_principal(principal) {
                    Err(e)
                } else if roles.is_empty() {
                    Err("a token needs at least one role".to_owned())
                } else if self.tokens.contains_key(hash) || self.tokens.values().any(|t| t.id == token_id(hash)) {
                    Err("a token with this hash already exists".to_owned())
                } else if self.tokens.len() >= MAX_TOKENS {
                    Err(format!("the cluster holds {MAX_TOKENS} tokens, its limit; revoke some first"))
                } else {
                    Ok(self.insert(*hash, principal, roles.clone(), index, at_ms, caller).public())
                }
            }
            AuthOp::Revoke { target } => {
                let gone: Vec<TokenHash> = self
                    .tokens
                    .iter()
                    .filter(|(_, t)| &t.id == target || &t.principal == target)
                    .map(|(h, _)| *h)
                    .collect();
                if gone.is_empty() {
                    Err(format!("no token has the id or principal {target:?}"))
                } else {
                    let ids: Vec<String> = gone.iter().filter_map(|h| self.tokens.remove(h)).map(|t| t.id).collect();
                    Ok(serde_json::json!({ "revoked": ids }))
                }
            }
            AuthOp::Note { .. } => Ok(serde_json::json!({})),
        };
        let target = match op {
            AuthOp::Bootstrap { hash } | AuthOp::Create { hash, .. } => token_id(hash),
            AuthOp::Revoke { target } | AuthOp::Note { target, .. } => target.clone(),
        };
        let result = result.map(|v| serde_json::to_vec(&v).unwrap_or_default());
        self.record(AuditRecord {
            index,
            at_ms,
            principal: caller.to_owned(),
            action: op.action(),
            target,
            ok: result.is_ok(),
            detail: match &result {
                Ok(out) => String::from_utf8_lossy(out).into_owned(),
                Err(e) => e.clone(),
            },
        });
        result
    }

    fn insert(
        &mut self,
        hash: TokenHash,
        principal: &str,
        roles: Vec<Role>,
        index: u64,
        at_ms: u64,
        caller: &str,
    ) -> &TokenRecord {
        self.bootstrapped = true;
        let record = TokenRecord {
            id: token_id(&hash),
            principal: principal.to_owned(),
            roles,
            created_at_ms: at_ms,
            created_by: caller.to_owned(),
            created_index: index,
        };
        self.tokens.entry(hash).or_insert(record)
    }

    /// Keep an audit record (the oldest go past [`AUDIT_KEEP`]).
    pub fn record(&mut self, record: AuditRecord) {
        if self.audit.len() == AUDIT_KEEP {
            self.audit.pop_front();
        }
        self.audit.push_back(record);
    }

    /// The newest audit record.
    pub fn last_audit(&self) -> Option<&AuditRecord> {
        self.audit.back()
    }

    /// Audit records after operation index `after`, at most `limit`.
    pub fn audit_after(&self, after: u64, limit: usize) -> Vec<AuditRecord> {
        let start = self.audit.partition_point(|r| r.index <= after);
        self.audit.range(start..).take(limit).cloned().collect()
    }

    /// Whether the cluster has ever had a token.
    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    /// The token table, to share with request handlers.
    pub fn table(&self) -> TokenTable {
        std::sync::Arc::new(self.tokens.clone())
    }

    /// Every token's public record.
    pub fn tokens(&self) -> impl Iterator<Item = &TokenRecord> {
        self.tokens.values()
    }

    /// As plain data.
    pub fn image(&self) -> AuthImage {
        AuthImage {
            tokens: self.tokens.iter().map(|(h, t)| (*h, t.clone())).collect(),
            bootstrapped: self.bootstrapped,
            audit: self.audit.iter().cloned().collect(),
        }
    }

    /// From plain data.
    pub fn from_image(image: AuthImage) -> Auth {
        Auth {
            tokens: image.tokens.into_iter().collect(),
            bootstrapped: image.bootstrapped,
            audit: image.audit.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_print_and_grant() {
        for raw in ["admin", "operator", "reader", "operator:thermostat", "reader:counter"] {
            assert_eq!(Role::parse(raw).unwrap().to_string(), raw);
        }
        assert!(Role::parse("root").unwrap_err().contains("unknown role"));
        assert!(Role::parse("admin:x").is_err());
        assert!(Role::parse("operator:Bad Name").is_err());
        let thermo = Role::parse("operator:thermostat").unwrap();
        assert!(Access::Command("thermostat").granted_by(&thermo));
        assert!(!Access::Command("counter").granted_by(&thermo));
        assert!(Access::ReadPlugin("thermostat").granted_by(&thermo));
        assert!(!Access::Read.granted_by(&thermo));
        assert!(!Access::Command("counter").granted_by(&Role::Reader));
        assert!(Access::ReadPlugin("counter").granted_by(&Role::Reader));
        assert!(!Access::Admin.granted_by(&Role::Operator));
        assert!(Access::Admin.granted_by(&Role::Admin));
        assert!(Access::Desired.granted_by(&Role::Operator));
        assert!(!Access::Desired.granted_by(&thermo));
    }

    #[test]
    fn bootstrap_once_then_create_and_revoke() {
        let mut auth = Auth::default();
        let first = token_hash("synod_a");
        auth.apply(&AuthOp::Bootstrap { hash: first }, 1, 10, "synod").unwrap();
        assert!(auth.apply(&AuthOp::Bootstrap { hash: token_hash("synod_b") }, 2, 11, "synod").is_err());
        let create = AuthOp::Create { hash: token_hash("synod_c"), principal: "bob".into(), roles: vec![Role::Reader] };
        auth.apply(&create, 3, 12, "admin").unwrap();
        assert!(auth.apply(&create, 4, 13, "admin").is_err(), "the same hash twice");
        assert_eq!(auth.table().len(), 2);
        auth.apply(&AuthOp::Revoke { target: "bob".into() }, 5, 14, "admin").unwrap();
        assert_eq!(auth.table().len(), 1);
        assert!(auth.apply(&AuthOp::Revoke { target: "bob".into() }, 6, 15, "admin").is_err());
        let audit = auth.audit_after(0, 100);
        assert_eq!(audit.len(), 6);
        assert_eq!(audit[2].action, "token.create");
        assert_eq!(audit[2].principal, "admin");
        assert!(!audit[3].ok);
        assert_eq!(auth.audit_after(4, 100).len(), 2);
        let restored = Auth::from_image(auth.image());
        assert_eq!(restored.image(), auth.image());
    }
}
