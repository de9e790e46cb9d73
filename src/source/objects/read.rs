//! Reading one object: a blocking task streams the body (a ranged GET when it can resume
//! in the middle: uncompressed NDJSON), decompresses it (gzip, zstd), cuts it into records
//! (NDJSON lines; CSV rows turned into JSON objects of the schema's types) and sends chunks
//! of them over a channel of two, so a slow pipeline slows the download.
//!
//! What cannot be read goes to dead-letter with its reason, and reading goes on with the next
//! object: a CSV row with the wrong number of cells (`bad_csv_row`), the damaged end of a
//! compressed object (`corrupt_object`: the records before it are kept), an object too large
//! (`object_too_large`) or of no known format (`unknown_format`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::Produced;
use crate::config::{Compression, FieldType, ObjectFormat, ObjectSource};
use crate::metrics::Metrics;
use crate::record::{AsRead, Position, RawChunk, Rejection, SeqNo, SeqNos};
use crate::source::SourceError;

/// Records per chunk, at most.
const CHUNK_RECORDS: usize = 10_000;
/// Bytes per chunk, about: a chunk is sent once it holds this much.
const CHUNK_BYTES: usize = 4 << 20;
/// A line longer than this is kept only this far (it goes to dead-letter as too large).
const MAX_LINE: usize = 4 << 20;
/// Read buffer of the decompressed content.
const BUFFER: usize = 256 << 10;

/// One object to read.
pub(super) struct Job {
    pub shard: Arc<str>,
    /// None: looked up here (an object read again after a restart, not listed).
    pub meta: Option<ObjectMeta>,
    /// Given up on (a poison object): the rest of it goes to dead-letter with this reason.
    pub poison: Option<String>,
    /// Records ending at or before this offset were committed.
    pub from: u64,
    pub store: Arc<dyn ObjectStore>,
    pub cfg: ObjectSource,
    pub fields: Arc<HashMap<String, FieldType>>,
    pub metrics: Arc<Metrics>,
}

/// Reads the object and sends its chunks; returns when it is read, when the reader hangs
/// up, or after sending the error that stopped it.
pub(super) fn produce(mut job: Job, tx: &mpsc::Sender<Produced>, rt: &Handle) {
    let (key, version) = job.shard.rsplit_once('@').unwrap_or((&job.shard, ""));
    let key = key.to_string();
    let mut out = Chunker::new(job.shard.clone(), job.from, tx);
    if let Some(why) = job.poison.take() {
        out.reject_whole(Rejection::ObjectUnreadable, why);
        return;
    }
    let meta = match job.meta.take() {
        Some(meta) => meta,
        None => {
            let path = object_store::path::Path::from(key.as_str());
            match rt.block_on(job.store.head(&path)) {
                Ok(meta) if super::shard_id(&meta).ends_with(&format!("@{version}")) => meta,
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {
                    Metrics::add(&job.metrics.objects_vanished, 1);
                    tracing::warn!(object = %key, "the object is gone or was overwritten since it was read in part: skipped");
                    return;
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(io_error(&job.shard, std::io::Error::other(e))));
                    return;
                }
            }
        }
    };
    let (format, compression) = kinds(&key, &job.cfg);
    if meta.size > job.cfg.max_object_bytes {
        let why = format!(
            "{key} is {} bytes; source max_object_bytes is {}",
            meta.size, job.cfg.max_object_bytes
        );
        out.reject_whole(Rejection::ObjectTooLarge, why);
        return;
    }
    let Some(format) = format else {
        let why = format!(
            "{key}: no format for this extension; name objects .ndjson/.jsonl/.json/.txt or .csv (optionally .gz/.zst), or set source format: ndjson or csv"
        );
        out.reject_whole(Rejection::UnknownFormat, why);
        return;
    };
    // Uncompressed NDJSON resumes with a ranged GET; anything else is read from its start
    // and the committed records are skipped.
    let ranged = format == ObjectFormat::Ndjson && compression == Compression::None;
    let start = if ranged && job.from > 0 && job.from < meta.size {
        job.from
    } else {
        0
    };
    if ranged && job.from >= meta.size && meta.size > 0 {
        done(&job, &key);
        return;
    }
    let opts = GetOptions {
        if_match: meta.e_tag.clone(),
        range: (start > 0).then_some(GetRange::Offset(start)),
        ..GetOptions::default()
    };
    let got = rt.block_on(job.store.get_opts(&meta.location, opts));
    let body = match got {
        Ok(got) => Body {
            rt: rt.clone(),
            stream: got.into_stream(),
            current: Bytes::new(),
        },
        Err(
            e @ (object_store::Error::NotFound { .. } | object_store::Error::Precondition { .. }),
        ) => {
            Metrics::add(&job.metrics.objects_vanished, 1);
            tracing::warn!(object = %key, error = %e, "the object is gone or was overwritten since it was listed: skipped (a new version is listed on its own)");
            return;
        }
        Err(e) => {
            let _ = tx.blocking_send(Err(io_error(&job.shard, std::io::Error::other(e))));
            return;
        }
    };
    let content: Box<dyn Read> = match compression {
        Compression::None => Box::new(body),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Compression::Zstd => match zstd::stream::read::Decoder::new(body) {
            Ok(d) => Box::new(d),
            Err(e) => {
                out.corrupt(&key, &e, Vec::new());
                return;
            }
        },
    };
    out.offset = start;
    let finished = match format {
        ObjectFormat::Ndjson => lines(BufReader::with_capacity(BUFFER, content), &key, &mut out),
        ObjectFormat::Csv => csv_rows(content, &key, &job.fields, &mut out),
    };
    if finished && out.flush() {
        done(&job, &key);
    }
}

