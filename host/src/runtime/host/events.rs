//! `synod:plugin/events`: events buffered with the command's writes.

use super::HostState;
use crate::runtime::bindings::{HostError, synod::plugin::events::Host};
use crate::state::Event;

/// Longest topic, in bytes.
const MAX_TOPIC_BYTES: usize = 128;

/// Topics become NATS subject tokens (`synod.evt.<plugin>.<topic>`): words of
/// letters, digits, `-` and `_`, separated by single dots.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_BYTES
        && topic
            .split('.')
            .all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

impl Host for HostState {
    fn emit(&mut self, topic: String, payload: Vec<u8>) -> wasmtime::Result<Result<(), HostError>> {
        self.charge(topic.len() + payload.len(), 0)?;
        let l = &self.limits;
        if self.read_only {
            return Ok(Err(HostError::ReadOnly));
        }
        if !valid_topic(&topic) {
            return Ok(Err(HostError::LimitExceeded(format!(
                "invalid topic {topic:?}: use dot-separated words of letters, digits, - and _, \
                 at most {MAX_TOPIC_BYTES} bytes"
            ))));
        }
        if payload.len() > l.max_event_bytes {
            return Ok(Err(HostError::LimitExceeded(format!(
                "event payload is {} bytes, over the limit of {}",
                payload.len(),
                l.max_event_bytes
            ))));
        }
        if self.events.len() >= l.max_events {
            return Ok(Err(HostError::LimitExceeded(format!("a command may emit at most {} events", l.max_events))));
        }
        self.events.push(Event { topic, payload });
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn topics() {
        assert!(super::valid_topic("heater.on"));
        assert!(super::valid_topic("zone_1.temp-high"));
        for bad in ["", ".", "a..b", "a.", "a b", "a.*", "a.>", "ü"] {
            assert!(!super::valid_topic(bad), "{bad:?}");
        }
    }
}
