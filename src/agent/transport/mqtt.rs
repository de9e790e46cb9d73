//! MQTT to AWS IoT Core (or any broker) over TLS with the device's X.509 certificate, QoS 1.
//!
//! A batch from the queue becomes one or more messages, each at most `batch.max_bytes` of
//! newline-separated readings (IoT Core takes 128 KB), published at most
//! `max_publishes_per_s` (IoT Core allows 100 per connection). The batch is acknowledged to
//! the queue once every message got its PUBACK. A connection error or a missing PUBACK drops
//! the connection and fails the batch; the queue sends it again on a new connection, so a
//! message may arrive twice (QoS 1's contract), never zero times. rumqttc's own resending of
//! pending publishes is not used: the queue is the one place that decides what is resent.
//!
//! With `commands:` the same connection carries the device's desired and reported state
//! (IoT Core lets a thing connect once, under its own name). On every connection the agent
//! subscribes to its desired topic and then to its reported topic; the broker answers a
//! connection's packets in order, so the second SUBACK comes after the retained desired state
//! (if any), and readings are sent only once that state was handled (up to
//! `commands.fetch_timeout`). Reported states are published retained at QoS 0: one lost with
//! its connection is reported again when the next connection delivers the desired state again.
//! An idle agent with commands reconnects by itself ([`Mqtt::maintain`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::{info, warn};

use super::{Incoming, Outbound};
use crate::agent::config::{CommandsConfig, MqttConfig};
use crate::agent::queue::Entry;

/// What the event-loop task reports.
enum Report {
    Connected,
    Published(u16),
    Acked(u16),
    /// The retained desired state of this connection, if any, was handed on; the receiver
    /// completes once it was handled.
    Synced(oneshot::Receiver<()>),
    Failed(String),
}

struct Connection {
    client: AsyncClient,
    reports: mpsc::UnboundedReceiver<Report>,
    task: tokio::task::JoinHandle<()>,
    /// Publishes reported states while the connection lives.
    reporter: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(r) = &self.reporter {
            r.abort();
        }
    }
}

/// The commands' side of the connection.
struct Commands {
    desired: String,
    reported: String,
    fetch_timeout: Duration,
    incoming: mpsc::UnboundedSender<Incoming>,
    /// Reported states waiting for a connection (kept across connections).
    outbox: Arc<Mutex<mpsc::UnboundedReceiver<Outbound>>>,
    outbox_tx: mpsc::UnboundedSender<Outbound>,
}

pub struct Mqtt {
    cfg: MqttConfig,
    topic: String,
    tls: Arc<rustls::ClientConfig>,
    max_message: usize,
    conn: Option<Connection>,
    last_publish: Option<Instant>,
    /// Readings of batches that failed and will be published again: the most a receiver can
    /// see twice (QoS 1 duplicates this agent caused).
    pub resent_readings: u64,
    failed_before: bool,
    commands: Option<Commands>,
    /// An idle reconnect ([`Mqtt::maintain`]) waits until then after a failed one.
    reconnect_at: Option<tokio::time::Instant>,
    reconnect_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{field}: cannot read {path}: {why}")]
    File {
        field: &'static str,
        path: String,
        why: String,
    },
    #[error("MQTT TLS: {0}")]
    Tls(String),
}

struct TlsFiles<'a> {
    ca: &'a std::path::Path,
    cert: &'a std::path::Path,
    key: &'a std::path::Path,
    port: u16,
}

