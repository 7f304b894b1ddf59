//! The CLI's HTTP client: what `synod cmd`, `synod plugin …` and
//! `synod status` send to a node.
//!
//! In: a node URL and a request. Out: the node's JSON answer, or an error
//! carrying the status and the node's message.

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
    /// The node answered with an error status.
    #[error("{status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The node's JSON error body.
        body: Value,
    },
}

/// A client for one node's API.
pub struct Client {
    /// `http://127.0.0.1:7001`, no trailing slash.
    base: String,
    /// Connection pool.
    http: reqwest::Client,
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
        Client { base, http: reqwest::Client::new() }
    }

    async fn send(&self, req: reqwest::RequestBuilder, url: &str) -> Result<Value, ClientError> {
        let resp =
            req.send().await.map_err(|e| ClientError::Unreachable { url: url.to_owned(), reason: e.to_string() })?;
        let status = resp.status();
        let bytes =
            resp.bytes().await.map_err(|e| ClientError::Unreachable { url: url.to_owned(), reason: e.to_string() })?;
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() { Ok(body) } else { Err(ClientError::Status { status: status.as_u16(), body }) }
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.get(&url), &url).await
    }

    /// POST `body` to `path`.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        self.send(self.http.post(&url).body(body), &url).await
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
