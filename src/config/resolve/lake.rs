//! `lake:`, and a table's own `sink:` (the same form): a local directory or an S3 bucket and
//! prefix with how objects are written.

use crate::config::file::{CompactionFile, LakeFile, S3LakeFile};
use crate::config::{
    Compaction, LakeLocation, Outputs, Problems, S3Location, STORAGE_CLASSES, TableFormat,
};

/// `compaction:`: only for Delta tables.
pub(super) fn resolve_compaction(
    p: &mut Problems,
    f: &CompactionFile,
    outputs: &Outputs,
) -> Compaction {
    if !outputs.formats.values().any(|f| *f == TableFormat::Delta) {
        p.add(
            "compaction",
            "compacts Delta tables, and every output of this pipeline is in the hive layout",
            "set `format: delta` under `lake:` (or a table's `sink:`), or remove `compaction:`: the hive layout cannot be compacted safely, readers would see old and new files at once",
        );
    }
    let every = p.duration("compaction.every", &f.every);
    if every.is_zero() {
        p.add(
            "compaction.every",
            "is zero",
            "give how often to compact, e.g. 15m",
        );
    }
    let target_size = p.bytes("compaction.target_size", &f.target_size);
    if target_size != 0 && target_size < 1 << 20 {
        p.add(
            "compaction.target_size",
            format!("{} is smaller than 1MiB", f.target_size),
            "compacted files are for readers: give 128MiB to 512MiB",
        );
    }
    if !f.zorder.is_empty() && !f.sort.is_empty() {
        p.add(
            "compaction.sort",
            "both `zorder` and `sort` are given",
            "give one: `sort: [device_id, ts]` keeps each file to a range of devices, which is what one device's queries skip by",
        );
    }
    Compaction {
        every,
        older_than: p.duration("compaction.older_than", &f.older_than),
        target_size,
        zorder: f.zorder.clone(),
        sort: f.sort.clone(),
    }
}

/// Resolves the lake written at `field` (`lake`, or `outputs.<table>.sink`): where, and in
/// which table format.
pub(super) fn resolve_lake(
    p: &mut Problems,
    field: &str,
    f: LakeFile,
) -> (LakeLocation, TableFormat) {
    let format = match f.format.as_deref() {
        None | Some("hive") => TableFormat::Hive,
        Some("delta") => TableFormat::Delta,
        Some(other) => {
            p.add(
                &format!("{field}.format"),
                format!("`{other}` is not a table format"),
                "write `hive` (Parquet in year=/month=/day=/hour= directories, the default) or `delta` (the same files as a Delta Lake table)",
            );
            TableFormat::Hive
        }
    };
    let location = match (f.local, f.s3) {
        (Some(local), None) => LakeLocation::Local {
            path: local.path.into(),
        },
        (None, Some(s3)) => resolve_s3(p, field, s3),
        (local, s3) => {
            let (msg, fix) = if local.is_some() && s3.is_some() {
                ("has both `local` and `s3`", "keep one of them")
            } else {
                (
                    "names no lake",
                    "add `local: {path: DIR}` or `s3: {bucket: NAME, prefix: PATH}`",
                )
            };
            p.add(field, msg, fix);
            LakeLocation::Local {
                path: Default::default(),
            }
        }
    };
    (location, format)
}

fn resolve_s3(p: &mut Problems, field: &str, f: S3LakeFile) -> LakeLocation {
    let S3LakeFile {
        bucket,
        prefix,
        region,
        kms_key_id,
        storage_class,
        part_size,
    } = f;
    let at = |k: &str| format!("{field}.s3.{k}");
    if !is_bucket_name(&bucket) {
        p.add(
                    &at("bucket"),
                    format!("`{bucket}` is not an S3 bucket name"),
                    "give the bucket's name only (3-63 lowercase letters, digits, `.` and `-`), without s3:// or a path; put the path in `prefix`",
                );
    }
    let size = p.bytes(&at("part_size"), &part_size);
    if size != 0 && !(5 << 20..=5 << 30).contains(&size) {
        p.add(
            &at("part_size"),
            format!("{part_size} is outside S3's part sizes"),
            "write a size from 5MiB to 5GiB, e.g. 8MiB",
        );
    }
    if let Some(class) = &storage_class
        && !STORAGE_CLASSES.contains(&class.as_str())
    {
        p.add(
            &at("storage_class"),
            format!("`{class}` is not a storage class objects can be written with"),
            format!("use one of: {}", STORAGE_CLASSES.join(", ")),
        );
    }
    if kms_key_id.as_deref() == Some("") {
        p.add(
            &at("kms_key_id"),
            "is empty",
            "give a KMS key id or ARN, or remove the key to use the bucket's default encryption",
        );
    }
    LakeLocation::S3(S3Location {
        bucket,
        prefix: prefix.trim_matches('/').to_string(),
        region: region.filter(|r| !r.is_empty()),
        kms_key_id,
        storage_class,
        part_size: size as usize,
    })
}

pub(super) fn is_bucket_name(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}