fn pem_file<T>(
    field: &'static str,
    path: &std::path::Path,
    parse: impl FnOnce(&std::path::Path) -> Result<T, rustls::pki_types::pem::Error>,
) -> Result<T, MqttError> {
    parse(path).map_err(|e| MqttError::File {
        field,
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The topic this device publishes to: `template` (`transport.mqtt.topic`) with
/// `{device_id}` and `{tenant}` replaced.
fn topic(template: &str, device_id: &str, tenant: &str) -> String {
    crate::agent::commands::device_topic(template, tenant, device_id)
}

/// Sets TLS with a client certificate on `opts` (`shardlake bridge` and `device`: flags
/// `--ca`, `--cert`, `--key`).
pub fn set_tls(
    opts: &mut MqttOptions,
    (ca, cert, key): (&std::path::Path, &std::path::Path, &std::path::Path),
    port: u16,
) -> Result<(), MqttError> {
    let tls = client_tls(ca, cert, key, port, ["--ca", "--cert", "--key"])?;
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    Ok(())
}

/// Whether the broker refused a subscription of this SUBACK (a policy or ACL that does not
/// let the client read the topic).
pub fn refused(ack: &rumqttc::SubAck) -> bool {
    ack.return_codes
        .iter()
        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
}

/// rustls on ring with the broker's CA as the only root and the device's certificate.
fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    client_tls(
        &cfg.ca,
        &cfg.cert,
        &cfg.key,
        cfg.port,
        [
            "transport.mqtt.ca",
            "transport.mqtt.cert",
            "transport.mqtt.key",
        ],
    )
}

/// A TLS client configuration trusting only `ca`, authenticating with `cert` and `key` (PEM);
/// shared with `shardlake bridge`. `fields` name the three where errors are reported.
pub fn client_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
    port: u16,
    fields: [&'static str; 3],
) -> Result<rustls::ClientConfig, MqttError> {
    let cfg = TlsFiles {
        ca,
        cert,
        key,
        port,
    };
    let [ca_field, cert_field, key_field] = fields;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer> = pem_file(ca_field, cfg.ca, |p| {
        CertificateDer::pem_file_iter(p)?.collect()
    })?;
    if cas.is_empty() {
        return Err(MqttError::File {
            field: ca_field,
            path: cfg.ca.display().to_string(),
            why: "no certificate in it (expected PEM, e.g. AmazonRootCA1.pem)".into(),
        });
    }
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| MqttError::Tls(format!("the CA in {}: {e}", cfg.ca.display())))?;
    }
    let chain: Vec<CertificateDer<'static>> = pem_file(cert_field, cfg.cert, |p| {
        CertificateDer::pem_file_iter(p)?.collect()
    })?;
    let key = pem_file(key_field, cfg.key, |p| PrivateKeyDer::from_pem_file(p))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| MqttError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            MqttError::Tls(format!(
                "the certificate {} and key {} do not go together: {e}",
                cfg.cert.display(),
                cfg.key.display()
            ))
        })?;
    // IoT Core serves MQTT on 443 only to clients that ask for it by ALPN.
    if cfg.port == 443 {
        config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    }
    Ok(config)
}

impl Mqtt {
    pub fn new(
        cfg: MqttConfig,
        device_id: &str,
        tenant: &str,
        max_message: usize,
    ) -> Result<Self, MqttError> {
        let tls = Arc::new(tls_config(&cfg)?);
        Ok(Self {
            topic: topic(&cfg.topic, device_id, tenant),
            cfg,
            tls,
            max_message,
            conn: None,
            last_publish: None,
            resent_readings: 0,
            failed_before: false,
            commands: None,
            reconnect_at: None,
            reconnect_backoff: Duration::from_secs(1),
        })
    }

    /// Receives the desired state on this connection (see the module doc).
    pub fn with_commands(
        mut self,
        cfg: &CommandsConfig,
        incoming: mpsc::UnboundedSender<Incoming>,
    ) -> Self {
        let (outbox_tx, outbox) = mpsc::unbounded_channel();
        self.commands = Some(Commands {
            desired: cfg.desired_topic.clone(),
            reported: cfg.reported_topic.clone(),
            fetch_timeout: cfg.fetch_timeout,
            incoming,
            outbox: Arc::new(Mutex::new(outbox)),
            outbox_tx,
        });
        self
    }

