//! `commands:` and `alerts[].action`: an alert rule that sets its device's desired state
//! becomes a notifier of its own (`action:<rule>`), with the notifiers' cooldown, queue and
//! never-blocking offer; its target is the commands broker ([`crate::notify`]).

use std::path::Path;

use crate::config::file::{AlertFile, CommandsFile};
use crate::config::{CommandAction, CommandsBroker, Notifier, NotifyTarget, Problems};

/// The broker, and one notifier per rule with an action; `base` is the pipeline file's
/// directory (relative certificate paths are relative to it).
pub(super) fn resolve_actions(
    p: &mut Problems,
    alerts: &[AlertFile],
    commands: Option<&CommandsFile>,
    base: &Path,
) -> (Option<CommandsBroker>, Vec<Notifier>) {
    let broker = commands.map(|c| CommandsBroker {
        host: c.mqtt.host.clone(),
        port: c.mqtt.port,
        tls: match (&c.mqtt.ca, &c.mqtt.cert, &c.mqtt.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some((base.join(ca), base.join(cert), base.join(key)))
            }
            _ => None,
        },
        client_id: c.mqtt.client_id.clone(),
        desired_topic: c.desired_topic.clone(),
        reported_topic: c.reported_topic.clone(),
        tenant: c.tenant.clone(),
    });
    let mut out = Vec::new();
    if let Some(c) = commands {
        for (field, t) in [
            ("desired_topic", &c.desired_topic),
            ("reported_topic", &c.reported_topic),
        ] {
            if !crate::agent::commands::is_device_topic(t) {
                p.add(
                    &format!("commands.{field}"),
                    format!("`{t}` is not a topic of one device"),
                    "include {device_id} (and {tenant}) and no wildcards, e.g. sensors/{tenant}/{device_id}/desired",
                );
            }
        }
        let tls = [&c.mqtt.ca, &c.mqtt.cert, &c.mqtt.key];
        if tls.iter().any(|x| x.is_some()) && !tls.iter().all(|x| x.is_some()) {
            p.add(
                "commands.mqtt",
                "TLS needs all of `ca`, `cert` and `key`",
                "give the broker's CA (for IoT Core AmazonRootCA1.pem) and this service's certificate and key, or none for plain TCP on a test broker",
            );
        }
    }
    for (i, r) in alerts.iter().enumerate() {
        let Some(a) = &r.action else { continue };
        let at = |k: &str| format!("alerts[{i}].action.{k}");
        if commands.is_none() {
            p.add(
                &format!("alerts[{i}].action"),
                "an action needs the broker it sends desired states through",
                "add `commands: {mqtt: {host: <IoT endpoint>, ca: ..., cert: ..., key: ...}}` to the pipeline",
            );
            continue;
        };
        if a.set.is_empty() {
            p.add(
                &at("set"),
                "sets nothing",
                "e.g. set: {sensors.pressure.interval: 1s}",
            );
        }
        for (k, v) in &a.set {
            if !crate::agent::commands::is_command_key(k) {
                p.add(
                    &format!("alerts[{i}].action.set.{k}"),
                    "is not a setting a device takes",
                    "use sensors.<name>.interval, sensors.<name>.enabled or outputs.<name>",
                );
            } else if k.ends_with(".interval")
                && v.as_str()
                    .is_none_or(|t| humantime::parse_duration(t).is_err())
            {
                p.add(
                    &format!("alerts[{i}].action.set.{k}"),
                    format!("{v} is not a duration"),
                    "write e.g. 1s or 250ms",
                );
            } else if k.ends_with(".enabled") && !v.is_boolean() {
                p.add(
                    &format!("alerts[{i}].action.set.{k}"),
                    format!("{v} is not true or false"),
                    "write true or false",
                );
            }
        }
        let for_ = a.for_.as_ref().map(|d| p.duration(&at("for"), d));
        let cooldown = match &a.cooldown {
            Some(d) => p.duration(&at("cooldown"), d),
            None => for_.unwrap_or(std::time::Duration::from_secs(15 * 60)),
        };
        out.push(Notifier {
            name: format!("action:{}", r.name),
            target: NotifyTarget::Command(Box::new(CommandAction {
                rule: r.name.clone(),
                set: a.set.clone(),
                for_,
                dry_run: a.dry_run,
                broker: broker.clone().expect("set with commands"),
            })),
            cooldown: cooldown.as_micros() as i64,
            rules: Some(vec![r.name.clone()]),
        });
    }
    (broker, out)
}
