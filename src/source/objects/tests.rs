//! An object read whole, resumed at a committed offset, damaged, or not readable at all.

use std::io::Write;

use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;

use super::*;
use crate::config::{ObjectSource, ObjectStoreAt};

fn cfg() -> ObjectSource {
    ObjectSource {
        store: ObjectStoreAt::Files("unused".into()),
        format: None,
        compression: None,
        start_after: None,
        concurrency: 1,
        poll_interval: std::time::Duration::from_secs(1),
        max_object_bytes: 1 << 30,
        notifications: None,
    }
}

/// The chunks reading `name` (holding `content`) after `from` sends.
fn chunks(name: &str, content: &[u8], from: u64, cfg: ObjectSource) -> Vec<RawChunk> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), content).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let meta = rt
        .block_on(store.head(&object_store::path::Path::from(name)))
        .unwrap();
    let fields = [
        ("device_id", FieldType::String),
        ("seq", FieldType::Int64),
        ("ok", FieldType::Bool),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let job = Job {
        shard: Arc::from(super::super::shard_id(&meta)),
        meta: Some(meta),
        poison: None,
        from,
        store,
        cfg,
        fields: Arc::new(fields),
        metrics: Arc::default(),
    };
    let (tx, mut rx) = mpsc::channel(1000);
    produce(job, &tx, rt.handle());
    drop(tx);
    let mut out = Vec::new();
    let mut resume = (from > 0).then(|| SeqNo::from_u64(from));
    while let Ok(Ok(c)) = rx.try_recv() {
        assert_eq!(
            c.resume_from, resume,
            "a chunk starts where the one before ended"
        );
        resume = c.end();
        out.push(c);
    }
    out
}

/// What reading `name` after `from` sends: (record, seq, rejected kind).
fn read_object(
    name: &str,
    content: &[u8],
    from: u64,
    cfg: ObjectSource,
) -> Vec<(String, u64, Option<Rejection>)> {
    let mut out = Vec::new();
    for c in chunks(name, content, from, cfg) {
        for i in 0..c.len() {
            let kind = c.rejected.iter().find(|r| r.0 == i).map(|r| r.1);
            let text = String::from_utf8(c.record(i).to_vec()).unwrap();
            out.push((text, c.seqs.get(i).parse().unwrap(), kind));
        }
    }
    out
}

