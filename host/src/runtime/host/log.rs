//! `synod:plugin/log`: bounded plugin log lines, kept by the node and never
//! replicated or hashed.

use serde::Serialize;

use super::{HostState, truncate_utf8};
use crate::runtime::bindings::synod::plugin::log::{Host, Level};

/// One line a plugin wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The text, cut to the plugin's line limit.
    pub message: String,
}

impl Host for HostState {
    fn write(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        if self.logs.len() >= self.limits.max_log_lines {
            self.logs_dropped = self.logs_dropped.saturating_add(1);
            return Ok(());
        }
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        let message = truncate_utf8(message, self.limits.max_log_line_bytes);
        self.logs.push(LogLine { level, message });
        Ok(())
    }
}
