//! `shardlake device set|show`: an operator's hand on a device's desired state.
//!
//! The desired and reported states are retained MQTT messages on the device's own topics
//! (the protocol and why: [`crate::agent::commands`]). `set` reads the retained desired state,
//! applies the given changes to it, and publishes the whole document again with the next
//! version, retained, at QoS 1; with `--wait` it then waits for the device's report of that
//! version. A device that is offline applies it when it next connects.
//!
//! Reading the retained state: the client subscribes to each topic and then once more to the
//! first one. A broker answers one connection's packets in order, and sends a topic's retained
//! message right after that subscription's SUBACK, so when the last SUBACK arrives every
//! retained message asked for has arrived (the last subscription's own copy is not needed).
//!
//! Two operators writing the same device at the same moment can both pick the same next
//! version; the broker keeps the later document and the device applies it (a version equal to
//! the one in force with other content is applied). Alert actions, when they come, write
//! through the pipeline, one writer per device.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use serde_json::Value as Json;

use crate::agent::commands::{Desired, Reported, Status};

/// An error that the same call would meet again (certificate files, a retained document that
/// is not a desired state): not worth retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotRetryable(pub String);

/// Which broker, as whom.
#[derive(Debug, Clone)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    /// CA, certificate and key (PEM) for TLS with a client certificate; plain TCP without.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    pub client_id: String,
    /// How long to wait for the broker's answers.
    pub timeout: Duration,
}

impl Broker {
    /// The pipeline's `commands:` broker, under a client id of its own for this connection
    /// (workers, rules and console requests connect side by side).
    pub fn of(b: &crate::config::CommandsBroker) -> Self {
        Self {
            host: b.host.clone(),
            port: b.port,
            tls: b.tls.clone(),
            client_id: format!("{}-{:08x}", b.client_id, fastrand::u32(..)),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The device's two topics.
#[derive(Debug, Clone)]
pub struct Topics {
    pub desired: String,
    pub reported: String,
}

impl Topics {
    /// From templates with `{tenant}` and `{device_id}`.
    pub fn new(desired: &str, reported: &str, tenant: &str, device: &str) -> anyhow::Result<Self> {
        if device.is_empty() || device.contains(['/', '+', '#']) || tenant.contains(['/', '+', '#'])
        {
            anyhow::bail!(
                "`{tenant}`/`{device}`: a tenant and device id cannot hold `/`, `+` or `#`"
            );
        }
        let fill = |t: &str| crate::agent::commands::device_topic(t, tenant, device);
        Ok(Self {
            desired: fill(desired),
            reported: fill(reported),
        })
    }
}

/// What `show` and `set` print.
#[derive(Debug, Serialize)]
pub struct DeviceState {
    pub desired: Option<Desired>,
    pub reported: Option<Reported>,
}

/// One `key=value` of the command line: `true`/`false` and numbers as JSON, the rest as text.
pub fn parse_setting(arg: &str) -> anyhow::Result<(String, Json)> {
    let (key, value) = arg.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("`{arg}` is not key=value (e.g. sensors.pressure.interval=1s)")
    })?;
    if key.is_empty() {
        anyhow::bail!("`{arg}`: the key is empty");
    }
    let json = match value {
        "true" => Json::Bool(true),
        "false" => Json::Bool(false),
        v => match v.parse::<i64>() {
            Ok(n) => Json::from(n),
            Err(_) => match v.parse::<f64>() {
                Ok(f) if f.is_finite() => Json::from(f),
                _ => Json::String(v.to_string()),
            },
        },
    };
    Ok((key.to_string(), json))
}

/// The next desired document: `current` with `set` applied and `unset` removed, its version
/// one past both the current one and `reported` (the version the device has in force: after
/// the desired topic was cleared, a version counted from 1 again would be stale to it).
pub fn next_desired(
    current: Option<&Desired>,
    reported: Option<&Reported>,
    set: &[(String, Json)],
    unset: &[String],
    by: &str,
) -> Desired {
    let mut state = current.map(|d| d.state.clone()).unwrap_or_default();
    for k in unset {
        state.remove(k);
    }
    for (k, v) in set {
        state.insert(k.clone(), v.clone());
    }
    Desired {
        version: current
            .map_or(0, |d| d.version)
            .max(reported.map_or(0, |r| r.version))
            + 1,
        state,
        by: Some(by.to_string()),
        at: Some(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)),
    }
}

