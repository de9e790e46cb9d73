//! The agent's durable queue: readings are appended to segment files on disk and removed only
//! once the transport has acknowledged them, so an outage or a power cut loses nothing that
//! reached the disk, and readings go out in the order they were taken.
//!
//! # On disk
//! - `<n>.seg`: append-only segments of entries `len u32 | crc32 u32 | seq u64 | payload`
//!   (little-endian; the CRC covers `seq` and the payload). A torn tail after a power cut
//!   fails its length or CRC and is cut off when the queue opens.
//! - `cursor`: two 40-byte slots written in turn (`generation, segment, offset, reserved seq,
//!   crc`), so a torn write leaves the other slot valid. It holds the first entry not yet
//!   acknowledged and the highest `seq` handed out, so `seq` never repeats, even when a power
//!   cut loses the newest entries.
//!
//! Friendly to SD cards: segments are only appended to and deleted whole; the cursor is one
//! small in-place write; fsync follows the configured policy.
//!
//! When the queue holds more than `max_bytes`, the oldest segment is dropped, sent or not; the
//! readings dropped are counted ([`Stats::dropped`]) and the caller logs them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::Fsync;

const HEADER: usize = 16;
const SLOT: usize = 40;
/// A larger entry is not a reading: refuse it rather than corrupt the framing.
pub const MAX_ENTRY: usize = 1 << 20;
/// `seq`s are reserved on disk this many at a time (one cursor fsync per block).
const SEQ_BLOCK: u64 = 10_000;

/// Where an entry starts (or the queue's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub segment: u64,
    pub offset: u64,
}

/// An entry read from the queue; `next` is where the entry after it starts.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub payload: Vec<u8>,
    pub next: Pos,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub appended: u64,
    pub acked: u64,
    /// Readings dropped unsent because the queue was full.
    pub dropped: u64,
    /// Bytes of a torn tail cut off when the queue opened.
    pub truncated_bytes: u64,
}

pub struct Queue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    fsync: Fsync,
    /// (segment number, length in bytes), oldest first; the last one is written to.
    segments: VecDeque<(u64, u64)>,
    writer: File,
    cursor_file: File,
    cursor: Pos,
    generation: u64,
    next_seq: u64,
    reserved: u64,
    unsynced_since: Option<Instant>,
    pub stats: Stats,
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:012}.seg"))
}