    /// Where reported states go (published on the next connection if none is up).
    pub fn reports(&self) -> mpsc::UnboundedSender<Outbound> {
        match &self.commands {
            Some(c) => c.outbox_tx.clone(),
            None => mpsc::unbounded_channel().0,
        }
    }

    /// With commands: connects if the connection is gone, so desired states keep arriving
    /// while there is nothing to send.
    /// After a failure it waits, 1 s doubling to a minute, before it tries again.
    pub async fn maintain(&mut self) {
        if self.commands.is_none()
            || self
                .reconnect_at
                .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            return;
        }
        match self.ensure_connected().await {
            Ok(()) => {
                self.reconnect_at = None;
                self.reconnect_backoff = Duration::from_secs(1);
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?self.reconnect_backoff, "MQTT: not connected; desired states arrive once it is");
                self.reconnect_at = Some(tokio::time::Instant::now() + self.reconnect_backoff);
                self.reconnect_backoff = (self.reconnect_backoff * 2).min(Duration::from_secs(60));
            }
        }
    }

    /// A live connection; a new one waits until the retained desired state was handled.
    async fn ensure_connected(&mut self) -> anyhow::Result<()> {
        if self.conn.as_ref().is_some_and(|c| !c.task.is_finished()) {
            return Ok(());
        }
        self.conn = Some(self.connect());
        let Some(commands) = &self.commands else {
            return Ok(());
        };
        // The connection first (up to ack_timeout), then up to fetch_timeout for the desired
        // state: a slow TLS handshake does not eat the time the broker has to answer.
        let mut deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        let conn = self.conn.as_mut().expect("connected above");
        loop {
            match tokio::time::timeout_at(deadline, conn.reports.recv()).await {
                Err(_) => {
                    warn!(topic = %commands.desired, timeout = ?commands.fetch_timeout, "no answer to the desired-state subscription in time (commands.fetch_timeout); sending anyway");
                    return Ok(());
                }
                Ok(Some(Report::Synced(handled))) => {
                    if tokio::time::timeout_at(deadline, handled).await.is_err() {
                        warn!(
                            "the desired state was not handled within commands.fetch_timeout; sending anyway"
                        );
                    }
                    return Ok(());
                }
                Ok(Some(Report::Connected)) => {
                    deadline = tokio::time::Instant::now() + commands.fetch_timeout;
                    info!(broker = %self.cfg.host, port = self.cfg.port, client_id = %self.cfg.client_id, "MQTT connected")
                }
                Ok(Some(Report::Failed(why))) => {
                    self.conn = None;
                    self.failed_before = true;
                    anyhow::bail!(
                        "MQTT connection to {}:{} failed: {why}",
                        self.cfg.host,
                        self.cfg.port
                    )
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.conn = None;
                    anyhow::bail!("MQTT: the connection task ended")
                }
            }
        }
    }

    fn connect(&self) -> Connection {
        let mut opts = MqttOptions::new(&self.cfg.client_id, &self.cfg.host, self.cfg.port);
        opts.set_keep_alive(self.cfg.keep_alive)
            .set_clean_session(true)
            // IoT Core's limit is 128 KB; rumqttc's default is 10 KiB.
            .set_max_packet_size(128 * 1024, 128 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let (tx, reports) = mpsc::unbounded_channel();
        let mut reporter = None;
        let mut desired = None;
        if let Some(c) = &self.commands {
            // Queued now, sent once connected: desired first, then reported as the barrier.
            let _ = client.try_subscribe(&c.desired, QoS::AtLeastOnce);
            let _ = client.try_subscribe(&c.reported, QoS::AtLeastOnce);
            desired = Some((c.desired.clone(), c.incoming.clone()));
            let (outbox, topic, client) = (c.outbox.clone(), c.reported.clone(), client.clone());
            reporter = Some(tokio::spawn(async move {
                // Publishes go through the client's queue in order: readings sent after a
                // flush was answered follow the reports before it.
                let mut outbox = outbox.lock().await;
                while let Some(out) = outbox.recv().await {
                    match out {
                        Outbound::Report(report) => {
                            if client
                                .publish(&topic, QoS::AtMostOnce, true, report)
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Outbound::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            }));
        }
        let task = tokio::spawn(poll(eventloop, tx, desired));
        Connection {
            client,
            reports,
            task,
            reporter,
        }
    }

    /// Publishes the batch as newline-separated messages and waits for every PUBACK.
    pub async fn send(&mut self, batch: &[Entry]) -> anyhow::Result<()> {
        let messages: Vec<Vec<u8>> = super::messages(batch, self.max_message)
            .into_iter()
            .map(|m| m.bytes)
            .collect();
        let result = self.publish_all(&messages).await;
        match &result {
            Ok(()) => {
                if self.failed_before {
                    info!(broker = %self.cfg.host, "MQTT delivery works again");
                    self.failed_before = false;
                }
            }
            Err(_) => {
                // A fresh connection next time; what was not acknowledged is sent again.
                self.conn = None;
                self.failed_before = true;
                self.resent_readings += batch.len() as u64;
            }
        }
        result
    }

    async fn publish_all(&mut self, messages: &[Vec<u8>]) -> anyhow::Result<()> {
        self.ensure_connected().await?;
        let pace = Duration::from_secs_f64(1.0 / self.cfg.max_publishes_per_s as f64);
        let conn = self.conn.as_mut().expect("connected above");
        let deadline = tokio::time::Instant::now() + self.cfg.ack_timeout;
        let mut published = Vec::new();
        let mut acked = std::collections::HashSet::new();
        for m in messages {
            if let Some(last) = self.last_publish {
                let next = last + pace;
                if next > Instant::now() {
                    tokio::time::sleep(next - Instant::now()).await;
                }
            }
            self.last_publish = Some(Instant::now());
            conn.client
                .publish(&self.topic, QoS::AtLeastOnce, false, m.clone())
                .await
                .map_err(|e| anyhow::anyhow!("MQTT publish to {}: {e}", self.cfg.host))?;
        }
        while published.len() < messages.len() || !published.iter().all(|p| acked.contains(p)) {
            let report = tokio::time::timeout_at(deadline, conn.reports.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "MQTT: no PUBACK from {}:{} within {:?} (transport.mqtt.ack_timeout)",
                        self.cfg.host,
                        self.cfg.port,
                        self.cfg.ack_timeout
                    )
                })?;
            match report {
                Some(Report::Connected) => {
                    info!(broker = %self.cfg.host, port = self.cfg.port, client_id = %self.cfg.client_id, "MQTT connected")
                }
                Some(Report::Published(pkid)) => published.push(pkid),
                Some(Report::Acked(pkid)) => {
                    acked.insert(pkid);
                }
                Some(Report::Synced(_)) => {}
                Some(Report::Failed(why)) => anyhow::bail!(
                    "MQTT connection to {}:{} failed: {why}",
                    self.cfg.host,
                    self.cfg.port
                ),
                None => anyhow::bail!("MQTT: the connection task ended"),
            }
        }
        Ok(())
    }
}

/// Drives rumqttc's event loop and reports what the sender waits for; stops at the first
/// error (the sender reconnects). With `desired` (its topic and the commands task), desired
/// states are handed on, and the second SUBACK (the barrier) is reported as synced.
async fn poll(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Report>,
    desired: Option<(String, mpsc::UnboundedSender<Incoming>)>,
) {
    let mut subscribes = Vec::new();
    loop {
        let report = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Report::Connected,
            Ok(Event::Incoming(Packet::PubAck(ack))) => Report::Acked(ack.pkid),
            // QoS 0 (reported states) has no packet id and no PUBACK: not the sender's.
            Ok(Event::Outgoing(Outgoing::Publish(0))) => continue,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Report::Published(pkid),
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                subscribes.push(pkid);
                continue;
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let Some((topic, incoming)) = &desired else {
                    continue;
                };
                if refused(&ack) {
                    warn!(topic = %topic, "the broker refused a commands subscription (the IoT policy or ACL must let the device subscribe to its desired and reported topics)");
                }
                if subscribes.get(1) != Some(&ack.pkid) {
                    continue;
                }
                let (done, handled) = oneshot::channel();
                let _ = incoming.send(Incoming::Synced(done));
                Report::Synced(handled)
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some((topic, incoming)) = &desired
                    && p.topic == *topic
                {
                    let _ = incoming.send(Incoming::Desired(p.payload.to_vec()));
                }
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Report::Failed(explain(&e)));
                return;
            }
        };
        if tx.send(report).is_err() {
            return;
        }
    }
}