fn done(job: &Job, key: &str) {
    Metrics::add(&job.metrics.objects_read, 1);
    tracing::debug!(object = %key, "object read to its end");
}

/// The format and compression of `key`: the configured ones, or by its extensions.
pub(super) fn kinds(key: &str, cfg: &ObjectSource) -> (Option<ObjectFormat>, Compression) {
    let name = key.rsplit('/').next().unwrap_or(key).to_ascii_lowercase();
    let (stem, by_name) = if let Some(s) = name.strip_suffix(".gz") {
        (s, Compression::Gzip)
    } else if let Some(s) = name.strip_suffix(".zst").or(name.strip_suffix(".zstd")) {
        (s, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let compression = cfg.compression.unwrap_or(by_name);
    let format = cfg.format.or_else(|| {
        let ext = stem.rsplit_once('.').map(|(_, e)| e)?;
        match ext {
            "ndjson" | "jsonl" | "json" | "txt" => Some(ObjectFormat::Ndjson),
            "csv" => Some(ObjectFormat::Csv),
            _ => None,
        }
    });
    (format, compression)
}

/// NDJSON: every line that is not blank is a record; the last needs no newline. False when
/// the reader hung up or the content was damaged (that was sent as a dead letter).
fn lines(mut r: impl BufRead, key: &str, out: &mut Chunker) -> bool {
    loop {
        let start = out.data.len();
        let mut len = 0usize;
        let mut ended_line = false;
        while !ended_line {
            let buf = match r.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let tail = out.data.split_off(start);
                    out.corrupt(key, &e, tail);
                    return false;
                }
            };
            if buf.is_empty() {
                break;
            }
            let (take, used) = match memchr::memchr(b'\n', buf) {
                Some(i) => {
                    ended_line = true;
                    (i, i + 1)
                }
                None => (buf.len(), buf.len()),
            };
            let room = MAX_LINE.saturating_sub(len).min(take);
            out.data.extend_from_slice(&buf[..room]);
            len += take;
            out.offset += used as u64;
            r.consume(used);
        }
        let line = &out.data[start..];
        if !ended_line && len == 0 {
            return true;
        }
        if line.iter().all(u8::is_ascii_whitespace) || out.offset <= out.from {
            // A blank line holds no record; a committed one is not sent again.
            out.data.truncate(start);
        } else {
            let end = out.data.len();
            out.push(start..end);
            if !out.maybe_send() {
                return false;
            }
        }
        if !ended_line {
            return true;
        }
    }
}

