//! Who is asking: bearer tokens checked against the replicated token table.
//!
//! In: the `Authorization: Bearer <token>` of an HTTP request or a NATS
//! message, and what the request needs ([`Access`]). Out: the
//! [`Principal`] the request runs as — its name is the `caller` a command
//! handler sees, carried in the log entry — or a 401 (no token, or one no
//! node knows) / 403 (a role is missing, named in the error).
//!
//! The table lives in the replicated state (`replica::auth`) and is
//! published to [`crate::consensus::Shared::tokens`] after each apply that
//! changes it, so a check is a SHA-256 and a map lookup under a lock that
//! apply never holds for long. A revocation takes effect on each node when
//! it applies the revoking entry; a follower that has not yet applied it
//! still forwards the request with the token's hash, and the leader checks
//! that hash against its own table before proposing anything.
//!
//! Also here: the first admin token, made by the bootstrap node and written
//! (mode 0600) to its data dir as [`ADMIN_TOKEN_FILE`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::NodeInner;
use super::service::ServiceError;
use crate::consensus::Op;
use crate::consensus::rpc::WriteError;
use crate::replica::auth::{Access, AuthOp, Role, TokenHash, TokenRecord, token_hash};

/// The bootstrap node's first admin token, in its data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Tokens start with this, so they are recognisable in a leak scanner.
pub const TOKEN_PREFIX: &str = "synod_";

/// Who a request runs as.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The name commands see as `caller`.
    pub name: String,
    /// What it may do; `None` with authentication off (everything).
    roles: Option<Vec<Role>>,
    /// The hash of the token it presented, so the leader can check it
    /// again when this node forwards the request.
    pub credential: Option<TokenHash>,
}

impl Principal {
    /// The caller of every request while authentication is off: may do
    /// everything, and is "anonymous".
    pub fn anonymous() -> Principal {
        Principal { name: super::ANONYMOUS.to_owned(), roles: None, credential: None }
    }

    /// The holder of `record`, presenting the token hashed to `hash`.
    pub fn of(record: &TokenRecord, hash: TokenHash) -> Principal {
        Principal { name: record.principal.clone(), roles: Some(record.roles.clone()), credential: Some(hash) }
    }

    /// Whether it may do `access`.
    pub fn allows(&self, access: Access<'_>) -> bool {
        match &self.roles {
            None => true,
            Some(roles) => roles.iter().any(|r| access.granted_by(r)),
        }
    }

    /// 403 naming the role it lacks, unless it may do `access`.
    pub fn require(&self, access: Access<'_>) -> Result<(), ServiceError> {
        if self.allows(access) {
            return Ok(());
        }
        let roles: Vec<String> = self.roles.iter().flatten().map(Role::to_string).collect();
        Err(ServiceError::new(
            403,
            "forbidden",
            format!(
                "{} needs role {}; principal `{}` has {}",
                access.describe(),
                access.wanted(),
                self.name,
                if roles.is_empty() { "none".to_owned() } else { roles.join(", ") }
            ),
        )
        .with("needs", json!(access.wanted().replace('`', ""))))
    }
}

/// The 401 every unauthenticated request gets.
fn unauthenticated(message: &str) -> ServiceError {
    ServiceError::new(401, "unauthenticated", message)
}

/// The token in an `Authorization` header value (`Bearer <token>`).
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim()).filter(|t| !t.is_empty())
}

/// A new token: the prefix and 32 random bytes in hex.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a token: {e}"))?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// Write `token` to `path` with mode 0600, durably (temp file, fsync,
/// rename, fsync of the directory).
pub fn write_token_file(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The longest a request with a token its node does not know waits in
/// line to catch up, and then for the catch-up itself (see
/// [`NodeInner::authenticate_caught_up`]).
const TOKEN_CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The token in a token file (first line, trimmed).
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.lines().next().unwrap_or("").trim().to_owned())
}

impl NodeInner {
    /// Whether requests must carry a token (`auth = "on"`, the default).
    pub fn auth_on(&self) -> bool {
        self.config.auth == crate::config::AuthMode::On
    }

