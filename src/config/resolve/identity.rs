//! `identity:`: the partition key's shape (`{tenant}/{device_id}`), checked against the
//! schema (each `{field}` a string field, two fields never side by side) and the source (the
//! key must exist: a Kinesis source).

use crate::config::file::IdentityFile;
use crate::config::{FieldType, Identity, KeyPart, Problems, RecordSchema, Source};

pub(super) fn resolve_identity(
    p: &mut Problems,
    f: &IdentityFile,
    schema: Option<&RecordSchema>,
    source: &Source,
) -> Option<Identity> {
    if f.from != "partition_key" {
        p.add(
            "identity.from",
            format!("`{}` is not a source of identity", f.from),
            "write `from: partition_key` (the key the IoT rule puts each record under)",
        );
        return None;
    }
    if let Source::Local { .. } | Source::Objects(_) = source {
        p.add(
            "identity.from",
            match source {
                Source::Local { .. } => "the local stream keeps no partition keys, so nothing proves a record's identity",
                _ => "objects and files have no partition keys, so nothing proves a record's identity",
            },
            "use a Kinesis source (the IoT rule or `shardlake bridge` puts the keys), or leave \
             `identity` out",
        );
    }
    let mut parts = Vec::new();
    let mut rest = f.key.as_str();
    while !rest.is_empty() {
        match rest.find('{') {
            Some(0) => {
                let Some(end) = rest.find('}') else {
                    p.add(
                        "identity.key",
                        format!("`{}`: `{{` without `}}`", f.key),
                        "write fields as `{name}`, e.g. `{tenant}/{device_id}`",
                    );
                    return None;
                };
                let name = rest[1..end].trim();
                if matches!(parts.last(), Some(KeyPart::Field { .. })) {
                    p.add(
                        "identity.key",
                        format!("`{}`: two fields side by side cannot be told apart", f.key),
                        "put a separator between them, e.g. `{tenant}/{device_id}`",
                    );
                    return None;
                }
                let field = schema.and_then(|s| s.fields.iter().position(|x| x.name == name));
                match (schema, field) {
                    (Some(s), Some(index)) if s.fields[index].ty == FieldType::String => {
                        parts.push(KeyPart::Field {
                            name: name.to_string(),
                            index,
                        });
                    }
                    (Some(s), Some(index)) => p.add(
                        "identity.key",
                        format!(
                            "field `{name}` is a {:?}; a partition key proves only string fields",
                            s.fields[index].ty
                        ),
                        "name string fields of the schema",
                    ),
                    (Some(s), None) => p.add(
                        "identity.key",
                        format!("`{{{name}}}`: the schema {} has no field `{name}`", s.name),
                        format!(
                            "use one of: {}",
                            s.fields
                                .iter()
                                .filter(|x| x.ty == FieldType::String)
                                .map(|x| x.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                    (None, _) => {}
                }
                rest = &rest[end + 1..];
            }
            Some(start) => {
                parts.push(KeyPart::Text(rest[..start].to_string()));
                rest = &rest[start..];
            }
            None => {
                parts.push(KeyPart::Text(rest.to_string()));
                rest = "";
            }
        }
    }
    if !parts.iter().any(|x| matches!(x, KeyPart::Field { .. })) {
        p.add(
            "identity.key",
            format!("`{}` names no field, so it proves nothing", f.key),
            "write e.g. `{tenant}/{device_id}`",
        );
        return None;
    }
    Some(Identity {
        key: f.key.clone(),
        parts,
    })
}
