//! The common record read fast: a flat JSON object whose keys and strings hold no escapes and
//! whose values are strings, numbers, `true`, `false` or `null`.
//!
//! Anything else (an escape, a nested value, a number serde_json would read as a float
//! beyond an integer's range, any syntax error) makes [`read`] answer `None`. The strict
//! serde_json reader then reads the record from the start, so it alone words every error.
//! For a record this reader accepts, it fills the same slots the strict reader would. A unit
//! test runs both over thousands of mutated records and compares them.
//!
//! It never calls the strict reader: values go to [`Value`], as the strict reader's do, and
//! the chunk loop does the falling back. Floats are correctly rounded on both paths:
//! `str::parse` here, and serde_json with its `float_roundtrip` feature there.

use std::borrow::Cow;

use super::field::{FieldSpec, Slot, Value};

/// Fills `slots` (one per field, all `Absent`) from `text`, or `None` if the strict reader
/// must decide. Type errors go to `wrong`, as the strict reader reports them.
pub(super) fn read<'a>(
    fields: &[FieldSpec],
    text: &'a str,
    slots: &mut [Slot<'a>],
    wrong: &mut Option<String>,
) -> Option<()> {
    let b = text.as_bytes();
    let mut i = ws(b, 0);
    if *b.get(i)? != b'{' {
        return None;
    }
    i = ws(b, i + 1);
    if *b.get(i)? == b'}' {
        i += 1;
    } else {
        // Records usually list their fields in one order: try the one after the last.
        let mut guess = 0;
        loop {
            if *b.get(i)? != b'"' {
                return None;
            }
            let end = string_end(b, i + 1)?;
            let key = i + 1..end;
            i = ws(b, end + 1);
            if *b.get(i)? != b':' {
                return None;
            }
            i = ws(b, i + 1);
            let field = match fields.get(guess) {
                Some(f) if f.key.is_at(b, &key) => Some(guess),
                _ => fields.iter().position(|f| f.key.is_at(b, &key)),
            };
            let next = match field {
                Some(k) => {
                    guess = k + 1;
                    let value = Value {
                        field: &fields[k],
                        wrong: &mut *wrong,
                    };
                    read_value(text, i, Some((value, &mut slots[k])))?
                }
                None => read_value(text, i, None)?,
            };
            i = ws(b, next);
            match *b.get(i)? {
                b',' => i = ws(b, i + 1),
                b'}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (ws(b, i) == b.len()).then_some(())
}

/// The value at `i` into the field's slot (none for a key outside the schema), and the
/// index after it.
type Out<'s, 'a> = Option<(Value<'s>, &'s mut Slot<'a>)>;

fn read_value<'a>(text: &'a str, i: usize, out: Out<'_, 'a>) -> Option<usize> {
    let b = text.as_bytes();
    let literal = |word: &[u8]| b[i..].starts_with(word).then_some(i + word.len());
    let (next, value) = match *b.get(i)? {
        b'"' => {
            let end = string_end(b, i + 1)?;
            (end + 1, Token::Str(&text[i + 1..end]))
        }
        b't' => (literal(b"true")?, Token::Bool(true)),
        b'f' => (literal(b"false")?, Token::Bool(false)),
        b'n' => (literal(b"null")?, Token::Null),
        b'-' | b'0'..=b'9' => read_number(text, i)?,
        _ => return None,
    };
    // An assignment per arm: one `match` producing the slot built it on the stack and then
    // copied it, a store-forwarding stall per field.
    if let Some((v, slot)) = out {
        match value {
            Token::Str(s) => *slot = v.text(Cow::Borrowed(s)),
            Token::Bool(x) => *slot = v.boolean(x),
            Token::Null => *slot = Slot::Absent,
            Token::Uint(n) => *slot = v.uint(n),
            Token::Int(n) => *slot = v.int(n),
            Token::Float(x) => *slot = v.float(x),
            Token::Number => return None,
        }
    }
    Some(next)
}

/// A scalar JSON value, as serde_json would hand it to a visitor.
enum Token<'a> {
    Str(&'a str),
    Bool(bool),
    Null,
    Uint(u64),
    Int(i64),
    Float(f64),
    /// A number serde_json reads in a way of its own (beyond u64, `-0`, beyond f64): the
    /// strict reader decides, if the field is in the schema.
    Number,
}

/// A number by JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`. The
/// integer and fraction digits are accumulated as they are scanned: one pass over them.
fn read_number(text: &str, start: usize) -> Option<(usize, Token<'_>)> {
    let b = text.as_bytes();
    let negative = b[start] == b'-';
    let digits = start + usize::from(negative);
    // Wrapping: the digit counts below say when the value is exact.
    let mut mantissa = 0u64;
    let mut scan = |mut i: usize| {
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
            i += 1;
        }
        i
    };
    let int_end = scan(digits);
    let int_len = int_end - digits;
    if int_len == 0 || (int_len > 1 && b[digits] == b'0') {
        return None; // no digit, or a leading zero
    }
    let mut end = int_end;
    let mut fraction_len = None;
    if b.get(end) == Some(&b'.') {
        let fraction = end + 1;
        end = scan(fraction);
        if end == fraction {
            return None;
        }
        fraction_len = Some(end - fraction);
    }
    let mut exponent = false;
    if matches!(b.get(end), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(end + 1), Some(b'+' | b'-')));
        let digits = end + 1 + sign;
        end = digits_end(b, digits);
        if end == digits {
            return None;
        }
        exponent = true;
    }
    let token = match fraction_len {
        // At most 15 digits in all make an integer below 2^53, and 10^k (k <= 15) is a double
        // too, so the one IEEE division is correctly rounded, as `str::parse` rounds
        // (Clinger's fast path).
        Some(k) if !exponent && int_len + k <= 15 => {
            let x = mantissa as f64 / POW10[k];
            Token::Float(if negative { -x } else { x })
        }
        _ if end > int_end => match text[start..end].parse::<f64>() {
            Ok(x) if x.is_finite() => Token::Float(x),
            _ => Token::Number, // serde_json says "number out of range"
        },
        // Beyond u64 (or below i64), or `-0`, serde_json reads a float. 19 digits always fit.
        _ => match (int_len <= 19)
            .then_some(mantissa)
            .or_else(|| decimal(&b[digits..int_end]))
        {
            Some(0) if negative => Token::Number,
            Some(n) if negative => i64::try_from(-i128::from(n)).map_or(Token::Number, Token::Int),
            Some(n) => Token::Uint(n),
            None => Token::Number,
        },
    };
    Some((end, token))
}