/// CSV: the header names fields; each row becomes a JSON object of the schema's types
/// (numbers and booleans unquoted when they read as such, so the decoder checks them like
/// any record's; an empty cell is a missing value).
fn csv_rows(
    content: impl Read,
    key: &str,
    fields: &HashMap<String, FieldType>,
    out: &mut Chunker,
) -> bool {
    out.rewrites = true;
    let seen = Rc::new(RefCell::new(Seen::default()));
    let tee = Tee {
        inner: content,
        seen: seen.clone(),
    };
    let mut rdr = csv::ReaderBuilder::new()
        .buffer_capacity(BUFFER)
        .from_reader(tee);
    let header: Vec<(Vec<u8>, Option<FieldType>)> = match rdr.byte_headers() {
        Ok(h) => h
            .iter()
            .map(|name| {
                let name = String::from_utf8_lossy(name).trim().to_string();
                let ty = fields.get(&name).copied();
                (serde_json::to_vec(&name).expect("a string"), ty)
            })
            .collect(),
        Err(e) => return csv_failed(e, key, out, Vec::new()),
    };
    let mut row = csv::ByteRecord::new();
    loop {
        match rdr.read_byte_record(&mut row) {
            Ok(false) => return true,
            Ok(true) => {
                out.offset = rdr.position().byte();
                let begin = row.position().map_or(out.offset, csv::Position::byte);
                let raw = seen.borrow_mut().take(begin, out.offset);
                if out.offset <= out.from {
                    continue;
                }
                let start = out.data.len();
                match row_json(&mut out.data, &header, &row) {
                    Ok(()) => {
                        let end = out.data.len();
                        out.as_read
                            .spans
                            .push(out.as_read.data.len()..out.as_read.data.len() + raw.len());
                        out.as_read.data.extend_from_slice(&raw);
                        out.push(start..end);
                    }
                    Err(why) => {
                        out.data.truncate(start);
                        out.reject(raw, Rejection::BadCsvRow, why);
                    }
                }
                if !out.maybe_send() {
                    return false;
                }
            }
            Err(e) => {
                out.offset = rdr.position().byte().max(out.offset);
                let begin = e.position().map_or(out.offset, csv::Position::byte);
                let raw = seen.borrow_mut().take(begin, out.offset);
                if let csv::ErrorKind::UnequalLengths {
                    expected_len, len, ..
                } = e.kind()
                {
                    let (expected_len, len) = (*expected_len, *len);
                    if out.offset > out.from {
                        let why = format!(
                            "{key} line {}: {len} cells; the header has {expected_len}",
                            e.position().map_or(0, csv::Position::line)
                        );
                        out.reject(raw, Rejection::BadCsvRow, why);
                        if !out.maybe_send() {
                            return false;
                        }
                    }
                    continue;
                }
                return csv_failed(e, key, out, raw);
            }
        }
    }
}

/// A CSV error that ends the object: the content is damaged (or not CSV).
fn csv_failed(e: csv::Error, key: &str, out: &mut Chunker, raw: Vec<u8>) -> bool {
    match e.into_kind() {
        csv::ErrorKind::Io(e) => out.corrupt(key, &e, raw),
        other => out.corrupt(key, &std::io::Error::other(format!("{other:?}")), raw),
    }
    false
}

/// The decompressed content the CSV reader has read and not yet handed back as rows, so
/// that a row's dead letter keeps the row as it was in the object (quotes and all).
#[derive(Default)]
struct Seen {
    /// The offset of `bytes[0]` in the content.
    base: u64,
    bytes: Vec<u8>,
}

impl Seen {
    /// The bytes of `begin..end` (without the line ending), forgetting what comes before
    /// `end` once that is much.
    fn take(&mut self, begin: u64, end: u64) -> Vec<u8> {
        let at = |o: u64| (o.saturating_sub(self.base) as usize).min(self.bytes.len());
        let mut raw = self.bytes[at(begin)..at(end)].to_vec();
        while raw.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            raw.pop();
        }
        let done = at(end);
        if done > BUFFER * 4 {
            self.bytes.drain(..done);
            self.base = end;
        }
        raw
    }
}

/// Reads through, keeping what was read in [`Seen`].
struct Tee<R> {
    inner: R,
    seen: Rc<RefCell<Seen>>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.borrow_mut().bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Writes one row as a JSON object; Err when a cell is not UTF-8.
fn row_json(
    out: &mut Vec<u8>,
    header: &[(Vec<u8>, Option<FieldType>)],
    row: &csv::ByteRecord,
) -> Result<(), String> {
    out.push(b'{');
    let mut first = true;
    for (i, ((name, ty), cell)) in header.iter().zip(row.iter()).enumerate() {
        let Ok(cell) = std::str::from_utf8(cell) else {
            return Err(format!("cell {} is not UTF-8", i + 1));
        };
        if cell.is_empty() {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(name);
        out.push(b':');
        let trimmed = cell.trim();
        let bare = match ty {
            Some(FieldType::Int32 | FieldType::Int64 | FieldType::Float32 | FieldType::Float64) => {
                serde_json::from_str::<serde_json::Number>(trimmed).is_ok()
            }
            Some(FieldType::Bool) => trimmed == "true" || trimmed == "false",
            _ => false,
        };
        if bare {
            out.extend_from_slice(trimmed.as_bytes());
        } else {
            serde_json::to_writer(&mut *out, cell).expect("writing to a Vec");
        }
    }
    out.push(b'}');
    Ok(())
}

/// Collects records into chunks and sends them.
struct Chunker<'a> {
    shard: Arc<str>,
    /// Records ending at or before this were committed: not sent again.
    from: u64,
    /// The offset in the decompressed content read so far (after the last record).
    offset: u64,
    /// The position before the chunk being filled.
    resume_from: Position,
    data: Vec<u8>,
    spans: Vec<std::ops::Range<usize>>,
    seqs: SeqNos,
    rejected: Vec<(usize, Rejection, String)>,
    /// The records as read, when they are rewritten (CSV rows).
    as_read: AsRead,
    rewrites: bool,
    tx: &'a mpsc::Sender<Produced>,
}

impl<'a> Chunker<'a> {
    fn new(shard: Arc<str>, from: u64, tx: &'a mpsc::Sender<Produced>) -> Self {
        Self {
            shard,
            from,
            offset: 0,
            resume_from: (from > 0).then(|| SeqNo::from_u64(from)),
            data: Vec::new(),
            spans: Vec::new(),
            seqs: SeqNos::default(),
            rejected: Vec::new(),
            as_read: AsRead::default(),
            rewrites: false,
            tx,
        }
    }

