//! The decoder's tests: chunks through [`RecordDecoder`], every dead-letter reason, and the
//! flat reader held to the strict one's result.

use super::*;
use arrow::util::display::array_value_to_string;

/// A decoder for a schema with every field type; `ts` is the event time.
fn decoder() -> RecordDecoder {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: s\nfields:\n  - {name: ts, type: timestamp}\n  - {name: id, type: string, required: true}\n  - {name: n32, type: int32}\n  - {name: n64, type: int64}\n  - {name: f32, type: float32}\n  - {name: f64, type: float64}\n  - {name: ok, type: bool}\n  - {name: seen, type: timestamp}\n",
    )
    .unwrap();
    let pipe = dir.path().join("p.yaml");
    std::fs::write(
        &pipe,
        "name: p\nschema: s.yaml\nsource: {local: {path: s}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: c}}\nevent_time: {field: ts}\nlimits: {max_future_skew: 1h}\n",
    )
    .unwrap();
    RecordDecoder::new(&crate::config::load_pipeline(&pipe, &|_| None).unwrap())
}

const NOW: i64 = 1_767_607_200_000_000; // 2026-01-05T10:00:00Z

fn chunk(records: &[&str]) -> RawChunk {
    let mut data = Vec::new();
    let mut spans = Vec::new();
    for r in records {
        spans.push(data.len()..data.len() + r.len());
        data.extend_from_slice(r.as_bytes());
    }
    RawChunk {
        shard: "shard-0".into(),
        resume_from: None,
        data,
        spans,
        seqs: (0..records.len()).map(|i| i.to_string()).collect(),
        keys: Default::default(),
        rejected: Vec::new(),
        arrival_us: NOW,
        as_read: Default::default(),
    }
}

/// Each good record's columns as text, and each dead letter's reason.
fn decode(records: &[&str]) -> (Vec<Vec<String>>, Vec<(u64, String)>) {
    let d = decoder().decode(&chunk(records), NOW);
    let rows = (0..d.batch.num_rows())
        .map(|r| {
            d.batch
                .columns()
                .iter()
                .map(|c| {
                    if c.is_null(r) {
                        "null".to_string()
                    } else {
                        array_value_to_string(c, r).unwrap()
                    }
                })
                .collect()
        })
        .collect();
    let dead = d
        .dead
        .iter()
        .map(|x| (x.seq.as_u64().unwrap(), x.reason.to_string()))
        .collect();
    (rows, dead)
}

fn reason_of(record: &str) -> String {
    let (rows, dead) = decode(&[record]);
    assert!(rows.is_empty(), "{record} was accepted: {rows:?}");
    dead[0].1.clone()
}

/// The chunk is checked for UTF-8 as a whole; each record must still be valid alone,
/// also when the chunk is (a character split between two records).
#[test]
fn a_record_is_judged_by_its_own_bytes_not_its_chunks() {
    let good = r#"{"ts":"2026-01-05T10:00:00Z","id":"é"}"#;
    let split = good.find('é').unwrap() + 1;
    let (head, tail) = good.as_bytes().split_at(split);
    let bad = b"{\"ts\":\"2026-01-05T10:00:00Z\",\"id\":\"\xff\"}";
    let cases: [(&[&[u8]], &[u64]); 3] = [
        // Both valid alone: the chunk's check stands for theirs.
        (&[good.as_bytes(), good.as_bytes()], &[]),
        // The chunk is valid UTF-8, but neither record is.
        (&[head, tail], &[0, 1]),
        // The chunk is not: each record is checked alone.
        (&[good.as_bytes(), bad, good.as_bytes()], &[1]),
    ];
    for (records, want_dead) in cases {
        let mut data = Vec::new();
        let mut spans = Vec::new();
        for r in records {
            spans.push(data.len()..data.len() + r.len());
            data.extend_from_slice(r);
        }
        let c = RawChunk {
            data,
            spans,
            seqs: (0..records.len()).map(|i| i.to_string()).collect(),
            ..chunk(&[])
        };
        let d = decoder().decode(&c, NOW);
        let dead: Vec<u64> = d.dead.iter().map(|x| x.seq.as_u64().unwrap()).collect();
        assert_eq!(dead, want_dead);
        assert_eq!(d.batch.num_rows(), records.len() - want_dead.len());
        for x in &d.dead {
            assert!(
                x.reason.to_string().starts_with("invalid_utf8: "),
                "{}",
                x.reason
            );
        }
    }
}

