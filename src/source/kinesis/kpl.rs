//! KPL aggregated records: the Kinesis Producer Library (and its Python, Node and Go ports)
//! packs many user records into one Kinesis record as
//! `F3 89 9A C2 | protobuf AggregatedRecord | MD5 of the protobuf`.
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! Each user record keeps its own partition key (from `partition_key_table`), which the
//! pipeline's `identity` check compares with the record's fields; the explicit hash keys and
//! tags are skipped. This reads the wire format directly: a few dozen lines instead of a
//! protobuf code generator in the build. Each user record gets the aggregate's sequence
//! number and its index as sub-sequence number, as the KCL does.

use md5::{Digest, Md5};

pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// What a Kinesis record holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Unpacked<'a> {
    /// Not an aggregate: one user record, the Kinesis record's data.
    Plain,
    /// The user records, in order.
    Records(Vec<User<'a>>),
    /// Starts with the magic but its digest or body is wrong.
    Corrupt(String),
}

/// One user record of an aggregate.
#[derive(Debug, PartialEq, Eq)]
pub struct User<'a> {
    pub data: &'a [u8],
    /// Its partition key, from the aggregate's key table.
    pub key: &'a str,
}

/// Unpacks a Kinesis record's data.
pub fn unpack(data: &[u8]) -> Unpacked<'_> {
    let Some(rest) = data.strip_prefix(&MAGIC) else {
        return Unpacked::Plain;
    };
    if rest.len() < DIGEST_LEN {
        return Unpacked::Corrupt(format!(
            "{} bytes after the magic; the MD5 digest alone is 16",
            rest.len()
        ));
    }
    let (body, digest) = rest.split_at(rest.len() - DIGEST_LEN);
    if Md5::digest(body).as_slice() != digest {
        return Unpacked::Corrupt("the MD5 digest does not match the protobuf body".into());
    }
    match records(body) {
        Ok(r) if r.is_empty() => Unpacked::Corrupt("the aggregate holds no records".into()),
        Ok(r) => Unpacked::Records(r),
        Err(e) => Unpacked::Corrupt(format!("protobuf: {e}")),
    }
}

/// Every `records` entry of an `AggregatedRecord`, with its key from `partition_key_table`.
fn records(body: &[u8]) -> Result<Vec<User<'_>>, String> {
    let mut keys = Vec::new();
    let mut out = Vec::new();
    let mut r = Wire(body);
    while !r.0.is_empty() {
        let (field, kind) = r.key()?;
        match (field, kind) {
            (1, LEN) => {
                let key = std::str::from_utf8(r.bytes()?)
                    .map_err(|_| format!("partition key {} is not UTF-8", keys.len()))?;
                keys.push(key);
            }
            (3, LEN) => {
                let record = r.bytes()?;
                out.push(record_data(record).map_err(|e| format!("record {}: {e}", out.len()))?);
            }
            _ => r.skip(kind)?,
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, (data, k))| {
            let key = usize::try_from(k)
                .ok()
                .and_then(|k| keys.get(k))
                .ok_or_else(|| {
                    format!(
                        "record {i}: partition_key_index {k} is beyond the table's {} keys",
                        keys.len()
                    )
                })?;
            Ok(User { data, key })
        })
        .collect()
}

/// A record's `data` and `partition_key_index`.
fn record_data(record: &[u8]) -> Result<(&[u8], u64), String> {
    let mut r = Wire(record);
    let (mut data, mut key) = (None, None);
    while !r.0.is_empty() {
        let (field, kind) = r.key()?;
        match (field, kind) {
            (1, VARINT) => key = Some(r.varint()?),
            (3, LEN) => data = Some(r.bytes()?),
            _ => r.skip(kind)?,
        }
    }
    match (data, key) {
        (Some(d), Some(k)) => Ok((d, k)),
        (None, _) => Err("no `data` field".into()),
        (_, None) => Err("no `partition_key_index` field".into()),
    }
}

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// A protobuf reader over a byte slice.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn key(&mut self) -> Result<(u64, u8), String> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err(format!(
                "a field of {n} bytes where {} remain",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.varint()?;
        self.take(usize::try_from(n).map_err(|_| "length overflows")?)
    }

    fn skip(&mut self, kind: u8) -> Result<(), String> {
        match kind {
            VARINT => self.varint().map(drop),
            I64 => self.take(8).map(drop),
            LEN => self.bytes().map(drop),
            I32 => self.take(4).map(drop),
            k => Err(format!("wire type {k} is not supported")),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn field(n: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(n << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    /// An aggregate as the KPL writes it (keys table, then records with a tag each).
    pub(crate) fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut keys: Vec<&str> = Vec::new();
        let mut body = Vec::new();
        let mut recs = Vec::new();
        for (key, data) in records {
            let idx = keys.iter().position(|k| k == key).unwrap_or_else(|| {
                keys.push(key);
                keys.len() - 1
            });
            let mut r = Vec::new();
            varint(1 << 3, &mut r);
            varint(idx as u64, &mut r);
            field(3, data, &mut r);
            let mut tag = Vec::new();
            field(1, b"k", &mut tag);
            field(4, &tag, &mut r);
            recs.push(r);
        }
        for k in &keys {
            field(1, k.as_bytes(), &mut body);
        }
        for r in &recs {
            field(3, r, &mut body);
        }
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }

    #[test]
    fn unpacks_user_records_in_order() {
        let agg = aggregate(&[("a", b"{\"n\":1}"), ("b", b"{\"n\":2}"), ("a", b"")]);
        let user = |key, data: &'static [u8]| User { data, key };
        assert_eq!(
            unpack(&agg),
            Unpacked::Records(vec![
                user("a", b"{\"n\":1}"),
                user("b", b"{\"n\":2}"),
                user("a", b"")
            ])
        );
        assert_eq!(unpack(b"{\"n\":1}"), Unpacked::Plain);
        assert_eq!(unpack(&MAGIC[..3]), Unpacked::Plain);
    }

    #[test]
    fn corrupt_aggregates_are_named() {
        let mut agg = aggregate(&[("a", b"{\"n\":1}")]);
        let last = agg.len() - 1;
        agg[last] ^= 1;
        assert!(matches!(unpack(&agg), Unpacked::Corrupt(m) if m.contains("MD5")));
        assert!(matches!(unpack(&MAGIC), Unpacked::Corrupt(m) if m.contains("16")));
        // A valid digest over a truncated body.
        let body = [3 << 3 | 2, 50, 1];
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&body);
        bad.extend_from_slice(&Md5::digest(body));
        assert!(matches!(unpack(&bad), Unpacked::Corrupt(m) if m.contains("protobuf")));
        let mut empty = MAGIC.to_vec();
        empty.extend_from_slice(&Md5::digest(b""));
        assert!(matches!(unpack(&empty), Unpacked::Corrupt(m) if m.contains("no records")));
        // A record whose key index is past the table.
        let mut body = Vec::new();
        field(1, b"a", &mut body);
        let mut r = Vec::new();
        varint(1 << 3, &mut r);
        varint(5, &mut r);
        field(3, b"{}", &mut r);
        field(3, &r, &mut body);
        let mut bad = MAGIC.to_vec();
        bad.extend_from_slice(&body);
        bad.extend_from_slice(&Md5::digest(&body));
        assert!(matches!(unpack(&bad), Unpacked::Corrupt(m) if m.contains("beyond the table")));
    }
}
