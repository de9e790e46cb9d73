//! What every source hands the pipeline: chunks of raw records from one shard, each with its
//! sequence number, in shard order.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A shard's sequence number. Kinesis' are decimal strings of up to 128 digits (beyond
/// `u128`); they order by length, then digit by digit. The local stream's are byte offsets.
///
/// A user record unpacked from a KPL aggregate is `<sequence number>:<sub-sequence number>`
/// (its index in the aggregate); it orders after the records before its aggregate and before
/// the aggregate's own number, which stands for the whole record.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeqNo(pub String);

impl SeqNo {
    pub fn from_u64(n: u64) -> Self {
        Self(n.to_string())
    }

    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }

    /// The `sub`-th user record of the aggregate with sequence number `seq`.
    pub fn sub_record(seq: &str, sub: u64) -> Self {
        Self(format!("{seq}:{sub}"))
    }

    /// The Kinesis record's sequence number (without a sub-sequence).
    pub fn record(&self) -> &str {
        self.0.split_once(':').map_or(&self.0, |(seq, _)| seq)
    }

    /// The sub-sequence number of a user record unpacked from an aggregate.
    pub fn sub(&self) -> Option<u64> {
        self.0.split_once(':').and_then(|(_, sub)| sub.parse().ok())
    }
}

impl Ord for SeqNo {
    fn cmp(&self, other: &Self) -> Ordering {
        order(&self.0, &other.0)
    }
}

/// The order of two sequence numbers' texts (see [`SeqNo`]).
pub fn order(a: &str, b: &str) -> Ordering {
    fn split(s: &str) -> (usize, &str, u64) {
        match s.split_once(':') {
            Some((seq, sub)) => (seq.len(), seq, sub.parse().unwrap_or(u64::MAX)),
            None => (s.len(), s, u64::MAX),
        }
    }
    split(a).cmp(&split(b))
}

impl PartialOrd for SeqNo {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The sequence numbers of a chunk's records, back to back in one string: no allocation per
/// record.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SeqNos {
    text: String,
    ends: Vec<usize>,
}

impl SeqNos {
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(records),
        }
    }

    pub fn push(&mut self, seq: &str) {
        self.text.push_str(seq);
        self.ends.push(self.text.len());
    }

    /// A local stream's byte offset, written without the formatting machinery.
    pub fn push_u64(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n));
    }

    /// The `sub`-th user record of the aggregate with sequence number `seq`.
    pub fn push_sub(&mut self, seq: &str, sub: u64) {
        use std::fmt::Write;
        write!(self.text, "{seq}:{sub}").expect("writing to a String");
        self.ends.push(self.text.len());
    }

    /// Takes the last one off again.
    pub fn pop(&mut self) {
        self.ends.pop();
        self.text.truncate(self.ends.last().copied().unwrap_or(0));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of all the sequence numbers together.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    pub fn last(&self) -> Option<&str> {
        (!self.is_empty()).then(|| self.get(self.len() - 1))
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl fmt::Debug for SeqNos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for SeqNos {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut seqs = SeqNos::default();
        for s in iter {
            seqs.push(s.as_ref());
        }
        seqs
    }
}

/// Why a source rejected a record before it was decoded (the dead letter's reason kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A KPL aggregate that cannot be unpacked.
    CorruptAggregate,
    /// A CSV row with another number of cells than its header.
    BadCsvRow,
    /// A compressed object that ends early or does not decompress.
    CorruptObject,
    /// An object above `max_object_bytes`: dead-lettered whole, unread.
    ObjectTooLarge,
    /// An object whose format its key's extension does not tell.
    UnknownFormat,
    /// An object whose notification came back too often without it being read (a poison
    /// object): the rest of it, unread.
    ObjectUnreadable,
}

/// A reading position in a shard: after this sequence number, or (None) from the start.
pub type Position = Option<SeqNo>;