/// The records of `name` as read (what their dead letters would keep).
fn as_read(name: &str, content: &[u8]) -> Vec<String> {
    let chunks = chunks(name, content, 0, cfg());
    let records = chunks
        .iter()
        .flat_map(|c| (0..c.len()).map(move |i| c.as_read(i)));
    records
        .map(|r| String::from_utf8(r.to_vec()).unwrap())
        .collect()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

const LINES: &[u8] = b"{\"a\":1}\n\n{\"a\":2}\r\n   \n{\"a\":3}";

#[test]
fn ndjson_lines_end_at_their_offsets_and_resume_after_the_committed_one() {
    let records = |r: &[(String, u64, Option<Rejection>)]| {
        r.iter()
            .map(|(t, s, _)| (t.trim_end().to_string(), *s))
            .collect::<Vec<_>>()
    };
    let want = vec![
        ("{\"a\":1}".to_string(), 8),
        ("{\"a\":2}".to_string(), 18),
        ("{\"a\":3}".to_string(), 29),
    ];
    for (name, content) in [
        ("x.ndjson", LINES.to_vec()),
        ("x.ndjson.gz", gzip(LINES)),
        ("x.jsonl.zst", zstd::encode_all(LINES, 3).unwrap()),
    ] {
        let all = read_object(name, &content, 0, cfg());
        assert_eq!(records(&all), want, "{name}: blank lines are no records");
        // Resumed after the first record: a ranged read when uncompressed, skipping when not.
        let rest = read_object(name, &content, 8, cfg());
        assert_eq!(records(&rest), want[1..], "{name} resumed");
        assert!(
            read_object(name, &content, 29, cfg()).is_empty(),
            "{name} read to its end"
        );
    }
}

#[test]
fn a_truncated_gzip_keeps_what_came_before_and_dead_letters_the_rest() {
    let lines: Vec<u8> = (0..2000)
        .flat_map(|i| format!("{{\"seq\":{i}}}\n").into_bytes())
        .collect();
    let whole = gzip(&lines);
    let got = read_object("t.ndjson.gz", &whole[..whole.len() / 2], 0, cfg());
    let (last, good) = got.split_last().unwrap();
    assert_eq!(last.2, Some(Rejection::CorruptObject), "{last:?}");
    assert!(
        !good.is_empty() && good.len() < 2000,
        "{} records",
        good.len()
    );
    assert!(good.iter().all(|r| r.2.is_none()));
    assert!(
        last.1 > good.last().unwrap().1,
        "the damage comes after the last record"
    );
    for (i, (text, _, _)) in good.iter().enumerate() {
        assert_eq!(
            text,
            &format!("{{\"seq\":{i}}}"),
            "records in order, none lost"
        );
    }
    let got = read_object(
        "t.ndjson.zst",
        &zstd::encode_all(&lines[..], 3).unwrap()[..200],
        0,
        cfg(),
    );
    assert_eq!(got.last().unwrap().2, Some(Rejection::CorruptObject));
}

#[test]
fn csv_rows_become_json_of_the_schemas_types() {
    let csv = b"device_id,seq,ok,extra\n007,12,true,x\n008,,maybe,\"a,\"\"b\"\"\"\n009,1\n010,13,false,y\n";
    let got = read_object("r.csv", csv, 0, cfg());
    let texts: Vec<_> = got.iter().map(|(t, _, k)| (t.as_str(), *k)).collect();
    assert_eq!(
        texts,
        [
            (
                r#"{"device_id":"007","seq":12,"ok":true,"extra":"x"}"#,
                None
            ),
            (
                r#"{"device_id":"008","ok":"maybe","extra":"a,\"b\""}"#,
                None
            ),
            ("009,1", Some(Rejection::BadCsvRow)),
            (
                r#"{"device_id":"010","seq":13,"ok":false,"extra":"y"}"#,
                None
            ),
        ]
    );
    let ends: Vec<u64> = got.iter().map(|r| r.1).collect();
    assert_eq!(
        as_read("r.csv", csv),
        [
            "007,12,true,x",
            "008,,maybe,\"a,\"\"b\"\"\"",
            "009,1",
            "010,13,false,y"
        ],
        "dead letters keep rows as they were"
    );
    assert_eq!(ends, [37, 58, 64, csv.len() as u64]);
    let rest = read_object("r.csv", csv, 58, cfg());
    assert_eq!(
        rest.len(),
        2,
        "resumed after the second row, the header read again"
    );
    let zst = zstd::encode_all(&csv[..], 1).unwrap();
    assert_eq!(read_object("r.csv.zst", &zst, 0, cfg()), got);
}

#[test]
fn objects_that_cannot_be_read_are_one_dead_letter_each() {
    let got = read_object("blob.bin", b"\x00\x01", 0, cfg());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, Some(Rejection::UnknownFormat));
    assert!(
        read_object("blob.bin", b"\x00\x01", 1, cfg()).is_empty(),
        "once"
    );
    let mut as_ndjson = cfg();
    as_ndjson.format = Some(ObjectFormat::Ndjson);
    assert_eq!(
        read_object("blob.bin", b"{}\n", 0, as_ndjson).len(),
        1,
        "a configured format"
    );
    let mut small = cfg();
    small.max_object_bytes = 4;
    let got = read_object("big.ndjson", b"{}\n{}\n", 0, small);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2, Some(Rejection::ObjectTooLarge));
}

#[test]
fn formats_and_compressions_follow_the_extensions_unless_configured() {
    let c = cfg();
    assert_eq!(
        kinds("a/b.ndjson", &c),
        (Some(ObjectFormat::Ndjson), Compression::None)
    );
    assert_eq!(
        kinds("a/b.CSV.GZ", &c),
        (Some(ObjectFormat::Csv), Compression::Gzip)
    );
    assert_eq!(
        kinds("b.json.zstd", &c),
        (Some(ObjectFormat::Ndjson), Compression::Zstd)
    );
    assert_eq!(kinds("b.gz", &c).0, None);
    let mut set = cfg();
    set.compression = Some(Compression::Gzip);
    set.format = Some(ObjectFormat::Csv);
    assert_eq!(
        kinds("dump", &set),
        (Some(ObjectFormat::Csv), Compression::Gzip)
    );
}
