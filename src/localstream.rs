//! The local stream: the embedded default's stand-in for a Kinesis stream. A directory with
//! `stream.json` (the shard count) and one append-only NDJSON file per shard,
//! `shardId-000000000000.ndjson`, ... A record is one line; its sequence number is the byte
//! offset just past its newline, so numbers are stable, increasing, and "after sequence
//! number N" means "from byte N". Records are routed to shards by the MD5 of the partition
//! key over equal hash-key ranges, as Kinesis does.
//!
//! This module has no heavy dependencies: the agent's `local` transport writes with it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// The file naming the shard count.
pub const META_FILE: &str = "stream.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamMeta {
    pub shards: usize,
}

/// Kinesis-style shard id for shard `i`.
pub fn shard_id(i: usize) -> String {
    format!("shardId-{i:012}")
}

pub fn shard_path(dir: &Path, shard_id: &str) -> PathBuf {
    dir.join(format!("{shard_id}.ndjson"))
}

/// The shard a partition key maps to: MD5 as a 128-bit hash key over `shards` equal ranges.
pub fn shard_for_key(partition_key: &str, shards: usize) -> usize {
    let digest = Md5::digest(partition_key.as_bytes());
    let hash = u128::from_be_bytes(digest.into());
    // hash * shards / 2^128 without overflow: take the top 64 bits first.
    (((hash >> 64) * shards as u128) >> 64) as usize
}

/// The hash keys (inclusive) whose partition keys [`shard_for_key`] puts on shard `i` of
/// `shards`: the shard's hash-key range, as Kinesis gives each shard one.
pub fn hash_range(i: usize, shards: usize) -> (u128, u128) {
    // Shard i holds the keys whose top 64 bits h have floor(h * shards / 2^64) = i.
    let first_top = |i: usize| ((i as u128) << 64).div_ceil(shards as u128);
    let start = first_top(i) << 64;
    let end = ((first_top(i + 1) - 1) << 64) | u128::from(u64::MAX);
    (start, end)
}

/// Creates the stream (or checks an existing one has the same shard count).
pub fn create(dir: &Path, shards: usize) -> io::Result<StreamMeta> {
    if shards == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a stream needs at least one shard",
        ));
    }
    std::fs::create_dir_all(dir)?;
    let meta = StreamMeta { shards };
    match read_meta(dir) {
        Ok(existing) if existing == meta => {}
        Ok(existing) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already has {} shards, not {shards}",
                    dir.display(),
                    existing.shards
                ),
            ));
        }
        Err(_) => std::fs::write(dir.join(META_FILE), serde_json::to_vec(&meta)?)?,
    }
    for i in 0..shards {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(shard_path(dir, &shard_id(i)))?;
    }
    Ok(meta)
}

pub fn read_meta(dir: &Path) -> io::Result<StreamMeta> {
    let bytes = std::fs::read(dir.join(META_FILE))?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Appends records to a local stream. Each record is written with its newline in one
/// `write` on an `O_APPEND` file, so a reader never sees half a line as a whole one.
pub struct LocalStreamWriter {
    files: Vec<BufWriter<File>>,
    offsets: Vec<u64>,
}

impl LocalStreamWriter {
    pub fn open(dir: &Path) -> io::Result<Self> {
        let meta = read_meta(dir)?;
        let mut files = Vec::with_capacity(meta.shards);
        let mut offsets = Vec::with_capacity(meta.shards);
        for i in 0..meta.shards {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(shard_path(dir, &shard_id(i)))?;
            offsets.push(f.metadata()?.len());
            files.push(BufWriter::with_capacity(1 << 16, f));
        }
        Ok(Self { files, offsets })
    }

    /// Appends one record; returns its shard index and sequence number.
    pub fn put(&mut self, partition_key: &str, data: &[u8]) -> io::Result<(usize, u64)> {
        if data.contains(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a local-stream record cannot contain a newline",
            ));
        }
        let shard = shard_for_key(partition_key, self.files.len());
        let f = &mut self.files[shard];
        // Keep a record and its newline in one buffer flush: flush first if it would split.
        if f.capacity() - f.buffer().len() < data.len() + 1 {
            f.flush()?;
        }
        f.write_all(data)?;
        f.write_all(b"\n")?;
        self.offsets[shard] += data.len() as u64 + 1;
        Ok((shard, self.offsets[shard]))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.files.iter_mut().try_for_each(|f| f.flush())
    }

    pub fn shards(&self) -> usize {
        self.files.len()
    }
}

impl Drop for LocalStreamWriter {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_in_the_hash_range_of_its_shard_and_no_other() {
        for shards in [1, 2, 3, 4, 7] {
            let ranges: Vec<_> = (0..shards).map(|i| hash_range(i, shards)).collect();
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges[shards - 1].1, u128::MAX);
            for w in ranges.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0, "{shards} shards: contiguous");
            }
            for d in 0..2000 {
                let key = format!("acme/well-{d:04}");
                let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
                let inside: Vec<usize> = (0..shards)
                    .filter(|&i| (ranges[i].0..=ranges[i].1).contains(&hash))
                    .collect();
                assert_eq!(
                    inside,
                    vec![shard_for_key(&key, shards)],
                    "{key} over {shards}"
                );
            }
        }
    }

    #[test]
    fn keys_spread_over_shards_stably() {
        let mut counts = [0usize; 4];
        for d in 0..1000 {
            counts[shard_for_key(&format!("well-{d:04}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 150), "{counts:?}");
        assert_eq!(shard_for_key("well-0001", 4), shard_for_key("well-0001", 4));
        assert_eq!(shard_for_key("anything", 1), 0);
    }

    #[test]
    fn sequence_numbers_are_end_offsets() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), 1).unwrap();
        let mut w = LocalStreamWriter::open(dir.path()).unwrap();
        assert_eq!(w.put("k", b"{}").unwrap(), (0, 3));
        assert_eq!(w.put("k", b"{\"a\":1}").unwrap(), (0, 11));
        assert!(w.put("k", b"a\nb").is_err());
        drop(w);
        let mut w = LocalStreamWriter::open(dir.path()).unwrap();
        assert_eq!(w.put("k", b"x").unwrap(), (0, 13));
        assert!(create(dir.path(), 2).is_err());
    }
}
