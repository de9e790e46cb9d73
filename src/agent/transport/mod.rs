//! Where the queue's batches go: the [`Sender`] the run loop hands each batch to, and how a
//! batch becomes messages for the network transports. Its own module so that the transports
//! depend on the queue and the configuration only, never on the run loop that drives them.
//!
//! - `local`: a local stream directory (here: a few lines around [`LocalStreamWriter`]).
//! - [`mqtt`]: IoT Core or any broker, TLS with the device certificate, QoS 1.
//! - `kinesis`: PutRecords straight from the device (the `agent-kinesis` feature).

#[cfg(feature = "agent-kinesis")]
pub mod kinesis;
pub mod mqtt;

use tokio::sync::{mpsc, oneshot};

use super::config::{AgentConfig, Transport};
use super::queue::Entry;
use crate::localstream::{self, LocalStreamWriter};

/// What a transport with commands hands the commands task, in the order it arrived.
pub enum Incoming {
    /// A desired-state document (the payload as received).
    Desired(Vec<u8>),
    /// Everything retained before this point was received: answer (through
    /// [`Outbound::Flush`]) once it is handled and its report is on its way.
    Synced(oneshot::Sender<()>),
}

/// What the commands task hands a transport with commands to send, in order.
pub enum Outbound {
    /// A reported-state document.
    Report(Vec<u8>),
    /// Answered once every report before it was handed to the connection, so readings sent
    /// after it follow those reports.
    Flush(oneshot::Sender<()>),
}

/// Where readings go. An enum rather than a trait object: each transport is a few lines of
/// dispatch and async trait methods are not object-safe.
pub enum Sender {
    Local(LocalStreamWriter),
    Mqtt(Box<mqtt::Mqtt>),
    #[cfg(feature = "agent-kinesis")]
    Kinesis(Box<kinesis::KinesisSender>),
}

impl Sender {
    /// The transport `cfg` names, connected lazily where it has a connection (MQTT).
    /// `incoming` receives desired states where `cfg.commands` is set.
    pub async fn open(
        cfg: &AgentConfig,
        incoming: Option<mpsc::UnboundedSender<Incoming>>,
    ) -> anyhow::Result<Sender> {
        match &cfg.transport {
            #[cfg(feature = "agent-kinesis")]
            Transport::Kinesis { stream, region } => Ok(Sender::Kinesis(Box::new(
                kinesis::KinesisSender::new(stream, region.as_deref(), cfg.batch.max_bytes).await,
            ))),
            #[cfg(not(feature = "agent-kinesis"))]
            Transport::Kinesis { .. } => anyhow::bail!(
                "{}: transport.kinesis: this build has no Kinesis transport; build with --features agent-kinesis, or use mqtt",
                cfg.file.display()
            ),
            Transport::Mqtt(m) => {
                let mut mqtt =
                    mqtt::Mqtt::new(m.clone(), &cfg.device_id, &cfg.tenant, cfg.batch.max_bytes)?;
                if let (Some(c), Some(incoming)) = (&cfg.commands, incoming) {
                    mqtt = mqtt.with_commands(c, incoming);
                }
                Ok(Sender::Mqtt(Box::new(mqtt)))
            }
            Transport::Local { stream, shards } => Ok(Sender::Local(open_local(stream, *shards)?)),
        }
    }

    /// Delivers the batch; `Ok` means acknowledged (for `local`: written to the stream files).
    pub async fn send(&mut self, device_id: &str, batch: &[Entry]) -> anyhow::Result<()> {
        match self {
            Sender::Mqtt(m) => m.send(batch).await,
            #[cfg(feature = "agent-kinesis")]
            Sender::Kinesis(k) => k.send(device_id, batch).await,
            Sender::Local(w) => {
                for e in batch {
                    w.put(device_id, &e.payload)?;
                }
                w.flush()?;
                Ok(())
            }
        }
    }

    /// Where the commands task sends reported states (published retained on the device's
    /// reported topic whenever connected). Only MQTT carries commands; elsewhere they go
    /// nowhere (the configuration refuses `commands` without MQTT).
    pub fn reports(&self) -> mpsc::UnboundedSender<Outbound> {
        match self {
            Sender::Mqtt(m) => m.reports(),
            _ => mpsc::unbounded_channel().0,
        }
    }

