//! Acknowledgements of alerts, kept where they survive a console restart and are seen by
//! every console serving the pipeline: one small JSON document per acknowledged alert, named
//! by the alert's id, created only if absent, so the first acknowledgement stands whichever
//! console took it.
//!
//! They live beside the alerts output's lake, under `_console/acks/`: files in a local lake
//! (a hard link that fails if the name exists), objects in an S3 lake (`PutObject` with
//! `If-None-Match: *`, which S3 answers 412 when the object exists). `--state DIR` keeps them
//! in a local directory instead.

use std::io;
use std::path::PathBuf;

use aws_sdk_s3::primitives::ByteStream;

use super::fleet::Ack;
use crate::config::S3Location;

/// Where the documents live, relative to the lake.
pub const ACKS_PREFIX: &str = "_console/acks";

#[derive(Debug, Clone)]
pub enum AckStore {
    Local {
        dir: PathBuf,
    },
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
    },
}

fn check_id(id: &str) -> io::Result<()> {
    // Ids are hex (see `live::alert_id`); anything else never names a file or object.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an alert id",
        ));
    }
    Ok(())
}

fn s3_error(what: &str, e: impl std::error::Error) -> io::Error {
    io::Error::other(format!("{what}: {}", crate::aws::describe(&e)))
}

async fn read_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> io::Result<bytes::Bytes> {
    Ok(client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| s3_error(&format!("reading the acknowledgement {key}"), e))?
        .body
        .collect()
        .await
        .map_err(io::Error::other)?
        .into_bytes())
}

impl AckStore {
    pub fn local(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self::Local { dir })
    }

    /// The store beside an S3 lake.
    pub async fn s3(loc: &S3Location) -> Self {
        let conf = crate::aws::sdk_config(loc.region.as_deref()).await;
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(crate::aws::custom_endpoint("S3").is_some())
                .build(),
        );
        Self::S3 {
            client,
            bucket: loc.bucket.clone(),
            prefix: loc.object_key(ACKS_PREFIX),
        }
    }

    /// Every acknowledgement kept.
    pub async fn load(&self) -> io::Result<Vec<Ack>> {
        let mut acks = Vec::new();
        match self {
            Self::Local { dir } => {
                for entry in std::fs::read_dir(dir)? {
                    let path = entry?.path();
                    if path.extension().is_none_or(|e| e != "json") {
                        continue;
                    }
                    match serde_json::from_slice::<Ack>(&std::fs::read(&path)?) {
                        Ok(a) => acks.push(a),
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "an acknowledgement does not parse; skipped")
                        }
                    }
                }
            }
            Self::S3 {
                client,
                bucket,
                prefix,
            } => {
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(format!("{prefix}/"))
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| s3_error("listing acknowledgements", e))?;
                    for o in page.contents() {
                        let Some(key) = o.key() else { continue };
                        let body = read_object(client, bucket, key).await?;
                        match serde_json::from_slice::<Ack>(&body) {
                            Ok(a) => acks.push(a),
                            Err(e) => {
                                tracing::warn!(key, error = %e, "an acknowledgement does not parse; skipped")
                            }
                        }
                    }
                }
            }
        }
        acks.sort_by_key(|a| a.at_us);
        Ok(acks)
    }

    /// Keeps `ack` unless the alert was acknowledged already; returns the acknowledgement
    /// that stands.
    pub async fn put(&self, ack: &Ack) -> io::Result<Ack> {
        check_id(&ack.alert)?;
        match self {
            Self::Local { dir } => {
                let path = dir.join(format!("{}.json", ack.alert));
                let tmp = dir.join(format!(".{}.{}.tmp", ack.alert, std::process::id()));
                std::fs::write(&tmp, serde_json::to_vec(ack)?)?;
                // A hard link fails if the target exists: the first acknowledgement stays.
                let linked = std::fs::hard_link(&tmp, &path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => Ok(ack.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        Ok(serde_json::from_slice(&std::fs::read(&path)?)?)
                    }
                    Err(e) => Err(e),
                }
            }
            Self::S3 {
                client,
                bucket,
                prefix,
            } => {
                let key = format!("{prefix}/{}.json", ack.alert);
                let put = client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .if_none_match("*")
                    .content_type("application/json")
                    .body(ByteStream::from(serde_json::to_vec(ack)?))
                    .send()
                    .await;
                match put {
                    Ok(_) => Ok(ack.clone()),
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                        let body = read_object(client, bucket, &key).await?;
                        Ok(serde_json::from_slice(&body)?)
                    }
                    Err(e) => Err(s3_error("keeping the acknowledgement", e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_acknowledgement_stands_and_survives() {
        let dir = tempfile::tempdir().unwrap();
        let store = AckStore::local(dir.path().join("acks")).unwrap();
        let ack = |by: &str| Ack {
            alert: "ab12".into(),
            by: by.into(),
            at_us: 1,
            version: 0,
        };
        assert_eq!(store.put(&ack("ann")).await.unwrap().by, "ann");
        assert_eq!(store.put(&ack("bob")).await.unwrap().by, "ann");
        let again = AckStore::local(dir.path().join("acks")).unwrap();
        assert_eq!(again.load().await.unwrap(), vec![ack("ann")]);
        assert!(
            store
                .put(&Ack {
                    alert: "../x".into(),
                    ..ack("eve")
                })
                .await
                .is_err()
        );
    }
}
