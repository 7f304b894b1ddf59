//! The CLI's HTTP client: what `synod cmd`, `synod plugin …` and
//! `synod status` send to a node.
//!
//! In: a node URL, a bearer token and a request. Out: the node's JSON
//! answer, or an error carrying the status and the node's message.
//!
//! The CLI finds its token on its own ([`find_token`]): `--token` /
//! `SYNOD_TOKEN`, else the file `SYNOD_TOKEN_FILE` names, else the first
//! admin token of a `synod dev` cluster in `.synod-dev` here. Over HTTPS it
//! trusts a CA file (`--ca-file` / `SYNOD_CA_FILE`), else the dev cluster's
//! own certificate when there is one, else the system's roots.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node could not be reached.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A CA file could not be used.
    #[error("CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The node answered with an error status.
    #[error("{status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The node's JSON error body.
        body: Value,
    },
}

/// A client for one node's API. Cloning shares its connection pool.
#[derive(Clone)]
pub struct Client {
    /// `http://127.0.0.1:7001`, no trailing slash.
    base: String,
    /// Connection pool.
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` with every request.
    token: Option<String>,
}

/// The dev cluster's directory, where `synod dev` runs by default.
pub const DEV_DIR: &str = ".synod-dev";

/// The token the CLI sends: `explicit` (`--token` / `SYNOD_TOKEN`), else
/// the contents of `SYNOD_TOKEN_FILE`, else the first admin token of a dev
/// cluster in `./.synod-dev` (node 1 bootstraps it).
pub fn find_token(explicit: Option<String>) -> Option<String> {
    if let Some(t) = explicit.filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let file = match std::env::var_os("SYNOD_TOKEN_FILE") {
        Some(f) => PathBuf::from(f),
        None => crate::node::auth::admin_token_path(&Path::new(DEV_DIR).join("n1")),
    };
    crate::node::auth::read_token_file(&file).ok().filter(|t| !t.is_empty())
}

/// The CA the CLI trusts: `explicit`, else the dev cluster's certificate
/// while the dev cluster here runs with `--tls`.
pub fn find_ca(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        let dev = Path::new(DEV_DIR);
        let config = crate::config::NodeConfig::load(&dev.join("n1").join("synod.toml")).ok()?;
        config.tls.is_some().then(|| crate::dev::tls_cert_path(dev)).filter(|p| p.exists())
    })
}

impl Client {
    /// A client for the node at `base` (`127.0.0.1:7001` or a full URL).
    pub fn new(base: &str) -> Client {
        let base = base.trim_end_matches('/');
        let base = if base.starts_with("http://") || base.starts_with("https://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        Client { base, http: Self::builder().build().unwrap_or_default(), token: None }
    }

    pub(crate) fn builder() -> reqwest::ClientBuilder {
        // reqwest takes its TLS backend from rustls' process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
    }

    /// Send `token` as a bearer token with every request.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    /// Trust the PEM certificate(s) in `ca` (and only them) for HTTPS.
    pub fn with_ca(mut self, ca: &Path) -> Result<Client, ClientError> {
        let err = |reason: String| ClientError::Ca { path: ca.to_owned(), reason };
        let pem = std::fs::read(ca).map_err(|e| err(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no certificate in the file".into()));
        }
        self.http = Self::builder().tls_certs_only(certs).build().map_err(|e| err(e.to_string()))?;
        Ok(self)
    }

    /// The node's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send `req` with this client's token; the response whatever its
    /// status.
    async fn respond(&self, req: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        req.send().await.map_err(|e| ClientError::Unreachable { url: url.to_owned(), reason: e.to_string() })
    }

    /// The response's body: JSON, else its text as a JSON string.
    async fn body(resp: reqwest::Response, url: &str) -> Result<Value, ClientError> {
        let bytes =
            resp.bytes().await.map_err(|e| ClientError::Unreachable { url: url.to_owned(), reason: e.to_string() })?;
        Ok(serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())))
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Value, ClientError> {
        let resp = self.respond(req, url).await?;
        let status = resp.status();
        let body = Self::body(resp, url).await?;
        if status.is_success() { Ok(body) } else { Err(ClientError::Status { status: status.as_u16(), body }) }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), &url).await
    }

    /// GET `path` as a stream (Server-Sent Events): the response once its
    /// status is a success, to read chunk by chunk.
    pub async fn stream(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.respond(self.http.get(&url), &url).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        Err(ClientError::Status { status: status.as_u16(), body: Self::body(resp, &url).await? })
    }

    /// POST `body` to `path`.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).body(body), &url).await
    }

    /// POST `body` to `path` in chunks, calling `sent` with the bytes sent
    /// so far as they go (for a progress bar).
    pub async fn post_with_progress(
        &self,
        path: &str,
        body: Vec<u8>,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Value, ClientError> {
        const CHUNK: usize = 64 * 1024;
        let url = format!("{}{path}", self.base);
        let len = body.len();
        let body = bytes::Bytes::from(body);
        let chunks = (0..len.div_ceil(CHUNK)).map(move |i| {
            let end = ((i + 1) * CHUNK).min(len);
            sent(end as u64);
            Ok::<_, std::io::Error>(body.slice(i * CHUNK..end))
        });
        let req = self
            .http
            .post(&url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)));
        self.send(req, &url).await
    }

    /// POST `body` to `path` with extra headers (e.g. `Synod-Request-Id`).
    pub async fn post_with_headers(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.post(&url).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req, &url).await
    }

    /// PUT `body` to `path`.
    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.put(&url).body(body), &url).await
    }

    /// PATCH `path` with `body`.
    pub async fn patch(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.patch(&url).body(body), &url).await
    }

    /// DELETE `path`.
    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.delete(&url), &url).await
    }
}