/// rumqttc's error with what to check: most failures at this point are certificates.
fn explain(e: &ConnectionError) -> String {
    let text = e.to_string();
    let lower = format!("{e:?}").to_lowercase();
    let hint = if lower.contains("unknownissuer") || lower.contains("invalid peer certificate") {
        "the broker's certificate is not signed by transport.mqtt.ca (for IoT Core: AmazonRootCA1.pem), or the host name does not match it"
    } else if lower.contains("certificaterequired")
        || lower.contains("unknownca")
        || lower.contains("badcertificate")
        || lower.contains("handshakefailure")
        || lower.contains("certificate")
    {
        "the broker refused the device certificate: check transport.mqtt.cert and key are the ones registered and active for this thing, and that its policy allows iot:Connect and iot:Publish"
    } else if lower.contains("connection reset")
        || lower.contains("unexpected eof")
        || lower.contains("broken pipe")
    {
        "the broker closed the connection (for IoT Core: an inactive certificate, a policy that denies this client id or topic, or another connection with the same client id)"
    } else if lower.contains("refused") {
        "nothing listens there; check transport.mqtt.host and port"
    } else {
        "the readings stay queued and are sent when the broker is reachable"
    };
    format!("{text} ({hint})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_names_the_device_and_its_tenant() {
        assert_eq!(
            topic("sensors/{tenant}/{device_id}/telemetry", "pi-7", "acme"),
            "sensors/acme/pi-7/telemetry"
        );
        assert_eq!(
            topic("{device_id}/{device_id}", "pi-7", "acme"),
            "pi-7/pi-7",
            "every occurrence is replaced"
        );
        assert_eq!(topic("plain/topic", "pi-7", "acme"), "plain/topic");
    }

    fn io(kind: std::io::ErrorKind, text: &str) -> ConnectionError {
        ConnectionError::Io(std::io::Error::new(kind, text.to_string()))
    }

    #[test]
    fn connection_errors_say_what_to_check() {
        let refused = explain(&io(std::io::ErrorKind::ConnectionRefused, "refused"));
        assert!(
            refused.contains("transport.mqtt.host and port"),
            "{refused}"
        );
        let reset = explain(&io(std::io::ErrorKind::Other, "connection reset by peer"));
        assert!(
            reset.contains("the broker closed the connection"),
            "{reset}"
        );
        let timeout = explain(&ConnectionError::NetworkTimeout);
        assert!(timeout.starts_with("Network timeout ("), "{timeout}");
        assert!(timeout.contains("the readings stay queued"), "{timeout}");
    }

    #[test]
    fn an_unknown_issuer_blames_the_ca_not_the_device_certificate() {
        // Both mention "certificate": the CA check has to come first.
        let text = explain(&io(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        ));
        assert!(text.contains("not signed by transport.mqtt.ca"), "{text}");
        let refused = explain(&io(
            std::io::ErrorKind::InvalidData,
            "received fatal alert: CertificateRequired",
        ));
        assert!(
            refused.contains("refused the device certificate"),
            "{refused}"
        );
    }
}