fn bad_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Queue {
    /// Opens (or creates) the queue in `dir`, cutting off a torn tail.
    pub fn open(dir: &Path, max_bytes: u64, fsync: Fsync) -> io::Result<Queue> {
        std::fs::create_dir_all(dir)?;
        let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            File::create(seg_path(dir, 0))?;
            numbers.push(0);
        }
        let mut segments = VecDeque::new();
        for &n in &numbers {
            segments.push_back((n, std::fs::metadata(seg_path(dir, n))?.len()));
        }
        let last = *numbers.last().expect("at least one");
        let (valid, last_seq) = scan(&seg_path(dir, last))?;
        let mut stats = Stats::default();
        let writer = OpenOptions::new().append(true).open(seg_path(dir, last))?;
        let len = segments.back().expect("one").1;
        if valid < len {
            writer.set_len(valid)?;
            writer.sync_all()?;
            stats.truncated_bytes = len - valid;
            segments.back_mut().expect("one").1 = valid;
        }
        let cursor_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("cursor"))?;
        let (generation, mut cursor, reserved) = read_cursor(&cursor_file)?.unwrap_or((
            0,
            Pos {
                segment: numbers[0],
                offset: 0,
            },
            0,
        ));
        // The cursor's segment may be gone (dropped or fully acknowledged), or its tail lost.
        let first = segments[0].0;
        if cursor.segment < first {
            cursor = Pos {
                segment: first,
                offset: 0,
            };
        }
        if let Some(&(_, len)) = segments.iter().find(|(n, _)| *n == cursor.segment) {
            cursor.offset = cursor.offset.min(len);
        }
        let next_seq = reserved.max(last_seq.map_or(1, |s| s + 1)).max(1);
        let mut q = Queue {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(64 << 10, 4 << 20),
            fsync,
            segments,
            writer,
            cursor_file,
            cursor,
            generation,
            next_seq,
            reserved: next_seq,
            unsynced_since: None,
            stats,
        };
        q.reserve(next_seq)?;
        Ok(q)
    }

    /// The `seq` the next appended entry gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends one entry per item, `encode(item, seq)` giving its payload, in one write.
    pub fn append<T>(
        &mut self,
        items: &[T],
        encode: impl Fn(&T, u64) -> Vec<u8>,
    ) -> io::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let last_seq = self.next_seq + items.len() as u64 - 1;
        if last_seq >= self.reserved {
            self.reserve(last_seq + 1)?;
        }
        let mut buf = Vec::with_capacity(items.len() * 256);
        for item in items {
            let seq = self.next_seq;
            let payload = encode(item, seq);
            if payload.len() > MAX_ENTRY {
                return Err(bad_data(format!("an entry of {} bytes", payload.len())));
            }
            let mut crc = crc32fast::Hasher::new();
            crc.update(&seq.to_le_bytes());
            crc.update(&payload);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc.finalize().to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&payload);
            self.next_seq += 1;
        }
        if self.segments.back().expect("one").1 >= self.segment_bytes {
            self.roll()?;
        }
        self.writer.write_all(&buf)?;
        self.segments.back_mut().expect("one").1 += buf.len() as u64;
        self.stats.appended += items.len() as u64;
        self.written()?;
        self.enforce_bound()
    }

    /// Up to `max_entries` entries (and about `max_bytes` of payload, at least one entry) from
    /// the first one not acknowledged, in order.
    pub fn read(&self, max_entries: usize, max_bytes: usize) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut pos = self.cursor;
        let from = pos.segment;
        for &(n, len) in self.segments.iter().filter(|(n, _)| *n >= from) {
            if n > pos.segment {
                pos = Pos {
                    segment: n,
                    offset: 0,
                };
            }
            if pos.offset >= len {
                continue;
            }
            let mut file = File::open(seg_path(&self.dir, n))?;
            file.seek(SeekFrom::Start(pos.offset))?;
            let mut r = BufReader::new(file.take(len - pos.offset));
            while pos.offset < len {
                let (seq, payload) = read_entry(&mut r)?
                    .ok_or_else(|| bad_data(format!("segment {n} ends inside an entry")))?;
                if !out.is_empty() && bytes + payload.len() > max_bytes {
                    return Ok(out);
                }
                pos.offset += (HEADER + payload.len()) as u64;
                bytes += payload.len();
                out.push(Entry {
                    seq,
                    payload,
                    next: pos,
                });
                if out.len() >= max_entries {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Everything before `upto` was delivered: move the cursor and delete spent segments.
    pub fn ack(&mut self, upto: Pos, entries: u64) -> io::Result<()> {
        if upto <= self.cursor {
            return Ok(());
        }
        self.cursor = upto;
        self.stats.acked += entries;
        while self.segments.len() > 1 {
            let (n, len) = self.segments[0];
            let spent =
                n < self.cursor.segment || (n == self.cursor.segment && self.cursor.offset >= len);
            if !spent {
                break;
            }
            std::fs::remove_file(seg_path(&self.dir, n))?;
            self.segments.pop_front();
        }
        self.write_cursor()?;
        self.written()
    }

    /// Bytes not yet acknowledged.
    pub fn pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|&(n, len)| {
                if n < self.cursor.segment {
                    0
                } else if n == self.cursor.segment {
                    len - self.cursor.offset
                } else {
                    len
                }
            })
            .sum()
    }

    /// fsyncs what the policy left for later, if it is due (call it now and then).
    pub fn sync_if_due(&mut self) -> io::Result<()> {
        if let (Fsync::Every(d), Some(since)) = (self.fsync, self.unsynced_since)
            && since.elapsed() >= d
        {
            self.sync()?;
        }
        Ok(())
    }

    /// fsyncs everything and records the exact next `seq` (a clean stop leaves no gap).
    pub fn close(mut self) -> io::Result<()> {
        self.reserved = self.next_seq;
        self.write_cursor()?;
        self.sync()
    }

    fn sync(&mut self) -> io::Result<()> {
        self.writer.sync_data()?;
        self.cursor_file.sync_data()?;
        self.unsynced_since = None;
        Ok(())
    }

    fn written(&mut self) -> io::Result<()> {
        match self.fsync {
            Fsync::Always => self.sync(),
            Fsync::Every(_) => {
                self.unsynced_since.get_or_insert_with(Instant::now);
                self.sync_if_due()
            }
            Fsync::Never => Ok(()),
        }
    }

    /// Makes `seq`s up to `upto + SEQ_BLOCK` ours on disk before any of them is used.
    fn reserve(&mut self, upto: u64) -> io::Result<()> {
        self.reserved = upto + SEQ_BLOCK;
        self.write_cursor()?;
        self.cursor_file.sync_data()
    }

    fn roll(&mut self) -> io::Result<()> {
        self.writer.sync_data()?;
        let n = self.segments.back().expect("one").0 + 1;
        self.writer = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(seg_path(&self.dir, n))?;
        self.segments.push_back((n, 0));
        // The new file's directory entry must survive a power cut too.
        File::open(&self.dir)?.sync_all()
    }

    fn enforce_bound(&mut self) -> io::Result<()> {
        while self.segments.iter().map(|s| s.1).sum::<u64>() > self.max_bytes
            && self.segments.len() > 1
        {
            let (n, len) = self.segments[0];
            let from = if n == self.cursor.segment {
                self.cursor.offset
            } else {
                0
            };
            if n >= self.cursor.segment {
                self.stats.dropped += count_entries(&seg_path(&self.dir, n), from, len)?;
            }
            std::fs::remove_file(seg_path(&self.dir, n))?;
            self.segments.pop_front();
            if self.cursor.segment <= n {
                self.cursor = Pos {
                    segment: self.segments[0].0,
                    offset: 0,
                };
            }
            self.write_cursor()?;
        }
        Ok(())
    }

    fn write_cursor(&mut self) -> io::Result<()> {
        self.generation += 1;
        let mut slot = [0u8; SLOT];
        slot[0..8].copy_from_slice(&self.generation.to_le_bytes());
        slot[8..16].copy_from_slice(&self.cursor.segment.to_le_bytes());
        slot[16..24].copy_from_slice(&self.cursor.offset.to_le_bytes());
        slot[24..32].copy_from_slice(&self.reserved.to_le_bytes());
        let crc = crc32fast::hash(&slot[..32]);
        slot[32..36].copy_from_slice(&crc.to_le_bytes());
        self.cursor_file
            .write_all_at(&slot, (self.generation % 2) * SLOT as u64)
    }
}