    /// The record in `data[span]` ends at the current offset.
    fn push(&mut self, span: std::ops::Range<usize>) {
        self.spans.push(span);
        self.seqs.push_u64(self.offset);
    }

    /// A record the source rejects, ending at the current offset.
    fn reject(&mut self, raw: Vec<u8>, kind: Rejection, why: String) {
        let start = self.data.len();
        self.data.extend_from_slice(&raw);
        if self.rewrites {
            let at = self.as_read.data.len();
            self.as_read.data.extend_from_slice(&raw);
            self.as_read.spans.push(at..self.as_read.data.len());
        }
        self.rejected.push((self.spans.len(), kind, why));
        self.push(start..self.data.len());
    }

    /// The whole object, unread, as one dead letter (at offset 1, after nothing), or the rest
    /// of it after what was committed.
    fn reject_whole(&mut self, kind: Rejection, why: String) {
        if self.from > 0 && kind != Rejection::ObjectUnreadable {
            return;
        }
        self.offset = self.from + 1;
        self.reject(Vec::new(), kind, why);
        self.flush();
    }

    /// The content broke off: what was read of the last record (`tail`) goes to
    /// dead-letter with why, just after the last whole record. Unless the body could not be
    /// fetched: then the records so far are sent and the error ends the session (the next
    /// reads the object again from its committed position).
    fn corrupt(&mut self, key: &str, e: &std::io::Error, tail: Vec<u8>) {
        if e.get_ref().is_some_and(|inner| inner.is::<BodyError>()) {
            if self.flush() {
                let e = std::io::Error::new(e.kind(), e.to_string());
                let _ = self.tx.blocking_send(Err(io_error(&self.shard, e)));
            }
            return;
        }
        tracing::warn!(object = %key, error = %e, "the object is damaged: the records before the damage are read, the rest goes to dead-letter");
        self.offset += tail.len() as u64 + 1;
        if self.offset > self.from {
            let why = format!(
                "{key}: the content breaks off after byte {}: {e}",
                self.offset - 1
            );
            self.reject(tail, Rejection::CorruptObject, why);
        }
        self.flush();
    }

    /// Sends the chunk if it is full; false when the reader hung up.
    fn maybe_send(&mut self) -> bool {
        if self.spans.len() >= CHUNK_RECORDS || self.data.len() >= CHUNK_BYTES {
            return self.flush();
        }
        true
    }

    /// Sends what is collected; false when the reader hung up.
    fn flush(&mut self) -> bool {
        if self.spans.is_empty() {
            return true;
        }
        let seqs = std::mem::take(&mut self.seqs);
        let next = seqs.last().map(|s| SeqNo(s.to_string()));
        let chunk = RawChunk {
            shard: self.shard.clone(),
            resume_from: std::mem::replace(&mut self.resume_from, next),
            data: std::mem::take(&mut self.data),
            spans: std::mem::take(&mut self.spans),
            seqs,
            keys: SeqNos::default(),
            rejected: std::mem::take(&mut self.rejected),
            arrival_us: 0,
            as_read: std::mem::take(&mut self.as_read),
        };
        self.tx.blocking_send(Ok(chunk)).is_ok()
    }
}

fn io_error(shard: &str, source: std::io::Error) -> SourceError {
    SourceError::Io {
        shard: shard.to_string(),
        source,
    }
}

/// The body could not be fetched (not: the content is damaged): the object is read again
/// from its committed position, not dead-lettered.
#[derive(Debug, thiserror::Error)]
#[error("reading the object: {0}")]
struct BodyError(object_store::Error);

/// An object's body as a blocking `Read`: the reading task is a blocking one, the body an
/// async stream.
struct Body {
    rt: Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(std::io::Error::other(BodyError(e))),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