struct Session {
    mqtt: AsyncClient,
    events: EventLoop,
    timeout: Duration,
    retained: BTreeMap<String, Vec<u8>>,
}

impl Session {
    fn open(b: &Broker) -> anyhow::Result<Self> {
        let mut opts = MqttOptions::new(&b.client_id, &b.host, b.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(128 * 1024, 128 * 1024);
        if let Some((ca, cert, key)) = &b.tls {
            crate::agent::transport::mqtt::set_tls(&mut opts, (ca, cert, key), b.port)
                .map_err(|e| NotRetryable(e.to_string()))?;
        }
        let (mqtt, events) = AsyncClient::new(opts, 16);
        Ok(Self {
            mqtt,
            events,
            timeout: b.timeout,
            retained: BTreeMap::new(),
        })
    }

    async fn next(&mut self) -> anyhow::Result<Event> {
        match tokio::time::timeout(self.timeout, self.events.poll()).await {
            Err(_) => anyhow::bail!("no answer from the broker within {:?}", self.timeout),
            Ok(Err(e)) => anyhow::bail!("MQTT: {e}"),
            Ok(Ok(e)) => Ok(e),
        }
    }

    /// Subscribes to `topics` and collects their retained messages (see the module doc).
    async fn fetch(&mut self, topics: &[&str]) -> anyhow::Result<()> {
        for t in topics.iter().chain(topics.first()) {
            self.mqtt.subscribe(*t, QoS::AtLeastOnce).await?;
        }
        let mut sent = Vec::new();
        loop {
            match self.next().await? {
                Event::Outgoing(Outgoing::Subscribe(pkid)) => sent.push(pkid),
                Event::Incoming(Packet::SubAck(ack)) => {
                    if crate::agent::transport::mqtt::refused(&ack) {
                        anyhow::bail!(
                            "the broker refused to let this client read {topics:?}: check its certificate's policy or ACL"
                        );
                    }
                    if sent.len() == topics.len() + 1 && sent.last() == Some(&ack.pkid) {
                        return Ok(());
                    }
                }
                Event::Incoming(Packet::Publish(p)) if p.retain => {
                    self.retained.insert(p.topic.clone(), p.payload.to_vec());
                }
                _ => {}
            }
        }
    }

    /// Publishes `desired` retained at QoS 1 and waits for its PUBACK; returns the messages
    /// that came in meanwhile.
    async fn publish(
        &mut self,
        topic: &str,
        desired: &Desired,
    ) -> anyhow::Result<Vec<rumqttc::Publish>> {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, true, serde_json::to_vec(desired)?)
            .await?;
        let mut pkid = None;
        let mut came = Vec::new();
        loop {
            match self.next().await? {
                Event::Outgoing(Outgoing::Publish(id)) => pkid = Some(id),
                Event::Incoming(Packet::PubAck(ack)) if Some(ack.pkid) == pkid => return Ok(came),
                Event::Incoming(Packet::Publish(p)) => came.push(p),
                _ => {}
            }
        }
    }

    fn state(&self, topics: &Topics) -> anyhow::Result<DeviceState> {
        let parse = |topic: &str| -> anyhow::Result<Option<Vec<u8>>> {
            Ok(self.retained.get(topic).filter(|b| !b.is_empty()).cloned())
        };
        let desired = match parse(&topics.desired)? {
            Some(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                NotRetryable(format!("{} holds a message that is not a desired state ({e}); clear it with an empty retained message", topics.desired))
            })?),
            None => None,
        };
        // A report that does not parse is shown as missing rather than failing the command.
        let reported = parse(&topics.reported)?.and_then(|b| serde_json::from_slice(&b).ok());
        Ok(DeviceState { desired, reported })
    }
}

