//! The lake in S3. A staged file is a multipart upload that is not completed yet: readers
//! do not see it, and its parts survive the worker. The commit intent names the upload and
//! its part ETags; publishing completes it. Completing again after a crash finds the upload
//! gone (`NoSuchUpload`) and checks the object instead, so a redone publish never writes a
//! second copy. Recovery aborts this worker's uploads that no intent names.
//!
//! Every file is a multipart upload, small ones too (one part, which S3 allows under
//! 5 MiB): a single PUT would make the object visible before its commit is prepared.

use std::collections::VecDeque;
use std::io;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::RequestChecksumCalculation;
use aws_sdk_s3::config::retry::{RetryPartition, TokenBucket};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, ServerSideEncryption, StorageClass,
};
use bytes::Bytes;
use tokio::task::JoinHandle;

use super::partition::file_worker;
use super::{Lake, StagedFile, Staging, Upload};
use crate::aws;
use crate::config::S3Location;

/// Parts uploading at once per open file, besides the one being filled.
const PARTS_IN_FLIGHT: usize = 1;

#[derive(Debug, Clone)]
pub struct S3Lake {
    client: Client,
    loc: S3Location,
}

fn io_err(context: String, e: impl std::error::Error) -> io::Error {
    io::Error::other(format!("{context}: {}", aws::describe(&e)))
}

impl S3Lake {
    /// A client for `loc`, checked by a `HeadBucket`, so that a missing bucket or permission
    /// shows at start-up and not at the first commit.
    pub async fn connect(
        loc: &S3Location,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> io::Result<Self> {
        let conf = aws::sdk_config(loc.region.as_deref()).await;
        let client = Client::from_conf(
            aws_sdk_s3::config::Builder::from(&conf)
                // Local servers and most S3-compatible stores need bucket-in-path URLs.
                .force_path_style(aws::custom_endpoint("S3").is_some())
                // Transport integrity is TLS's; flexible checksums would have to be repeated
                // in every CompleteMultipartUpload.
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                // A worker retries (with backoff) rather than failing its run: no retry
                // quota that a burst of throttling could exhaust.
                .retry_partition(
                    RetryPartition::custom("shardlake-s3")
                        .token_bucket(TokenBucket::unlimited())
                        .build(),
                )
                .interceptor(aws::FaultCounter::new(
                    metrics,
                    |m| &m.s3_throttled,
                    |m| &m.s3_errors_retried,
                ))
                .build(),
        );
        let lake = Self {
            client,
            loc: loc.clone(),
        };
        lake.check_bucket().await?;
        Ok(lake)
    }

    async fn check_bucket(&self) -> io::Result<()> {
        let bucket = &self.loc.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "S3 bucket `{bucket}` does not exist: create it (see deploy/) or fix `lake.s3.bucket`"
                    ),
                ))
            }
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 403 => {
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "access to S3 bucket `{bucket}` denied: the role needs s3:ListBucket and s3:ListBucketMultipartUploads on arn:aws:s3:::{bucket}, and s3:PutObject, s3:GetObject and s3:AbortMultipartUpload on arn:aws:s3:::{bucket}/*"
                    ),
                ))
            }
            Err(e) => Err(io_err(format!("checking S3 bucket `{bucket}`"), e)),
        }
    }

    fn object_key(&self, key: &str) -> String {
        self.loc.object_key(key)
    }

    fn key_prefix(&self) -> String {
        self.object_key("")
    }

    /// Whether the object a completed upload made is there, whole.
    async fn published(&self, key: &str, upload: &Upload) -> io::Result<bool> {
        match self
            .client
            .head_object()
            .bucket(&self.loc.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(h) => Ok(h.content_length() == Some(upload.size as i64)),
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
            Err(e) => Err(io_err(
                format!("checking s3://{}/{key}", self.loc.bucket),
                e,
            )),
        }
    }
}

struct S3Staging {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    part_size: usize,
    buf: Vec<u8>,
    next_part: i32,
    size: u64,
    in_flight: VecDeque<JoinHandle<io::Result<(i32, String)>>>,
    etags: Vec<(i32, String)>,
}

impl S3Staging {
    /// Uploads the first `part_size` bytes buffered (all of them if fewer) as the next
    /// part; waits while too many are in flight.
    async fn send_part(&mut self) -> io::Result<()> {
        let rest = if self.buf.len() > self.part_size {
            self.buf.split_off(self.part_size)
        } else {
            Vec::with_capacity(self.part_size)
        };
        let body = Bytes::from(std::mem::replace(&mut self.buf, rest));
        self.size += body.len() as u64;
        let number = self.next_part;
        self.next_part += 1;
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(body));
        let what = format!(
            "uploading part {number} of s3://{}/{}",
            self.bucket, self.key
        );
        self.in_flight.push_back(tokio::spawn(async move {
            let out = req.send().await.map_err(|e| io_err(what.clone(), e))?;
            let etag = out
                .e_tag()
                .ok_or_else(|| io::Error::other(format!("{what}: no ETag in the response")))?;
            Ok((number, etag.to_string()))
        }));
        while self.in_flight.len() > PARTS_IN_FLIGHT {
            self.wait_one().await?;
        }
        Ok(())
    }

    async fn wait_one(&mut self) -> io::Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            let part = h.await.map_err(io::Error::other)??;
            self.etags.push(part);
        }
        Ok(())
    }
}

