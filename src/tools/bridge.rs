//! `shardlake bridge`: the IoT Core rule's job on one machine. It subscribes to an MQTT broker
//! (Mosquitto) and puts each message, whole, on a Kinesis stream with the partition key the
//! rule in `deploy/` uses (`${topic(2)}/${topic(3)}`: the tenant and device levels, which the
//! broker's ACL, like the IoT policy, pins to the certificate), so the full path runs locally:
//! agent → Mosquitto → bridge → Kinesis (a local server) → pipeline.
//!
//! A message is acknowledged to the broker (QoS 1, manual acks) only after Kinesis accepted
//! it, and puts are made one at a time per message with `SequenceNumberForOrdering`, so each
//! device's messages keep their order on the shard. A broker restart loses nothing: the
//! session is persistent (`clean_session = false`), unacknowledged messages come again.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use tracing::{info, warn};

/// Where the bridge reads and writes.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    pub host: String,
    pub port: u16,
    /// CA, certificate and key (PEM) for TLS with a client certificate; plain TCP without.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    pub client_id: String,
    pub topic: String,
    pub stream: String,
    /// IoT SQL's substitution template: `${topic(N)}` (1-based level), `${topic()}`, text.
    pub partition_key: String,
}

#[derive(Debug, Default, Serialize)]
pub struct BridgeSummary {
    pub messages: u64,
    pub bytes: u64,
    pub put_retries: u64,
}

/// The partition key for `topic` from an IoT SQL template, or why the template is wrong.
pub fn partition_key(template: &str, topic: &str) -> Result<String, String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("`{template}`: `${{` without `}}`"))?;
        let expr = rest[start + 2..start + end].trim();
        let arg = expr
            .strip_prefix("topic(")
            .and_then(|a| a.strip_suffix(')'))
            .ok_or_else(|| {
                format!("`{expr}` in `{template}`: only topic() and topic(N) are supported")
            })?;
        if arg.trim().is_empty() {
            out.push_str(topic);
        } else {
            let n: usize = arg
                .trim()
                .parse()
                .map_err(|_| format!("`{expr}`: N must be a level number from 1"))?;
            // Like IoT SQL: a level that is not there is empty.
            out.push_str(n.checked_sub(1).and_then(|i| levels.get(i)).unwrap_or(&""));
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    if out.is_empty() || out.len() > 256 {
        return Err(format!(
            "`{template}` gives the key `{out}` for topic `{topic}`; Kinesis needs 1 to 256 characters"
        ));
    }
    Ok(out)
}

pub async fn run(
    opts: BridgeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<BridgeSummary> {
    // Check the template once, on a topic of the shape the filter matches.
    partition_key(&opts.partition_key, &opts.topic.replace(['+', '#'], "x"))
        .map_err(|e| anyhow::anyhow!("--partition-key: {e}"))?;
    let conf = crate::aws::sdk_config(None).await;
    let kinesis = aws_sdk_kinesis::Client::new(&conf);

    let mut mqtt = MqttOptions::new(&opts.client_id, &opts.host, opts.port);
    mqtt.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(256 * 1024, 256 * 1024);
    if let Some((ca, cert, key)) = &opts.tls {
        crate::agent::transport::mqtt::set_tls(&mut mqtt, (ca, cert, key), opts.port)?;
    }
    let (client, mut events) = AsyncClient::new(mqtt, 64);
    client.subscribe(&opts.topic, QoS::AtLeastOnce).await?;
    info!(broker = %opts.host, port = opts.port, topic = %opts.topic, stream = %opts.stream,
          partition_key = %opts.partition_key, "bridge started");

    let mut summary = BridgeSummary::default();
    let mut last_seq: HashMap<String, String> = HashMap::new();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = &mut shutdown => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(
                    session_present = ack.session_present,
                    "bridge connected to the broker"
                );
                if !ack.session_present {
                    client.subscribe(&opts.topic, QoS::AtLeastOnce).await?;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if crate::agent::transport::mqtt::refused(&ack) {
                    anyhow::bail!(
                        "the broker refused the subscription to {:?}: check the client's \
                         authorization (IoT policy or ACL) for that topic filter",
                        opts.topic
                    );
                }
                info!(topic = %opts.topic, "bridge subscribed");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let key = partition_key(&opts.partition_key, &p.topic)
                    .map_err(|e| anyhow::anyhow!("--partition-key: {e}"))?;
                let seq = put(
                    &kinesis,
                    &opts.stream,
                    &key,
                    &p.payload,
                    last_seq.get(&key),
                    &mut summary,
                )
                .await?;
                last_seq.insert(key, seq);
                summary.messages += 1;
                summary.bytes += p.payload.len() as u64;
                client.ack(&p).await?;
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = &mut shutdown => break,
                }
            }
        }
    }
    let _ = client.disconnect().await;
    Ok(summary)
}

/// PutRecord, retried with backoff on throttling and transient errors for up to a minute.
async fn put(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    key: &str,
    data: &[u8],
    after: Option<&String>,
    summary: &mut BridgeSummary,
) -> anyhow::Result<String> {
    let mut backoff = Duration::from_millis(100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut req = kinesis
            .put_record()
            .stream_name(stream)
            .partition_key(key)
            .data(Blob::new(data));
        if let Some(seq) = after {
            req = req.sequence_number_for_ordering(seq);
        }
        match req.send().await {
            Ok(out) => return Ok(out.sequence_number().to_string()),
            Err(e) => {
                let service = e.as_service_error();
                let permanent = service.is_some_and(|s| {
                    s.is_resource_not_found_exception() || s.is_invalid_argument_exception()
                });
                if permanent || tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("PutRecord to {stream}: {}", crate::aws::describe(&e));
                }
                summary.put_retries += 1;
                tokio::time::sleep(backoff + backoff.mul_f64(fastrand::f64() * 0.5)).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::partition_key;

    #[test]
    fn keys_like_the_iot_rule() {
        let t = "sensors/acme/pi-0001/telemetry";
        assert_eq!(partition_key("${topic(3)}", t).unwrap(), "pi-0001");
        assert_eq!(
            partition_key("${topic(2)}-${topic(3)}", t).unwrap(),
            "acme-pi-0001"
        );
        assert_eq!(partition_key("${topic()}", t).unwrap(), t);
        assert!(partition_key("${topic(9)}", t).is_err(), "an empty key");
        assert!(partition_key("${clientid()}", t).is_err());
    }
}