    /// The principal an `Authorization` header value names: 401 when
    /// authentication is on and there is none, or for a token no node
    /// knows (never issued, or revoked). With authentication off a request
    /// without a token is [`Principal::anonymous`].
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ServiceError> {
        let Some(header) = authorization else {
            if self.auth_on() {
                return Err(unauthenticated(
                    "this node requires a bearer token (Authorization: Bearer <token>); \
                     `synod token create` makes one, `synod dev` prints the first",
                ));
            }
            return Ok(Principal::anonymous());
        };
        let token =
            bearer(header).ok_or_else(|| unauthenticated("the Authorization header is not `Bearer <token>`"))?;
        let hash = token_hash(token);
        self.principal_of(hash).ok_or_else(|| unauthenticated("the bearer token is not valid (unknown or revoked)"))
    }

    /// [`NodeInner::authenticate`], but a token this node does not know is
    /// looked up once more after the node has caught up with the leader (a
    /// read barrier: everything committed when it asked is applied here),
    /// so a token just made through another member works on this one at
    /// once. Only an unknown token of Synod's form costs the round trip,
    /// and the round trips are shared: one runs at a time per node, and a
    /// request that waited while one that started after it arrived ran
    /// takes its outcome (a stream of bad tokens costs about one barrier
    /// per barrier's length, however many). A request waits at most
    /// [`TOKEN_CATCH_UP_WAIT`] in line; one that cannot catch up is told
    /// 503 (the token may be valid), not 401.
    pub async fn authenticate_caught_up(&self, authorization: Option<&str>) -> Result<Principal, ServiceError> {
        let first = self.authenticate(authorization);
        let ours = authorization.and_then(bearer).is_some_and(|t| t.starts_with(TOKEN_PREFIX));
        if first.is_ok() || !self.auth_on() || !ours {
            return first;
        }
        let arrived = tokio::time::Instant::now();
        let cannot = |why: String| {
            ServiceError::new(
                503,
                "unavailable",
                format!(
                    "this node does not know the token yet and cannot catch up with the leader to look again: {why}"
                ),
            )
        };
        let Ok(mut last) = tokio::time::timeout(TOKEN_CATCH_UP_WAIT, self.token_catch_up.lock()).await else {
            return Err(cannot("too many unknown tokens waiting".into()));
        };
        if last.is_none_or(|started| started < arrived) {
            let started = tokio::time::Instant::now();
            match tokio::time::timeout(TOKEN_CATCH_UP_WAIT, self.read_barrier()).await {
                Ok(Ok(())) => *last = Some(started),
                Ok(Err(e)) => return Err(cannot(e.to_string())),
                Err(_) => return Err(cannot("no answer from the leader in time".into())),
            }
        }
        self.authenticate(authorization)
    }

    /// The principal whose token hashes to `hash`, by this node's table.
    pub fn principal_of(&self, hash: TokenHash) -> Option<Principal> {
        let table = self.shared.tokens.read().ok()?.clone();
        table.get(&hash).map(|record| Principal::of(record, hash))
    }

    /// On the leader: the check a forwarded client request must pass. With
    /// a credential, the token must be valid *here* (a revocation this node
    /// applied counts, whatever the follower knew), name the request's
    /// caller, and allow `access`; without one, only an anonymous caller of
    /// a cluster with authentication off.
    pub(super) fn check_credential(
        &self,
        caller: &str,
        credential: Option<TokenHash>,
        access: Access<'_>,
    ) -> Result<(), WriteError> {
        match credential {
            Some(hash) => {
                let who = self.principal_of(hash).ok_or_else(|| {
                    WriteError::Unauthenticated("the token is not valid on the leader (revoked?)".into())
                })?;
                if who.name != caller {
                    return Err(WriteError::Refused(format!(
                        "a forwarded request names caller {caller:?} but its token is {:?}'s",
                        who.name
                    )));
                }
                who.require(access).map_err(|e| WriteError::Forbidden(e.message))
            }
            None if self.auth_on() => Err(WriteError::Unauthenticated(
                "the leader requires a token; the node that took this request did not authenticate it".into(),
            )),
            None if caller != super::ANONYMOUS => {
                Err(WriteError::Refused(format!("a forwarded command may not claim caller {caller:?}")))
            }
            None => Ok(()),
        }
    }