/// Consecutive records of one shard.
#[derive(Debug, Clone)]
pub struct RawChunk {
    pub shard: Arc<str>,
    /// The position before the first record: reading from here again yields this chunk.
    pub resume_from: Position,
    /// The records' bytes, back to back.
    pub data: Vec<u8>,
    /// Each record's bytes within `data`.
    pub spans: Vec<Range<usize>>,
    pub seqs: SeqNos,
    /// Each record's partition key, packed like `seqs`, when the source has them (Kinesis
    /// does; a KPL user record has its own). Empty when it has none (the local stream): the
    /// pipeline's `identity` check needs them.
    pub keys: SeqNos,
    /// Records the source already knows are bad (a corrupt KPL aggregate, a CSV row that
    /// does not fit its header, the damaged end of a compressed object), by index, with
    /// why: they go to dead-letter as they are.
    pub rejected: Vec<(usize, Rejection, String)>,
    /// Wall-clock time the chunk was read (microseconds since the epoch).
    pub arrival_us: i64,
    /// Each record as it was in the source, when the source rewrote it (a CSV row, turned
    /// into a JSON object): a dead letter keeps these bytes. Empty when records are as read.
    pub as_read: AsRead,
}

/// Records' bytes as they were read, when the records handed on differ (see
/// [`RawChunk::as_read`]).
#[derive(Debug, Clone, Default)]
pub struct AsRead {
    pub data: Vec<u8>,
    pub spans: Vec<Range<usize>>,
}

impl RawChunk {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn record(&self, i: usize) -> &[u8] {
        &self.data[self.spans[i].clone()]
    }

    /// Record `i` as it was in the source: what a dead letter keeps.
    pub fn as_read(&self, i: usize) -> &[u8] {
        match self.as_read.spans.get(i) {
            Some(span) => &self.as_read.data[span.clone()],
            None => self.record(i),
        }
    }

    /// Record `i`'s partition key, if the source gave keys.
    pub fn key(&self, i: usize) -> Option<&str> {
        (self.keys.len() == self.seqs.len()).then(|| self.keys.get(i))
    }

    /// The position after the last record.
    pub fn end(&self) -> Position {
        match self.seqs.last() {
            Some(seq) => Some(SeqNo(seq.to_string())),
            None => self.resume_from.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_order_numerically() {
        let a = SeqNo("49590338271490256608559692538361571095921575989136588898".into());
        let b = SeqNo("49590338271490256608559692540925702759324208523137515618".into());
        assert!(a < b);
        assert!(SeqNo::from_u64(9) < SeqNo::from_u64(10));
        assert!(SeqNo::from_u64(100) > SeqNo::from_u64(99));
    }

    #[test]
    fn a_chunks_sequence_numbers_read_back_as_pushed() {
        let mut seqs = SeqNos::default();
        for n in [0, 7, 10, 123_456_789, u64::MAX] {
            seqs.push_u64(n);
        }
        seqs.push_sub("4959", 3);
        seqs.push("");
        let want = [
            "0",
            "7",
            "10",
            "123456789",
            "18446744073709551615",
            "4959:3",
            "",
        ];
        assert_eq!(seqs.iter().collect::<Vec<_>>(), want);
        assert_eq!((seqs.len(), seqs.last()), (7, Some("")));
    }

    #[test]
    fn sub_records_order_inside_their_aggregate() {
        let agg = "49590338271490256608559692538361571095921575989136588898";
        let next = SeqNo("49590338271490256608559692540925702759324208523137515618".into());
        let (s0, s1) = (SeqNo::sub_record(agg, 0), SeqNo::sub_record(agg, 1));
        let whole = SeqNo(agg.into());
        assert!(s0 < s1 && s1 < whole && whole < next);
        assert!(SeqNo::sub_record(agg, 999) < next);
        assert!(SeqNo::from_u64(9) < SeqNo::sub_record("10", 0));
        assert_eq!(order("12:1", "12"), Ordering::Less);
        assert_eq!((s1.record(), s1.sub()), (agg, Some(1)));
        assert_eq!((whole.record(), whole.sub()), (agg, None));
    }
}