#[async_trait]
impl Staging for S3Staging {
    async fn write(&mut self, bytes: Bytes) -> io::Result<()> {
        // Parts of exactly `part_size` (the Parquet writer hands over whole row groups,
        // which can be larger); only the last part of a file is shorter.
        self.buf.extend_from_slice(&bytes);
        while self.buf.len() >= self.part_size {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> io::Result<Option<Upload>> {
        if !self.buf.is_empty() || self.next_part == 1 {
            self.send_part().await?;
        }
        while !self.in_flight.is_empty() {
            self.wait_one().await?;
        }
        self.etags.sort_by_key(|(n, _)| *n);
        Ok(Some(Upload {
            id: self.upload_id,
            etags: self.etags.into_iter().map(|(_, e)| e).collect(),
            size: self.size,
        }))
    }
}

#[async_trait]
impl Lake for S3Lake {
    async fn stage(&self, key: &str) -> io::Result<Box<dyn Staging>> {
        let key = self.object_key(key);
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.loc.bucket)
            .key(&key)
            .content_type("application/vnd.apache.parquet");
        if let Some(kms) = &self.loc.kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(kms);
        }
        if let Some(class) = &self.loc.storage_class {
            req = req.storage_class(StorageClass::from(class.as_str()));
        }
        let out = req.send().await.map_err(|e| {
            io_err(
                format!("starting an upload to s3://{}/{key}", self.loc.bucket),
                e,
            )
        })?;
        let upload_id = out
            .upload_id()
            .ok_or_else(|| {
                io::Error::other(format!("no upload id for s3://{}/{key}", self.loc.bucket))
            })?
            .to_string();
        Ok(Box::new(S3Staging {
            client: self.client.clone(),
            bucket: self.loc.bucket.clone(),
            key,
            upload_id,
            part_size: self.loc.part_size,
            buf: Vec::with_capacity(self.loc.part_size),
            next_part: 1,
            size: 0,
            in_flight: VecDeque::new(),
            etags: Vec::new(),
        }))
    }

    async fn publish(&self, file: &StagedFile) -> io::Result<()> {
        let key = self.object_key(&file.key);
        let bucket = &self.loc.bucket;
        let Some(upload) = &file.upload else {
            return Err(io::Error::other(format!(
                "publishing s3://{bucket}/{key}: the commit names no upload (it was staged on a local lake; was `lake:` changed with a commit pending?)"
            )));
        };
        let parts = upload
            .etags
            .iter()
            .enumerate()
            .map(|(i, etag)| {
                CompletedPart::builder()
                    .part_number(i as i32 + 1)
                    .e_tag(etag)
                    .build()
            })
            .collect();
        let done = self
            .client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(&key)
            .upload_id(&upload.id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match done {
            Ok(_) => Ok(()),
            // Completed by an earlier attempt (or by a retry whose first answer was lost).
            Err(e) if e.code() == Some("NoSuchUpload") => {
                if self.published(&key, upload).await? {
                    Ok(())
                } else {
                    Err(io::Error::other(format!(
                        "publishing s3://{bucket}/{key}: upload {} is gone and the object is missing or of another size; was it aborted by hand or by a lifecycle rule shorter than a commit?",
                        upload.id
                    )))
                }
            }
            Err(e) => Err(io_err(format!("completing s3://{bucket}/{key}"), e)),
        }
    }

    fn sweep_after_commit(&self) -> bool {
        true
    }

    async fn read(&self, key: &str) -> io::Result<Bytes> {
        let object = self.object_key(key);
        let context = || format!("reading s3://{}/{object}", self.loc.bucket);
        let got = self
            .client
            .get_object()
            .bucket(&self.loc.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| io_err(context(), e))?;
        let body = got.body.collect().await.map_err(|e| io_err(context(), e))?;
        Ok(body.into_bytes())
    }

    async fn remove(&self, key: &str) -> io::Result<()> {
        let object = self.object_key(key);
        // S3 answers a delete of a missing key with success too.
        self.client
            .delete_object()
            .bucket(&self.loc.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| io_err(format!("removing s3://{}/{object}", self.loc.bucket), e))?;
        Ok(())
    }

    async fn remove_orphans(&self, outputs: &[&str], worker: &str) -> io::Result<usize> {
        let prefix = self.key_prefix();
        let mut removed = 0;
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.loc.bucket)
                .prefix(&prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| {
                    io_err(
                        format!("listing uploads in s3://{}/{prefix}", self.loc.bucket),
                        e,
                    )
                })?;
            for u in page.uploads() {
                let (Some(key), Some(id)) = (u.key(), u.upload_id()) else {
                    continue;
                };
                let rel = &key[prefix.len().min(key.len())..];
                let ours = outputs
                    .iter()
                    .any(|o| rel.strip_prefix(o).is_some_and(|r| r.starts_with('/')))
                    && file_worker(rel) == Some(worker);
                if !ours {
                    continue;
                }
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.loc.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => removed += 1,
                    Err(e) if e.code() == Some("NoSuchUpload") => {}
                    Err(e) => {
                        return Err(io_err(
                            format!("aborting upload {id} of s3://{}/{key}", self.loc.bucket),
                            e,
                        ));
                    }
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(removed);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() {
                return Ok(removed);
            }
        }
    }
}
