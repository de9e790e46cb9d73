//! `commands:` and `alerts[].action`: an alert rule that sets its device's desired state
//! becomes a notifier of its own (`action:<rule>`), with the notifiers' cooldown, queue and
//! never-blocking offer; its target is the commands broker ([`crate::notify`]).

use std::path::Path;

use crate::config::file::{AlertFile, CommandsFile};
use crate::config::{CommandAction, Notifier, NotifyTarget, Problems};

/// Keys an action may set: what the agent takes (`src/agent/commands.rs`).
fn key_ok(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        ["sensors", name, "interval" | "enabled"] | ["outputs", name] => !name.is_empty(),
        _ => false,
    }
}

/// One notifier per rule with an action; `base` is the pipeline file's directory (relative
/// certificate paths are relative to it).
pub(super) fn resolve_actions(
    p: &mut Problems,
    alerts: &[AlertFile],
    commands: Option<&CommandsFile>,
    base: &Path,
) -> Vec<Notifier> {
    let mut out = Vec::new();
    if let Some(c) = commands {
        for (field, t) in [
            ("desired_topic", &c.desired_topic),
            ("reported_topic", &c.reported_topic),
        ] {
            if !t.contains("{device_id}") || t.contains(['+', '#']) {
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
        let Some(c) = commands else {
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
            if !key_ok(k) {
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
        let tls = match (&c.mqtt.ca, &c.mqtt.cert, &c.mqtt.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some((base.join(ca), base.join(cert), base.join(key)))
            }
            _ => None,
        };
        out.push(Notifier {
            name: format!("action:{}", r.name),
            target: NotifyTarget::Command(Box::new(CommandAction {
                rule: r.name.clone(),
                set: a.set.clone(),
                for_,
                dry_run: a.dry_run,
                host: c.mqtt.host.clone(),
                port: c.mqtt.port,
                tls,
                client_id: c.mqtt.client_id.clone(),
                desired_topic: c.desired_topic.clone(),
                reported_topic: c.reported_topic.clone(),
                tenant_field: c.tenant_field.clone(),
                tenant: c.tenant.clone(),
            })),
            cooldown: cooldown.as_micros() as i64,
            rules: Some(vec![r.name.clone()]),
        });
    }
    out
}