    /// Create a token for `principal` with `roles`; the secret (shown only
    /// here) with the token's public record, and the operation index.
    pub async fn token_create(
        &self,
        who: &Principal,
        principal: &str,
        roles: &[String],
    ) -> Result<(u64, serde_json::Value), ServiceError> {
        who.require(Access::Admin)?;
        crate::replica::auth::check_principal(principal).map_err(|e| ServiceError::new(400, "bad_name", e))?;
        if roles.is_empty() {
            return Err(ServiceError::bad_request("a token needs at least one role"));
        }
        let roles =
            roles.iter().map(|r| Role::parse(r)).collect::<Result<Vec<_>, _>>().map_err(ServiceError::bad_request)?;
        let token = new_token().map_err(|e| ServiceError::new(500, "internal", e))?;
        let op = Op::Auth(AuthOp::Create { hash: token_hash(&token), principal: principal.to_owned(), roles });
        let (index, out) = self.write_applied(op, who, None).await?;
        self.seen_here(index).await;
        let mut record: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        record["token"] = json!(token);
        Ok((index, record))
    }

    /// Revoke a token by id, or every token of a principal.
    pub async fn token_revoke(&self, who: &Principal, target: &str) -> Result<(u64, serde_json::Value), ServiceError> {
        who.require(Access::Admin)?;
        let (index, out) =
            self.write_applied(Op::Auth(AuthOp::Revoke { target: target.to_owned() }), who, None).await?;
        self.seen_here(index).await;
        Ok((index, serde_json::from_slice(&out).unwrap_or_default()))
    }

    /// Every token's public record (never a hash or a secret).
    pub fn token_list(&self, who: &Principal) -> Result<serde_json::Value, ServiceError> {
        who.require(Access::Admin)?;
        let tokens: Vec<serde_json::Value> =
            self.with_replica(|r| r.auth().tokens().map(TokenRecord::public).collect()).unwrap_or_default();
        Ok(json!({ "tokens": tokens }))
    }

    /// The audit trail after operation index `after`.
    pub async fn audit(&self, who: &Principal, after: u64, limit: usize) -> Result<serde_json::Value, ServiceError> {
        who.require(Access::Admin)?;
        self.read_barrier().await?;
        let records = self.with_replica(|r| r.auth().audit_after(after, limit.min(10_000))).unwrap_or_default();
        Ok(json!({ "records": records }))
    }
}

/// Where the bootstrap node keeps the first admin token.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_TOKEN_FILE)
}

/// On the bootstrap node: make sure the cluster has its first admin token.
/// Once this node has caught up with the leader and sees a cluster that
/// has never had a token, it writes one to its data dir (reusing one
/// written by an earlier attempt) and proposes its hash; the entry applies
/// only while the cluster still has no token, so retries are harmless.
pub(super) async fn bootstrap(node: Arc<NodeInner>) {
    use std::sync::atomic::Ordering;
    let path = admin_token_path(&node.config.data_dir);
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if node.read_barrier().await.is_err() {
            continue;
        }
        if node.shared.auth_bootstrapped.load(Ordering::Acquire) {
            if let Ok(token) = read_token_file(&path)
                && node.principal_of(token_hash(&token)).is_none()
                && !warned
            {
                tracing::warn!(path = %path.display(), "this admin token file is not (or no longer) a valid token");
            }
            return;
        }
        let token = match read_token_file(&path) {
            Ok(t) if t.starts_with(TOKEN_PREFIX) => t,
            _ => match new_token() {
                Ok(t) => {
                    if let Err(e) = write_token_file(&path, &t) {
                        tracing::error!(path = %path.display(), error = %e, "cannot write the first admin token");
                        warned = true;
                        continue;
                    }
                    t
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot make the first admin token");
                    continue;
                }
            },
        };
        match node.write(Op::Auth(AuthOp::Bootstrap { hash: token_hash(&token) }), super::SYSTEM).await {
            Ok((index, _)) => {
                tracing::info!(index, path = %path.display(), "first admin token created (principal `admin`)")
            }
            Err(e) => tracing::debug!(error = %e, "cannot bootstrap the first admin token yet"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn token_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = admin_token_path(dir.path());
        let token = new_token().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
        write_token_file(&path, &token).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), token);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_missing_role_is_named() {
        let record = TokenRecord {
            id: "x".into(),
            principal: "bob".into(),
            roles: vec![Role::Reader],
            created_at_ms: 0,
            created_by: "admin".into(),
            created_index: 1,
        };
        let who = Principal::of(&record, [0; 32]);
        who.require(Access::ReadPlugin("counter")).unwrap();
        let e = who.require(Access::Command("counter")).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.message.contains("`operator` or `operator:counter`"), "{}", e.message);
        assert!(e.message.contains("principal `bob` has reader"), "{}", e.message);
        assert!(Principal::anonymous().allows(Access::Admin));
    }
}