const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

/// The value of ASCII digits, or `None` beyond u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &c| {
        n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

/// Where the digits starting at `i` end (`i` itself if there are none).
fn digits_end(b: &[u8], i: usize) -> usize {
    i + b.get(i..).map_or(0, |rest| {
        rest.iter().take_while(|c| c.is_ascii_digit()).count()
    })
}

/// The index of the quote closing a string whose text starts at `i`, or `None` for an
/// escape, a control character or no closing quote. Eight bytes at a time: a byte that is
/// `"`, `\` or below 0x20 sets its top bit in `hit` (bytes above the first such one may be
/// set falsely, so only the lowest counts).
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOPS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x;
    let mut at = i;
    while let Some(word) = b.get(at..at + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let quote = zero_byte(w ^ (ONES * u64::from(b'"')));
        let escape = zero_byte(w ^ (ONES * u64::from(b'\\')));
        let control = w.wrapping_sub(ONES * 0x20) & !w;
        let hit = (quote | escape | control) & TOPS;
        if hit != 0 {
            at += (hit.trailing_zeros() / 8) as usize;
            return (b[at] == b'"').then_some(at);
        }
        at += 8;
    }
    let len = b
        .get(at..)?
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    (b[at + len] == b'"').then_some(at + len)
}

/// Past JSON white space.
fn ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\t' | b'\r')) {
        i += 1;
    }
    i
}