/// What a queue holds, read without changing it (`shardlake-agent status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// Readings written but not acknowledged yet.
    pub pending: u64,
    pub pending_bytes: u64,
    /// The first and last pending `seq`.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The `seq`s up to this one may have been handed out; the next run starts here or after
    /// the last entry, whichever is higher.
    pub reserved_seq: u64,
    pub segments: usize,
}

/// Reads a queue directory without opening it for writing (a torn tail is not cut off).
pub fn inspect(dir: &Path) -> io::Result<Status> {
    let cursor_file = File::open(dir.join("cursor"))?;
    let (_, cursor, reserved) =
        read_cursor(&cursor_file)?.ok_or_else(|| bad_data("no valid cursor slot".into()))?;
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort_unstable();
    let mut st = Status {
        reserved_seq: reserved,
        segments: numbers.len(),
        ..Status::default()
    };
    for n in numbers.into_iter().filter(|&n| n >= cursor.segment) {
        let from = if n == cursor.segment {
            cursor.offset
        } else {
            0
        };
        let mut file = File::open(seg_path(dir, n))?;
        file.seek(SeekFrom::Start(from))?;
        let mut r = BufReader::new(file);
        while let Ok(Some((seq, payload))) = read_entry(&mut r) {
            st.pending += 1;
            st.pending_bytes += (HEADER + payload.len()) as u64;
            st.first_seq.get_or_insert(seq);
            st.last_seq = Some(seq);
        }
    }
    Ok(st)
}

/// The newest valid cursor slot: (generation, position, reserved seq).
fn read_cursor(file: &File) -> io::Result<Option<(u64, Pos, u64)>> {
    let mut both = [0u8; 2 * SLOT];
    let n = file.read_at(&mut both, 0)?;
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    Ok(both[..n]
        .chunks_exact(SLOT)
        .filter(|s| crc32fast::hash(&s[..32]).to_le_bytes() == s[32..36])
        .map(|s| {
            (
                le(&s[0..8]),
                Pos {
                    segment: le(&s[8..16]),
                    offset: le(&s[16..24]),
                },
                le(&s[24..32]),
            )
        })
        .max_by_key(|s| s.0))
}

/// One entry, `None` at a clean end; a torn or corrupt entry is an error.
fn read_entry(r: &mut impl Read) -> io::Result<Option<(u64, Vec<u8>)>> {
    let mut header = [0u8; HEADER];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4")) as usize;
    if len > MAX_ENTRY {
        return Err(bad_data(format!("entry length {len}")));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header[8..16]);
    crc.update(&payload);
    if crc.finalize().to_le_bytes() != header[4..8] {
        return Err(bad_data("entry CRC mismatch".into()));
    }
    Ok(Some((
        u64::from_le_bytes(header[8..16].try_into().expect("8")),
        payload,
    )))
}

/// The length of the valid prefix of a segment and the last `seq` in it.
fn scan(path: &Path) -> io::Result<(u64, Option<u64>)> {
    let mut r = BufReader::new(File::open(path)?);
    let (mut valid, mut last) = (0u64, None);
    loop {
        match read_entry(&mut r) {
            Ok(Some((seq, payload))) => {
                valid += (HEADER + payload.len()) as u64;
                last = Some(seq);
            }
            // A clean end, or a torn/corrupt tail: what follows is cut off.
            Ok(None) | Err(_) => return Ok((valid, last)),
        }
    }
}