/// The device's retained desired and reported states.
pub async fn show(broker: &Broker, topics: &Topics) -> anyhow::Result<DeviceState> {
    let mut s = Session::open(broker)?;
    s.fetch(&[&topics.desired, &topics.reported]).await?;
    let state = s.state(topics)?;
    let _ = s.mqtt.disconnect().await;
    Ok(state)
}

/// How `set` ended.
#[derive(Debug, Serialize)]
pub struct SetOutcome {
    pub desired: Desired,
    /// The device's report of this version (with `--wait`), if it came in time.
    pub reported: Option<Reported>,
}

/// Publishes the next desired state; with `wait`, waits that long for the device's report of
/// that version.
pub async fn set(
    broker: &Broker,
    topics: &Topics,
    settings: &[(String, Json)],
    unset: &[String],
    by: &str,
    wait: Option<Duration>,
) -> anyhow::Result<SetOutcome> {
    let mut s = Session::open(broker)?;
    s.fetch(&[&topics.desired, &topics.reported]).await?;
    let current = s.state(topics)?;
    let desired = next_desired(
        current.desired.as_ref(),
        current.reported.as_ref(),
        settings,
        unset,
        by,
    );
    let came = s.publish(&topics.desired, &desired).await?;
    let answers = |p: &rumqttc::Publish| -> Option<Reported> {
        (p.topic == topics.reported)
            .then(|| serde_json::from_slice::<Reported>(&p.payload).ok())
            .flatten()
            .filter(|r| r.desired_version >= desired.version)
    };
    let mut reported = came.iter().find_map(answers);
    if let Some(wait) = wait {
        let deadline = tokio::time::Instant::now() + wait;
        while reported.is_none() {
            let event = match tokio::time::timeout_at(deadline, s.events.poll()).await {
                Err(_) => break,
                Ok(e) => e.map_err(|e| anyhow::anyhow!("MQTT: {e}"))?,
            };
            if let Event::Incoming(Packet::Publish(p)) = event {
                reported = answers(&p);
            }
        }
    }
    let _ = s.mqtt.disconnect().await;
    Ok(SetOutcome { desired, reported })
}

/// What [`command`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Sent {
    /// Published as this version.
    Published(u64),
    /// The retained desired state already is this command (sent before a restart): nothing
    /// published.
    AlreadyThere(u64),
}

/// An alert action's command: `set` over the retained desired state, written as `by` (one
/// id per alert). A command found already retained under its id is not published again, so a
/// command redone after a crash makes no second version. Returns what happened and the
/// previous value of each key (`None`: not in the desired state), for [`restore`].
pub async fn command(
    broker: &Broker,
    topics: &Topics,
    set: &BTreeMap<String, Json>,
    by: &str,
) -> anyhow::Result<(Sent, BTreeMap<String, Option<Json>>)> {
    let mut s = Session::open(broker)?;
    s.fetch(&[&topics.desired, &topics.reported]).await?;
    let DeviceState {
        desired: current,
        reported,
    } = s.state(topics)?;
    if let Some(d) = &current
        && d.by.as_deref() == Some(by)
    {
        let _ = s.mqtt.disconnect().await;
        return Ok((Sent::AlreadyThere(d.version), BTreeMap::new()));
    }
    let before: BTreeMap<String, Option<Json>> = set
        .keys()
        .map(|k| {
            (
                k.clone(),
                current.as_ref().and_then(|d| d.state.get(k).cloned()),
            )
        })
        .collect();
    let set: Vec<(String, Json)> = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let desired = next_desired(current.as_ref(), reported.as_ref(), &set, &[], by);
    let version = desired.version;
    s.publish(&topics.desired, &desired).await?;
    let _ = s.mqtt.disconnect().await;
    Ok((Sent::Published(version), before))
}