#[test]
fn every_type_lands_in_its_column() {
    let (rows, dead) = decode(&[
        r#"{"ts":"2026-01-05T11:00:00+01:00","id":"a\"b\u00e9","n32":-7,"n64":9007199254740993,"f32":1.5,"f64":2,"ok":true,"seen":"2026-01-05 09:00:00"}"#,
        r#"{"id":"x","ts":"2026-01-05T10:00:00.123456Z","extra":{"deep":[1,{"a":null}]},"n64":"42","f64":"-0.5","ok":null}"#,
    ]);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(
        rows[0],
        [
            "2026-01-05T10:00:00Z",
            "a\"bé",
            "-7",
            "9007199254740993",
            "1.5",
            "2.0",
            "true",
            "2026-01-05T09:00:00Z",
            "shard-0",
            "0"
        ]
    );
    assert_eq!(
        rows[1],
        [
            "2026-01-05T10:00:00.123456Z",
            "x",
            "null",
            "42",
            "null",
            "-0.5",
            "null",
            "null",
            "shard-0",
            "1"
        ]
    );
}

#[test]
fn a_repeated_key_keeps_its_last_value_and_an_escaped_key_still_matches() {
    let (rows, dead) =
        decode(&[r#"{"ts":"2026-01-05T10:00:00Z","\u0069d":"first","id":"second"}"#]);
    assert!(dead.is_empty(), "{dead:?}");
    assert_eq!(rows[0][1], "second");
}

#[test]
fn bad_records_get_reasons_and_leave_no_trace_among_the_good() {
    let good = r#"{"ts":"2026-01-05T10:00:00Z","id":"g"}"#;
    let (rows, dead) = decode(&[
        good,
        r#"{"ts":"2026-01-05T10:00:00Z","id":"b","n32":1.5}"#,
        good,
    ]);
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r[1] == "g"), "{rows:?}");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, 1);
    assert!(
        dead[0].1.contains("`n32`: 1.5 is not an integer"),
        "{dead:?}"
    );
}