fn count_entries(path: &Path, from: u64, len: u64) -> io::Result<u64> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut r = BufReader::new(file.take(len - from));
    let mut n = 0;
    while let Ok(Some(_)) = read_entry(&mut r) {
        n += 1;
    }
    Ok(n)
}

/// How long a fsync policy lets data wait (for the caller's timer).
pub fn sync_period(fsync: Fsync) -> Option<Duration> {
    match fsync {
        Fsync::Every(d) => Some(d),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(q: &Queue) -> Vec<(u64, String)> {
        q.read(usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, String::from_utf8(e.payload).unwrap()))
            .collect()
    }

    fn fill(q: &mut Queue, from: usize, n: usize) {
        let items: Vec<usize> = (from..from + n).collect();
        q.append(&items, |i, _| format!("reading {i}").into_bytes())
            .unwrap();
    }

    #[test]
    fn survives_reopen_and_acks_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        fill(&mut q, 0, 5);
        let first = q.read(2, usize::MAX).unwrap();
        assert_eq!(first.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        q.ack(first[1].next, 2).unwrap();
        drop(q); // as a SIGKILL would: no close
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        let left = payloads(&q);
        assert_eq!(left.iter().map(|p| p.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(left[0].1, "reading 2");
        // Without a clean close the next seq jumps past the reserved block, never back.
        assert!(q.next_seq() > 5);
        fill(&mut q, 5, 1);
        q.close().unwrap();
        let q = Queue::open(dir.path(), 1 << 20, Fsync::Never).unwrap();
        let after_close = q.next_seq();
        assert_eq!(payloads(&q).len(), 4);
        let q2 = {
            q.close().unwrap();
            Queue::open(dir.path(), 1 << 20, Fsync::Never).unwrap()
        };
        assert_eq!(q2.next_seq(), after_close, "a clean close leaves no gap");
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_its_seq_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        fill(&mut q, 0, 3);
        drop(q);
        let seg = seg_path(dir.path(), 0);
        let len = std::fs::metadata(&seg).unwrap().len();
        // A power cut in the middle of the third entry.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 4)
            .unwrap();
        let q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        assert_eq!(payloads(&q).len(), 2);
        assert!(q.stats.truncated_bytes > 0);
        assert!(
            q.next_seq() > 3,
            "seq 3 was handed out once; it must not come back"
        );
    }

    #[test]
    fn a_torn_cursor_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        fill(&mut q, 0, 4);
        let e = q.read(1, usize::MAX).unwrap();
        q.ack(e[0].next, 1).unwrap();
        let e = q.read(1, usize::MAX).unwrap();
        q.ack(e[0].next, 1).unwrap();
        let generation = q.generation;
        drop(q);
        // Corrupt the newest slot: the older one (one entry acknowledged) is used.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cursor"))
            .unwrap();
        f.write_all_at(&[0xff; 8], (generation % 2) * SLOT as u64 + 8)
            .unwrap();
        let q = Queue::open(dir.path(), 1 << 20, Fsync::Always).unwrap();
        assert_eq!(payloads(&q).first().unwrap().1, "reading 1");
    }

    #[test]
    fn a_full_queue_drops_the_oldest_segment_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Never).unwrap();
        let big = vec![b'x'; 1000];
        for _ in 0..3000 {
            q.append(&[()], |_, _| big.clone()).unwrap();
        }
        let kept = payloads(&q);
        let on_disk: u64 = q.segments.iter().map(|s| s.1).sum();
        assert!(on_disk <= 1 << 20, "{on_disk}");
        assert_eq!(q.stats.dropped + kept.len() as u64, 3000);
        assert!(q.stats.dropped > 0);
        // What is kept is the newest, still in order and without gaps.
        assert_eq!(kept.last().unwrap().0, 3000);
        assert!(kept.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    }

    #[test]
    fn acknowledged_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Queue::open(dir.path(), 1 << 20, Fsync::Never).unwrap();
        let big = vec![b'y'; 1000];
        for _ in 0..600 {
            q.append(&[()], |_, _| big.clone()).unwrap();
        }
        assert!(q.segments.len() > 2);
        loop {
            let batch = q.read(100, usize::MAX).unwrap();
            let Some(last) = batch.last() else { break };
            q.ack(last.next, batch.len() as u64).unwrap();
        }
        assert_eq!(q.segments.len(), 1);
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(q.stats.acked, 600);
    }
}