/// Ends an alert action's command: if the retained desired state is still the one `by`
/// wrote, publishes the next version with each key as it was `before`. Returns the version
/// published, `None` if someone changed the desired state since (theirs stands).
pub async fn restore(
    broker: &Broker,
    topics: &Topics,
    before: &BTreeMap<String, Option<Json>>,
    by: &str,
) -> anyhow::Result<Option<u64>> {
    let mut s = Session::open(broker)?;
    s.fetch(&[&topics.desired, &topics.reported]).await?;
    let DeviceState { desired, reported } = s.state(topics)?;
    let Some(current) = desired else {
        let _ = s.mqtt.disconnect().await;
        return Ok(None);
    };
    if current.by.as_deref() != Some(by) {
        let _ = s.mqtt.disconnect().await;
        return Ok(None);
    }
    let set: Vec<(String, Json)> = before
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
        .collect();
    let unset: Vec<String> = before
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.clone())
        .collect();
    let desired = next_desired(
        Some(&current),
        reported.as_ref(),
        &set,
        &unset,
        &format!("{by}:expired"),
    );
    let version = desired.version;
    s.publish(&topics.desired, &desired).await?;
    let _ = s.mqtt.disconnect().await;
    Ok(Some(version))
}

/// A one-line verdict on `set`'s outcome, and whether it is a success.
pub fn verdict(o: &SetOutcome, waited: bool) -> (String, bool) {
    let v = o.desired.version;
    match &o.reported {
        None if waited => (
            format!(
                "version {v} is published; the device did not report it in time (offline? it applies it when it connects)"
            ),
            false,
        ),
        None => (
            format!("version {v} is published; the device applies it when connected"),
            true,
        ),
        Some(r) => match r.status {
            Status::Applied => (format!("version {v} applied by the device"), true),
            Status::Refused | Status::Failed | Status::Stale => {
                let why: Vec<String> = r.refused.iter().map(|(k, w)| format!("{k}: {w}")).collect();
                (
                    format!(
                        "version {v} {:?} by the device: {}",
                        r.status,
                        why.join("; ")
                    )
                    .to_lowercase(),
                    false,
                )
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_typed_like_json() {
        assert_eq!(
            parse_setting("sensors.p.interval=1s").unwrap(),
            ("sensors.p.interval".into(), Json::from("1s"))
        );
        assert_eq!(
            parse_setting("sensors.p.enabled=false").unwrap().1,
            Json::Bool(false)
        );
        assert_eq!(parse_setting("outputs.valve=1").unwrap().1, Json::from(1));
        assert_eq!(
            parse_setting("outputs.dimmer=0.5").unwrap().1,
            Json::from(0.5)
        );
        assert_eq!(parse_setting("k=").unwrap().1, Json::from(""));
        assert!(parse_setting("no-equals").is_err());
        assert!(parse_setting("=1").is_err());
    }

    #[test]
    fn the_next_version_keeps_what_it_does_not_change() {
        let first = next_desired(None, None, &[("a".into(), Json::from(1))], &[], "user:x");
        assert_eq!(first.version, 1);
        let second = next_desired(
            Some(&first),
            None,
            &[("b".into(), Json::from(true))],
            &[],
            "user:y",
        );
        assert_eq!(second.version, 2);
        assert_eq!(second.state.len(), 2);
        let third = next_desired(Some(&second), None, &[], &["a".into()], "user:y");
        assert_eq!(
            (third.version, third.state.keys().collect::<Vec<_>>()),
            (3, vec![&"b".to_string()])
        );
    }

    #[test]
    fn topics_refuse_wildcards_and_levels_in_ids() {
        let t = Topics::new(
            "sensors/{tenant}/{device_id}/desired",
            "sensors/{tenant}/{device_id}/reported",
            "acme",
            "pi-1",
        )
        .unwrap();
        assert_eq!(t.desired, "sensors/acme/pi-1/desired");
        assert!(Topics::new("{device_id}", "r/{device_id}", "acme", "pi/2").is_err());
        assert!(Topics::new("{device_id}", "r/{device_id}", "a+", "pi").is_err());
    }
}
