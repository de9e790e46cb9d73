//! Reads one shard file of a local stream (see [`crate::localstream`]). Only whole lines are
//! records: a line still being written (no newline yet) is left for the next read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{ShardReader, SourceError};
use crate::localstream::{read_meta, shard_id, shard_path};
use crate::record::{Position, RawChunk, SeqNo, SeqNos};

/// Lines longer than this are not kept in memory whole: the record is dead-lettered by size.
const READ_BYTES: usize = 4 << 20;

/// Lists the shards of the stream at `dir`.
pub fn list_shards(dir: &Path) -> Result<Vec<Arc<str>>, SourceError> {
    let meta = read_meta(dir).map_err(|e| SourceError::Stream {
        path: dir.display().to_string(),
        message: format!("{e}; create it with `shardlake-agent simulate --stream {}` or point source.local.path at an existing stream", dir.display()),
    })?;
    Ok((0..meta.shards).map(|i| Arc::from(shard_id(i))).collect())
}

pub struct LocalShardReader {
    shard: Arc<str>,
    path: PathBuf,
    file: Option<File>,
    offset: u64,
    buf: Vec<u8>,
    /// Mean line length of the last chunk (newline included), to read about what
    /// `max_records` lines take instead of the whole read buffer each time.
    line_bytes: Option<usize>,
}

impl LocalShardReader {
    pub fn open(dir: &Path, shard: Arc<str>, after: &Position) -> Self {
        let offset = after.as_ref().and_then(SeqNo::as_u64).unwrap_or(0);
        Self {
            path: shard_path(dir, &shard),
            shard,
            file: None,
            offset,
            buf: Vec::new(),
            line_bytes: None,
        }
    }

    /// An I/O error of this shard's file (a function of the field, so it can be used while
    /// the file is borrowed).
    fn io(shard: &str) -> impl Fn(std::io::Error) -> SourceError + '_ {
        move |source| SourceError::Io {
            shard: shard.to_string(),
            source,
        }
    }
}

#[async_trait::async_trait]
impl ShardReader for LocalShardReader {
    /// Reads in place: a local file in the page cache is read in a few milliseconds.
    async fn read(
        &mut self,
        max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        self.read_now(max_records, now_us)
    }
}

impl LocalShardReader {
    /// The next whole lines, at most `max_records`.
    pub fn read_now(
        &mut self,
        max_records: usize,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        if self.file.is_none() {
            self.file = Some(File::open(&self.path).map_err(Self::io(&self.shard))?);
        }
        let file = self.file.as_mut().expect("opened");
        file.seek(SeekFrom::Start(self.offset))
            .map_err(Self::io(&self.shard))?;
        // About `max_records` lines (an eighth more), not the whole read buffer: what is read
        // beyond the last whole line is read again next time. `read_to_end` fills the buffer
        // without zeroing it first.
        let mut want = self.line_bytes.map_or(READ_BYTES, |l| {
            (l.saturating_mul(max_records) / 8 * 9).clamp(64 << 10, READ_BYTES)
        });
        let filled = loop {
            self.buf.clear();
            self.buf.reserve(want);
            let n = (&mut *file)
                .take(want as u64)
                .read_to_end(&mut self.buf)
                .map_err(Self::io(&self.shard))?;
            // A line longer than this read, but within the read buffer: read it whole.
            if n == want && want < READ_BYTES && memchr::memchr(b'\n', &self.buf).is_none() {
                want = READ_BYTES;
                file.seek(SeekFrom::Start(self.offset))
                    .map_err(Self::io(&self.shard))?;
                continue;
            }
            break n;
        };
        let resume_from = (self.offset > 0).then(|| SeqNo::from_u64(self.offset));
        let expect = self
            .line_bytes
            .map_or(0, |l| (filled / l.max(1)).min(max_records));
        let mut spans = Vec::with_capacity(expect);
        let mut seqs = SeqNos::with_capacity(expect, expect * 10);
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', &self.buf).take(max_records) {
            spans.push(start..nl);
            seqs.push_u64(self.offset + nl as u64 + 1);
            start = nl + 1;
        }
        if spans.is_empty() && filled == READ_BYTES {
            return self.oversized_line(resume_from, now_us);
        }
        if spans.is_empty() {
            return Ok(None);
        }
        self.buf.truncate(start);
        self.offset += start as u64;
        self.line_bytes = Some(start.div_ceil(spans.len()));
        Ok(Some(RawChunk {
            shard: self.shard.clone(),
            resume_from,
            data: std::mem::take(&mut self.buf),
            spans,
            seqs,
            keys: SeqNos::default(),
            arrival_us: now_us,
            as_read: Default::default(),
            rejected: Vec::new(),
        }))
    }

    /// One line longer than the read buffer: keeps its head and skips to its end, so it
    /// reaches dead-letter (too large) without holding it all in memory. None while the line
    /// is not finished being written.
    fn oversized_line(
        &mut self,
        resume_from: Position,
        now_us: i64,
    ) -> Result<Option<RawChunk>, SourceError> {
        let file = self.file.as_mut().expect("opened");
        let head = self.buf[..READ_BYTES].to_vec();
        let mut end = self.offset + READ_BYTES as u64;
        let mut byte = [0u8; 1 << 16];
        loop {
            let n = file.read(&mut byte).map_err(Self::io(&self.shard))?;
            if n == 0 {
                return Ok(None);
            }
            if let Some(p) = byte[..n].iter().position(|&b| b == b'\n') {
                end += p as u64 + 1;
                break;
            }
            end += n as u64;
        }
        self.offset = end;
        Ok(Some(RawChunk {
            shard: self.shard.clone(),
            resume_from,
            spans: std::iter::once(0..head.len()).collect(),
            data: head,
            seqs: [end.to_string()].into_iter().collect(),
            keys: SeqNos::default(),
            arrival_us: now_us,
            as_read: Default::default(),
            rejected: Vec::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_whole_lines_and_resumes_after_a_position() {
        let dir = tempfile::tempdir().unwrap();
        crate::localstream::create(dir.path(), 1).unwrap();
        let path = shard_path(dir.path(), &shard_id(0));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"a\nbb\nccc")
            .unwrap();
        let shard: Arc<str> = shard_id(0).into();
        let mut r = LocalShardReader::open(dir.path(), shard.clone(), &None);
        let c = r.read_now(10, 0).unwrap().unwrap();
        assert_eq!((c.record(0), c.record(1)), (&b"a"[..], &b"bb"[..]));
        assert_eq!(c.seqs.iter().collect::<Vec<_>>(), ["2", "5"]);
        assert!(
            r.read_now(10, 0).unwrap().is_none(),
            "ccc has no newline yet"
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"\n")
            .unwrap();
        let c = r.read_now(10, 0).unwrap().unwrap();
        assert_eq!(
            (c.record(0), c.resume_from.clone()),
            (&b"ccc"[..], Some(SeqNo::from_u64(5)))
        );
        let mut again = LocalShardReader::open(dir.path(), shard, &Some(SeqNo::from_u64(2)));
        assert_eq!(again.read_now(1, 0).unwrap().unwrap().record(0), b"bb");
        // Reads are sized by the lines seen so far (3 bytes here): a far longer line, and
        // the lines after it, still come whole.
        let long = vec![b'x'; 300 << 10];
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&long).unwrap();
        f.write_all(b"\nd\n").unwrap();
        let c = r.read_now(10, 0).unwrap().unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c.record(0), c.record(1)), (&long[..], &b"d"[..]));
        let c = again.read_now(1, 0).unwrap().unwrap();
        assert_eq!(c.record(0), b"ccc");
    }
}