    /// Called while idle: a transport that must stay connected to receive commands
    /// reconnects here.
    pub async fn maintain(&mut self) {
        if let Sender::Mqtt(m) = self {
            m.maintain().await
        }
    }

    /// Readings sent more than once so far (see `Summary::readings_resent`); the local stream
    /// never resends.
    pub fn resent_readings(&self) -> u64 {
        match self {
            Sender::Mqtt(m) => m.resent_readings,
            #[cfg(feature = "agent-kinesis")]
            Sender::Kinesis(k) => k.resent_readings,
            Sender::Local(_) => 0,
        }
    }
}

/// The local stream at `stream`, created with `shards` shards if it does not exist yet.
fn open_local(stream: &std::path::Path, shards: usize) -> anyhow::Result<LocalStreamWriter> {
    if localstream::read_meta(stream).is_err() {
        localstream::create(stream, shards)?;
    }
    LocalStreamWriter::open(stream)
        .map_err(|e| anyhow::anyhow!("cannot open the local stream {}: {e}", stream.display()))
}

/// A message for a network transport: newline-separated readings.
pub struct Message {
    pub bytes: Vec<u8>,
    pub readings: usize,
}

/// The batch as messages of at most `max` bytes each (a reading longer than `max` goes
/// alone), in order.
pub fn messages(batch: &[Entry], max: usize) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    for e in batch {
        match out.last_mut() {
            Some(m) if m.bytes.len() + 1 + e.payload.len() <= max => {
                m.bytes.push(b'\n');
                m.bytes.extend_from_slice(&e.payload);
                m.readings += 1;
            }
            _ => out.push(Message {
                bytes: e.payload.clone(),
                readings: 1,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::queue::Pos;

    fn batch(payloads: &[&str]) -> Vec<Entry> {
        payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry {
                seq: i as u64 + 1,
                payload: p.as_bytes().to_vec(),
                next: Pos {
                    segment: 0,
                    offset: i as u64 + 1,
                },
            })
            .collect()
    }

    /// Each message as text with its reading count.
    fn texts(messages: &[Message]) -> Vec<(String, usize)> {
        messages
            .iter()
            .map(|m| (String::from_utf8(m.bytes.clone()).unwrap(), m.readings))
            .collect()
    }

    #[test]
    fn an_empty_batch_is_no_message() {
        assert!(messages(&[], 100).is_empty());
    }

    #[test]
    fn readings_are_joined_by_newlines_up_to_exactly_max() {
        // "aaaa\nbbbb" is 9 bytes: it fits a max of 9, not of 8.
        let b = batch(&["aaaa", "bbbb", "cccc"]);
        assert_eq!(
            texts(&messages(&b, 9)),
            [("aaaa\nbbbb".into(), 2), ("cccc".into(), 1)]
        );
        assert_eq!(
            texts(&messages(&b, 8)),
            [("aaaa".into(), 1), ("bbbb".into(), 1), ("cccc".into(), 1)]
        );
        assert_eq!(texts(&messages(&b, 14)), [("aaaa\nbbbb\ncccc".into(), 3)]);
    }

    #[test]
    fn a_reading_longer_than_max_goes_alone_and_order_is_kept() {
        let b = batch(&["a", "b", "a-long-reading", "c", "d"]);
        assert_eq!(
            texts(&messages(&b, 4)),
            [
                ("a\nb".into(), 2),
                ("a-long-reading".into(), 1),
                ("c\nd".into(), 2),
            ]
        );
    }

    #[test]
    fn every_reading_is_in_exactly_one_message() {
        let payloads: Vec<String> = (0..50).map(|i| format!("reading-{i}")).collect();
        let refs: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let b = batch(&refs);
        for max in [1, 10, 25, 100, 10_000] {
            let ms = messages(&b, max);
            assert_eq!(ms.iter().map(|m| m.readings).sum::<usize>(), b.len());
            let joined: Vec<String> = texts(&ms)
                .into_iter()
                .flat_map(|(t, n)| {
                    let parts: Vec<String> = t.split('\n').map(str::to_string).collect();
                    assert_eq!(parts.len(), n, "max {max}: count matches the lines");
                    parts
                })
                .collect();
            assert_eq!(joined, payloads, "max {max}");
            assert!(
                ms.iter().all(|m| m.bytes.len() <= max || m.readings == 1),
                "max {max}: only a lone reading exceeds max"
            );
        }
    }
}
