//! A record schema file (`schemas/*.yaml`): its fields' names, none of them a column
//! shardlake adds, and its key.

use std::path::Path;

use crate::config::file::SchemaFile;
use crate::config::{Field, Problems, RESERVED_COLUMNS, RecordSchema};

/// `path` is the schema file's, kept in the [`RecordSchema`] for later messages.
pub(in crate::config) fn resolve_schema(
    path: &Path,
    f: SchemaFile,
    p: &mut Problems,
) -> RecordSchema {
    if f.fields.is_empty() {
        p.add(
            "fields",
            "a schema needs at least one field",
            "list the record's fields under `fields:`",
        );
    }
    let mut seen = std::collections::HashSet::new();
    for (i, field) in f.fields.iter().enumerate() {
        let at = format!("fields[{i}].name");
        p.ident(&at, &field.name);
        if RESERVED_COLUMNS.contains(&field.name.as_str()) {
            p.add(
                &at,
                format!("`{}` is a column shardlake adds", field.name),
                format!(
                    "rename the field (reserved: {})",
                    RESERVED_COLUMNS.join(", ")
                ),
            );
        }
        if !seen.insert(field.name.as_str()) {
            p.add(
                &at,
                format!("field `{}` is listed twice", field.name),
                "remove one of them",
            );
        }
    }
    if let Some(key) = &f.key
        && !f.fields.iter().any(|x| &x.name == key)
    {
        p.add(
            "key",
            format!("key field `{key}` is not one of the fields"),
            "name a field listed under `fields:`",
        );
    }
    RecordSchema {
        file: path.to_path_buf(),
        name: f.name,
        key: f.key,
        fields: f
            .fields
            .into_iter()
            .map(|x| Field {
                name: x.name,
                ty: x.ty,
                required: x.required,
            })
            .collect(),
    }
}
