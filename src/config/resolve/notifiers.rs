//! `notifiers:`: where alerts are sent besides the alerts table (an SNS topic or a webhook),
//! how often, and for which rules.

use std::collections::HashSet;

use crate::config::file::NotifierFile;
use crate::config::{Notifier, NotifyTarget, Problems};

/// `rules` holds every alert rule's name.
pub(super) fn resolve_notifiers(
    p: &mut Problems,
    files: &[NotifierFile],
    rules: &HashSet<String>,
) -> Vec<Notifier> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for (i, n) in files.iter().enumerate() {
        let at = |k: &str| format!("notifiers[{i}].{k}");
        // Names only label logs and metrics: hyphens are fine.
        let valid = !n.name.is_empty()
            && n.name.len() <= 64
            && n.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            p.add(
                &at("name"),
                format!("`{}` is not a valid notifier name", n.name),
                "use 1 to 64 letters, digits, `-` and `_`",
            );
        }
        if !names.insert(n.name.clone()) {
            p.add(
                &at("name"),
                format!("notifier name `{}` is used twice", n.name),
                "give every notifier its own name",
            );
        }
        let cooldown = p.duration(&at("cooldown"), &n.cooldown).as_micros() as i64;
        for (j, r) in n.rules.iter().flatten().enumerate() {
            if !rules.contains(r) {
                let mut known: Vec<_> = rules.iter().map(String::as_str).collect();
                known.sort_unstable();
                p.add(
                    &format!("notifiers[{i}].rules[{j}]"),
                    format!("no alert rule is named `{r}`"),
                    format!("name one of: {}", known.join(", ")),
                );
            }
        }
        let Some(target) = resolve_target(p, i, n) else {
            continue;
        };
        out.push(Notifier {
            name: n.name.clone(),
            target,
            cooldown,
            rules: n.rules.clone(),
        });
    }
    out
}

/// The one target of notifier `i`; `None` (reported) without exactly one.
fn resolve_target(p: &mut Problems, i: usize, n: &NotifierFile) -> Option<NotifyTarget> {
    let target = match (&n.sns, &n.webhook) {
        (Some(sns), None) => {
            if !sns.topic_arn.starts_with("arn:") || sns.topic_arn.split(':').count() != 6 {
                p.add(
                    &format!("notifiers[{i}].sns.topic_arn"),
                    format!("`{}` is not a topic ARN", sns.topic_arn),
                    "write arn:aws:sns:<region>:<account>:<topic>",
                );
            }
            NotifyTarget::Sns {
                topic_arn: sns.topic_arn.clone(),
            }
        }
        (None, Some(hook)) => {
            if !(hook.url.starts_with("https://") || hook.url.starts_with("http://")) {
                // The URL may carry a token: it is not repeated in the message.
                p.add(
                    &format!("notifiers[{i}].webhook.url"),
                    "is not an http:// or https:// URL",
                    "write the receiver's full URL, e.g. https://hooks.example.com/shardlake",
                );
            }
            NotifyTarget::Webhook {
                url: hook.url.clone(),
                headers: hook
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        }
        _ => {
            p.add(
                &format!("notifiers[{i}]"),
                "a notifier needs exactly one of `sns` and `webhook`",
                "keep one; declare another notifier for the other target",
            );
            return None;
        }
    };
    Some(target)
}