// Over 80 lines: one table of records and their reasons, which reads best whole.
#[test]
fn reasons_say_what_is_wrong() {
    let r = |fields: &str| format!(r#"{{"ts":"2026-01-05T10:00:00Z","id":"a",{fields}}}"#);
    let cases = [
        (
            r(r#""n32":2147483648"#),
            "wrong_type: field `n32`: 2147483648 is out of range",
        ),
        (
            r(r#""n64":1e3"#),
            "wrong_type: field `n64`: 1000 is not an integer",
        ),
        (
            r(r#""n64":-99999999999999999999"#),
            "wrong_type: field `n64`: -100000000000000000000 is out of range",
        ),
        (
            r(r#""n64":18446744073709551615"#),
            "wrong_type: field `n64`: 18446744073709551615 is out of range",
        ),
        (
            r(r#""n32":"3000000000""#),
            "wrong_type: field `n32`: 3000000000 is out of range",
        ),
        (
            r(r#""f64":"high""#),
            r#"wrong_type: field `f64`: failed to parse "high" as Float64"#,
        ),
        (
            r(r#""ok":"yes""#),
            "wrong_type: field `ok`: expected true or false, got a string",
        ),
        (
            r(r#""ok":1"#),
            "wrong_type: field `ok`: expected true or false, got a number",
        ),
        (
            r(r#""id":true"#),
            "wrong_type: field `id`: expected a string, got a boolean",
        ),
        (
            r(r#""f32":[1]"#),
            "wrong_type: field `f32`: expected a number, got an array",
        ),
        (
            r(r#""seen":"soon""#),
            r#"bad_timestamp: field `seen` value "soon""#,
        ),
        (
            r#"{"ts":"2026-01-05T10:00:00Z"}"#.to_string(),
            "missing_field: required field `id`",
        ),
        (
            r#"{"ts":"2026-01-05T12:00:01Z","id":"a"}"#.to_string(),
            "future_event_time",
        ),
        // A type error does not hide a syntax error after it.
        (
            r(r#""n32":"x","f64":}"#),
            "invalid_json: expected value at line 1 column",
        ),
        // Nor a missing field a bad timestamp.
        (
            r#"{"ts":"late"}"#.to_string(),
            r#"bad_event_time: field `ts` value "late""#,
        ),
        // serde_json skips a value outside the schema without recursing, however deep.
        (
            format!(r#"{{"a":{}{}}}"#, "[".repeat(10_000), "]".repeat(10_000)),
            "missing_field: required field `ts`",
        ),
        (
            "[1,".to_string(),
            "not_an_object: a record must be a JSON object (got an array at line 1 column 1)",
        ),
        (
            "{} {}".to_string(),
            "multiple_values: the record holds 2 JSON values",
        ),
    ];
    for (record, expected) in cases {
        let got = reason_of(&record);
        assert!(
            got.starts_with(expected),
            "{record}\n  got      {got}\n  expected {expected}"
        );
    }
}

#[test]
fn a_chunk_of_only_bad_records_gives_an_empty_batch_of_the_schema() {
    let d = decoder().decode(&chunk(&["", "nope"]), NOW);
    assert_eq!(d.batch.num_rows(), 0);
    assert_eq!(d.batch.schema(), *decoder().schema());
    assert_eq!(d.dead.len(), 2);
}

/// A JSON number of random shape: digits, a fraction, an exponent, long enough to need
/// correct rounding, sometimes beyond i64 or f64.
fn random_number(rng: &mut fastrand::Rng) -> String {
    let digits =
        |rng: &mut fastrand::Rng, n: usize| -> String { (0..n).map(|_| rng.digit(10)).collect() };
    let mut s = String::new();
    if rng.bool() {
        s.push('-');
    }
    let n = rng.usize(1..22);
    let int = digits(rng, n);
    s.push_str(int.trim_start_matches('0'));
    if s.is_empty() || s == "-" {
        s.push('0');
    }
    if rng.u8(..3) == 0 {
        s.push('.');
        let n = rng.usize(1..25);
        s.push_str(&digits(rng, n));
    }
    if rng.u8(..4) == 0 {
        s.push(if rng.bool() { 'e' } else { 'E' });
        s.push_str(["", "+", "-"][rng.usize(..3)]);
        s.push_str(&rng.u16(..400).to_string());
    }
    s
}

/// The flat reader either declines or fills exactly what the strict serde_json reader
/// fills, error included, over hand-picked edge cases and random records mutated byte by
/// byte (so both readers see broken syntax, escapes, nesting, odd numbers).
// Over 80 lines: the hand-picked corpus is most of it.
#[test]
fn the_fast_reader_agrees_with_the_strict_one() {
    let d = decoder();
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut corpus: Vec<String> = [
        r#"{"ts":"2026-01-05T10:00:00Z","id":"a","n32":1,"n64":-2,"f32":1.5,"f64":-0.25,"ok":true,"seen":"2026-01-05T10:00:00.5Z"}"#,
        r#" { "id" : "é\t" , "ts" : "2026-01-05T10:00:00.123456789Z" , "ok" : false } "#,
        r#"{"id":"a","ts":"2026-01-05T10:00:00Z","extra":{"a":[1,{"b":null}]},"n64":null}"#,
        r#"{"id":"a\"b","ts":"2026-01-05 10:00:00+01:00","id":"c"}"#,
        r#"{"id":"a","ts":"2026-02-29T10:00:00Z"}"#,
        r#"{"id":"a","ts":"2024-02-29T23:59:59.9999999Z","seen":"2026-13-01T00:00:00Z"}"#,
        r#"{"n64":-0,"n32":-0.0,"f64":-0}"#,
        r#"{"n64":01}"#,
        r#"{"f64":1e400,"id":"x"}"#,
        r#"{"skip":1e400,"id":"x","ts":"2026-01-05T10:00:00Z"}"#,
        r#"{"n64":18446744073709551615,"f64":18446744073709551616}"#,
        r#"{"n64":9223372036854775808}"#,
        r#"{"n64":-9223372036854775808,"n32":-9223372036854775809}"#,
        r#"{"n32":2147483648,"id":1}"#,
        r#"{"n64":1.5,"n64":2,"id":"a"}"#,
        r#"{"n64":"12","f64":"1.5","ok":"true","id":true}"#,
        r#"{"n64":1.0,"f32":1E5,"f64":2.2250738585072011e-308}"#,
        r#"{"f64":0.1000000000000000055511151231257827,"f32":9007199254740993}"#,
        r#"{"id":"x",}"#,
        r#"{"id":"x"}{"id":"y"}"#,
        r#"{"id":"x"} x"#,
        r#"{"ok":tru}"#,
        r#"{"ok":true1}"#,
        r#"{"n64":1.}"#,
        r#"{"n64":.5}"#,
        r#"{"f64":1e}"#,
        r#"{"f64":-}"#,
        r#"{}"#,
        r#"[]"#,
        r#""id""#,
    ]
    .map(String::from)
    .to_vec();
    for _ in 0..300 {
        let (a, b, c) = (
            random_number(&mut rng),
            random_number(&mut rng),
            random_number(&mut rng),
        );
        corpus.push(format!(
            r#"{{"ts":"2026-01-05T10:00:{:02}.{}Z","id":"d{}","n32":{a},"n64":{b},"f32":{c},"f64":{a},"skip":{c}}}"#,
            rng.u8(..60),
            rng.u32(..1_000_000),
            rng.u16(..)
        ));
    }
    let alphabet = b"{}[],:\" \t\n\\0123456789.eE+-tfnulxZT";
    let (mut accepted, mut declined) = (0, 0);
    for round in 0..40_000 {
        let mut rec = corpus[rng.usize(..corpus.len())].clone().into_bytes();
        for _ in 0..(round % 4) {
            let at = rng.usize(..=rec.len());
            match rng.u8(..3) {
                0 if at < rec.len() => {
                    rec.remove(at);
                }
                1 if at < rec.len() => rec[at] = alphabet[rng.usize(..alphabet.len())],
                _ => rec.insert(at, alphabet[rng.usize(..alphabet.len())]),
            }
        }
        let Ok(text) = std::str::from_utf8(&rec) else {
            continue;
        };
        let (mut fast, mut strict) = (Vec::new(), Vec::new());
        let fast_result = d.parse(text, &mut fast, true);
        let strict_result = d.parse(text, &mut strict, false);
        assert_eq!(
            format!("{fast_result:?} {fast:?}"),
            format!("{strict_result:?} {strict:?}"),
            "record {text}"
        );
        let mut slots: Vec<Slot> = (0..d.fields.len()).map(|_| Slot::Absent).collect();
        match flat::read(&d.fields, text, &mut slots, &mut None) {
            Some(()) => accepted += 1,
            None => declined += 1,
        }
    }
    assert!(
        accepted > 10_000 && declined > 10_000,
        "{accepted} accepted, {declined} declined"
    );
}

/// A decoder whose partition keys prove `tenant` and `id`, as `identity:` configures it.
fn identity_decoder() -> RecordDecoder {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: s\nfields:\n  - {name: ts, type: timestamp}\n  - {name: tenant, type: string}\n  - {name: id, type: string, required: true}\n  - {name: v, type: float64}\n",
    )
    .unwrap();
    let pipe = dir.path().join("p.yaml");
    std::fs::write(
        &pipe,
        "name: p\nschema: s.yaml\nsource: {kinesis: {stream: s}}\nlake: {local: {path: l}}\ncheckpoints: {local: {path: c}}\nevent_time: {field: ts}\nidentity: {from: partition_key, key: \"{tenant}/{id}\"}\n",
    )
    .unwrap();
    RecordDecoder::new(&crate::config::load_pipeline(&pipe, &|_| None).unwrap())
}

#[test]
fn the_partition_key_proves_tenant_and_device_and_a_spoof_goes_to_dead_letter() {
    let records = [
        // Honest.
        (
            r#"{"ts":"2026-01-05T09:00:00Z","tenant":"a","id":"pi-1","v":1}"#,
            "a/pi-1",
        ),
        // Claims another device.
        (
            r#"{"ts":"2026-01-05T09:00:00Z","tenant":"a","id":"pi-2","v":2}"#,
            "a/pi-1",
        ),
        // Claims another tenant.
        (
            r#"{"ts":"2026-01-05T09:00:00Z","tenant":"b","id":"pi-1","v":3}"#,
            "a/pi-1",
        ),
        // Says nothing: both come from the key.
        (r#"{"ts":"2026-01-05T09:00:00Z","v":4}"#, "b/pi-9"),
        // A key of another shape.
        (
            r#"{"ts":"2026-01-05T09:00:00Z","tenant":"a","id":"pi-1","v":5}"#,
            "pi-1",
        ),
        // An empty level.
        (
            r#"{"ts":"2026-01-05T09:00:00Z","id":"pi-1","v":6}"#,
            "/pi-1",
        ),
        // Escaped JSON that says the same as the key (the strict reader's path).
        (
            r#"{"ts":"2026-01-05T09:00:00Z","tenant":"\u0061","id":"pi-1","v":7}"#,
            "a/pi-1",
        ),
    ];
    let mut c = chunk(&records.iter().map(|r| r.0).collect::<Vec<_>>());
    c.keys = records.iter().map(|r| r.1).collect();
    let d = identity_decoder().decode(&c, NOW);
    let col = |name: &str, r: usize| {
        array_value_to_string(d.batch.column_by_name(name).unwrap(), r).unwrap()
    };
    let good: Vec<(String, String, String)> = (0..d.batch.num_rows())
        .map(|r| (col("tenant", r), col("id", r), col("v", r)))
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        good,
        [
            (s("a"), s("pi-1"), s("1.0")),
            (s("b"), s("pi-9"), s("4.0")),
            (s("a"), s("pi-1"), s("7.0"))
        ]
    );
    let dead: Vec<(u64, String)> = d
        .dead
        .iter()
        .map(|x| (x.seq.as_u64().unwrap(), x.reason.to_string()))
        .collect();
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert!(
        d.dead
            .iter()
            .all(|x| x.reason.kind() == "identity_mismatch")
    );
    assert_eq!(
        dead[0],
        (
            1,
            r#"identity_mismatch: field `id` says "pi-2" but the channel proves "pi-1" (partition key "a/pi-1")"#
                .to_string()
        )
    );
    assert!(
        dead[1].1.contains(r#"field `tenant` says "b""#),
        "{}",
        dead[1].1
    );
    assert!(
        dead[2].1.contains("does not have the shape {tenant}/{id}"),
        "{}",
        dead[2].1
    );
    assert_eq!(dead[3].0, 5);
    // The raw bytes go along as they came.
    assert_eq!(d.dead[0].raw, records[1].0.as_bytes());
    // Without keys nothing is proven, and nothing is let through.
    let c = chunk(&[records[0].0]);
    let d = identity_decoder().decode(&c, NOW);
    assert_eq!((d.batch.num_rows(), d.dead.len()), (0, 1));
    assert!(d.dead[0].reason.to_string().contains("no partition key"));
}
