//! The two codecs of MarketStore's `/rpc`: msgpack (tagged snake_case keys, `bin` columns) and JSON (Go field
//! names, base64 columns).
//!
//! Requests of both codecs are decoded into one [`rmpv::Value`] tree and read through [`Fields`], which knows
//! each field's msgpack tag and Go name. Replies are built once as a [`Val`] tree and written by either
//! encoder; column data stays in zero-copy chunks until the encoder copies it into the response body.

use bytes::Bytes;
use rmpv::Value;

/// A reply value. Map keys carry both spellings: `(msgpack tag, Go field name)`.
#[derive(Debug, Clone)]
pub enum Val {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F32(f32),
    F64(f64),
    Str(String),
    /// Binary data as chunks (concatenated on the wire): msgpack `bin`, JSON base64.
    Bin(Vec<Bytes>),
    Arr(Vec<Val>),
    /// A struct: keys are `(msgpack tag, Go field name)`.
    Obj(Vec<(&'static str, &'static str, Val)>),
    /// A map with data-dependent string keys (same in both codecs).
    Map(Vec<(String, Val)>),
    /// A request value echoed verbatim (the envelope `id`).
    Raw(Value),
}

impl Val {
    pub fn str(s: impl Into<String>) -> Val {
        Val::Str(s.into())
    }
}

/// Which codec a request arrived with (decides the reply encoding and how request keys are matched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Msgpack,
    Json,
}

// ------------------------------------------------------------------------------------------------ msgpack

/// msgpack primitives in their most compact encodings, as Go's vmihailenco/msgpack writes them (`rmp`
/// picks the smallest marker). Writes go to a `Vec`, which cannot fail, so the results are dropped.
pub mod mp {
    use rmp::encode;

    pub fn nil(out: &mut Vec<u8>) {
        let _ = encode::write_nil(out);
    }
    pub fn bool(out: &mut Vec<u8>, b: bool) {
        let _ = encode::write_bool(out, b);
    }
    pub fn uint(out: &mut Vec<u8>, u: u64) {
        let _ = encode::write_uint(out, u);
    }
    pub fn sint(out: &mut Vec<u8>, i: i64) {
        let _ = encode::write_sint(out, i);
    }
    pub fn f32(out: &mut Vec<u8>, f: f32) {
        let _ = encode::write_f32(out, f);
    }
    pub fn f64(out: &mut Vec<u8>, f: f64) {
        let _ = encode::write_f64(out, f);
    }
    pub fn str(out: &mut Vec<u8>, s: &str) {
        let _ = encode::write_str(out, s);
    }
    pub fn bin_len(out: &mut Vec<u8>, n: usize) {
        let _ = encode::write_bin_len(out, len32(n));
    }
    pub fn array_len(out: &mut Vec<u8>, n: usize) {
        let _ = encode::write_array_len(out, len32(n));
    }
    pub fn map_len(out: &mut Vec<u8>, n: usize) {
        let _ = encode::write_map_len(out, len32(n));
    }
    /// msgpack lengths are 32-bit; replies are bounded far below (gRPC/HTTP message limits).
    fn len32(n: usize) -> u32 {
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// Encode a reply tree as msgpack (most compact integer encodings, `bin` for binary, float32 kept).
pub fn to_msgpack(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::Nil => mp::nil(out),
        Val::Bool(b) => mp::bool(out, *b),
        Val::Int(i) => mp::sint(out, *i),
        Val::UInt(u) => mp::uint(out, *u),
        Val::F32(f) => mp::f32(out, *f),
        Val::F64(f) => mp::f64(out, *f),
        Val::Str(s) => mp::str(out, s),
        Val::Bin(chunks) => {
            let n: usize = chunks.iter().map(|c| c.len()).sum();
            mp::bin_len(out, n);
            out.reserve(n);
            for c in chunks {
                out.extend_from_slice(c);
            }
        }
        Val::Arr(a) => {
            mp::array_len(out, a.len());
            for x in a {
                to_msgpack(x, out);
            }
        }
        Val::Obj(fields) => {
            mp::map_len(out, fields.len());
            for (k, _, x) in fields {
                mp::str(out, k);
                to_msgpack(x, out);
            }
        }
        Val::Map(m) => {
            mp::map_len(out, m.len());
            for (k, x) in m {
                mp::str(out, k);
                to_msgpack(x, out);
            }
        }
        Val::Raw(r) => {
            // Writing into a Vec cannot fail.
            let _ = rmpv::encode::write_value(out, r);
        }
    }
}

// ------------------------------------------------------------------------------------------------ JSON

/// Encode a reply tree as JSON with Go field names (what gorilla's json2 codec produces).
pub fn to_json(v: &Val) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Val::Nil => J::Null,
        Val::Bool(b) => J::Bool(*b),
        Val::Int(i) => J::from(*i),
        Val::UInt(u) => J::from(*u),
        Val::F32(f) => serde_json::Number::from_f64(*f as f64).map(J::Number).unwrap_or(J::Null),
        Val::F64(f) => serde_json::Number::from_f64(*f).map(J::Number).unwrap_or(J::Null),
        Val::Str(s) => J::String(s.clone()),
        Val::Bin(chunks) => {
            let mut all = Vec::with_capacity(chunks.iter().map(|c| c.len()).sum());
            for c in chunks {
                all.extend_from_slice(c);
            }
            J::String(base64_encode(&all))
        }
        Val::Arr(a) => J::Array(a.iter().map(to_json).collect()),
        Val::Obj(fields) => J::Object(fields.iter().map(|(_, g, x)| (g.to_string(), to_json(x))).collect()),
        Val::Map(m) => J::Object(m.iter().map(|(k, x)| (k.clone(), to_json(x))).collect()),
        Val::Raw(r) => msgpack_to_json(r),
    }
}

/// A decoded request value as JSON (used to echo a JSON request's `id`).
pub fn msgpack_to_json(v: &Value) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

/// Convert a JSON request into the msgpack value model (`Str` keys, integers kept as integers).
pub fn json_to_msgpack(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Boolean(b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        J::String(s) => Value::from(s),
        J::Array(a) => Value::Array(a.into_iter().map(json_to_msgpack).collect()),
        J::Object(o) => Value::Map(o.into_iter().map(|(k, v)| (Value::from(k), json_to_msgpack(v))).collect()),
    }
}

/// Standard base64 with padding (Go's `[]byte` JSON encoding).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decode base64 as clients send it: the standard or URL-safe alphabet, padding optional, line breaks
/// ignored; `None` on invalid input.
pub fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine as _;
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent).with_decode_allow_trailing_bits(true);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, LENIENT);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, LENIENT);
    let clean: std::borrow::Cow<'_, [u8]> = if s.iter().any(|c| *c == b'\n' || *c == b'\r') {
        s.iter().copied().filter(|c| *c != b'\n' && *c != b'\r').collect::<Vec<u8>>().into()
    } else {
        s.into()
    };
    STANDARD.decode(&clean).or_else(|_| URL_SAFE.decode(&clean)).ok()
}

// ------------------------------------------------------------------------------------------------ budgets

/// Most values one `/rpc` request may decode into. Decoded trees cost ~50 bytes a value whatever their
/// size on the wire (a 1-byte msgpack int, a 2-byte JSON `1,`), so a body of tiny values would expand 25-60x;
/// real requests carry a few dozen values (column data travels as a handful of binary blobs).
pub const MAX_REQUEST_VALUES: usize = 1_000_000;
/// Deepest nesting accepted (requests are four levels deep).
pub const MAX_REQUEST_DEPTH: usize = 64;

/// Why a request body is refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyCheck {
    /// Not well-formed (a length past the end, an invalid marker): a parse error.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed so far but over the value or depth budget.
    #[error("{0}")]
    OverBudget(String),
}

fn budget_error(values: usize) -> BodyCheck {
    BodyCheck::OverBudget(format!(
        "rpc: request has more than {values} values (limit {MAX_REQUEST_VALUES}; column data goes in binary blobs)"
    ))
}

/// Check a msgpack body before decoding it: at most `max_values` values, nesting at most `max_depth`, and
/// every length it claims within the body. Scans without allocating per value.
pub fn check_msgpack(buf: &[u8], max_values: usize, max_depth: usize) -> Result<(), BodyCheck> {
    let short = || BodyCheck::Malformed("msgpack: a length runs past the end of the body".to_string());
    let mut pos = 0usize;
    // Values still to read at each open container level (the outermost is the one top-level value).
    let mut stack: Vec<u64> = vec![1];
    let mut count = 0usize;
    let be = |b: &[u8]| b.iter().fold(0u64, |a, &x| (a << 8) | x as u64);
    while let Some(top) = stack.last_mut() {
        if *top == 0 {
            stack.pop();
            continue;
        }
        *top -= 1;
        count += 1;
        if count > max_values {
            return Err(budget_error(max_values));
        }
        let b = *buf.get(pos).ok_or_else(short)?;
        pos += 1;
        let take = |n: usize, pos: &mut usize| -> Result<u64, BodyCheck> {
            let v = buf.get(*pos..*pos + n).map(be).ok_or_else(short)?;
            *pos += n;
            Ok(v)
        };
        // (payload bytes to skip, elements of a container)
        let (skip, elems): (u64, u64) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * (b & 0x0f) as u64),
            0x90..=0x9f => (0, (b & 0x0f) as u64),
            0xa0..=0xbf => ((b & 0x1f) as u64, 0),
            0xc1 => return Err(BodyCheck::Malformed("msgpack: invalid marker 0xc1".into())),
            0xc4 | 0xd9 => (take(1, &mut pos)?, 0),
            0xc5 | 0xda => (take(2, &mut pos)?, 0),
            0xc6 | 0xdb => (take(4, &mut pos)?, 0),
            0xc7 => (take(1, &mut pos)? + 1, 0),
            0xc8 => (take(2, &mut pos)? + 1, 0),
            0xc9 => (take(4, &mut pos)? + 1, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (0, take(2, &mut pos)?),
            0xdd => (0, take(4, &mut pos)?),
            0xde => (0, 2 * take(2, &mut pos)?),
            0xdf => (0, 2 * take(4, &mut pos)?),
        };
        let rest_now = buf.len() - pos;
        if skip > rest_now as u64 || elems > rest_now as u64 {
            return Err(short());
        }
        if elems > (max_values - count) as u64 {
            return Err(budget_error(max_values));
        }
        pos += skip as usize;
        if elems > 0 {
            if stack.len() >= max_depth {
                return Err(BodyCheck::OverBudget(format!("msgpack: nesting deeper than {max_depth}")));
            }
            stack.push(elems);
        }
    }
    Ok(())
}

/// Check a JSON body before decoding it: at most `max_values` values (counted from the separators and
/// brackets outside strings) and nesting at most `max_depth`.
pub fn check_json(buf: &[u8], max_values: usize, max_depth: usize) -> Result<(), BodyCheck> {
    let (mut in_str, mut esc, mut depth, mut count) = (false, false, 0usize, 1usize);
    for &c in buf {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                count += 1;
                if depth > max_depth {
                    return Err(BodyCheck::OverBudget(format!("json: nesting deeper than {max_depth}")));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' | b':' => count += 1,
            _ => {}
        }
        if count > max_values {
            return Err(budget_error(max_values));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------ requests

/// Bad request parameters (mapped to JSON-RPC -32600 / per-request errors).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// Read access to one request struct in either codec: msgpack keys match the tag exactly, JSON keys match
/// the Go field name case-insensitively (Go's `encoding/json` rules).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    map: &'a [(Value, Value)],
    codec: Codec,
}

impl<'a> Fields<'a> {
    /// View `v` as a struct; `what` names it in errors.
    pub fn of(v: &'a Value, codec: Codec, what: &str) -> Result<Fields<'a>, ParamError> {
        match v {
            Value::Map(m) => Ok(Fields { map: m, codec }),
            _ => Err(ParamError(format!("{what} must be a map"))),
        }
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The field with msgpack tag `tag` / Go name `go`.
    pub fn get(&self, tag: &str, go: &str) -> Option<&'a Value> {
        self.map
            .iter()
            .find(|(k, _)| match (self.codec, k.as_str()) {
                (Codec::Msgpack, Some(s)) => s == tag,
                (Codec::Json, Some(s)) => s.eq_ignore_ascii_case(go),
                _ => false,
            })
            .map(|(_, v)| v)
            .filter(|v| !v.is_nil())
    }

    pub fn str(&self, tag: &str, go: &str) -> Result<Option<&'a str>, ParamError> {
        match self.get(tag, go) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| ParamError(format!("{tag} must be a string"))),
        }
    }

    pub fn bool(&self, tag: &str, go: &str) -> Result<Option<bool>, ParamError> {
        match self.get(tag, go) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| ParamError(format!("{tag} must be a boolean"))),
        }
    }

    pub fn i64(&self, tag: &str, go: &str) -> Result<Option<i64>, ParamError> {
        match self.get(tag, go) {
            None => Ok(None),
            Some(v) => as_i64(v).map(Some).ok_or_else(|| ParamError(format!("{tag} must be an integer"))),
        }
    }

    pub fn array(&self, tag: &str, go: &str) -> Result<Option<&'a [Value]>, ParamError> {
        match self.get(tag, go) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a.as_slice())),
            Some(_) => Err(ParamError(format!("{tag} must be an array"))),
        }
    }

    pub fn strings(&self, tag: &str, go: &str) -> Result<Option<Vec<String>>, ParamError> {
        match self.array(tag, go)? {
            None => Ok(None),
            Some(a) => a
                .iter()
                .map(|v| as_string(v).ok_or_else(|| ParamError(format!("{tag} must be an array of strings"))))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
        }
    }

    /// A map of string keys to integers (`startindex`, `lengths`), in wire order.
    pub fn int_map(&self, tag: &str, go: &str) -> Result<Option<Vec<(String, i64)>>, ParamError> {
        match self.get(tag, go) {
            None => Ok(None),
            Some(Value::Map(m)) => m
                .iter()
                .map(|(k, v)| match (as_string(k), as_i64(v)) {
                    (Some(k), Some(v)) => Ok((k, v)),
                    _ => Err(ParamError(format!("{tag} must map strings to integers"))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(ParamError(format!("{tag} must be a map"))),
        }
    }

    /// A list of binary blobs: msgpack `bin` (or str), JSON base64 strings.
    pub fn blobs(&self, tag: &str, go: &str) -> Result<Option<Vec<&'a [u8]>>, ParamError> {
        let Some(a) = self.array(tag, go)? else { return Ok(None) };
        let mut out = Vec::with_capacity(a.len());
        for v in a {
            match v {
                Value::Binary(b) => out.push(b.as_slice()),
                Value::String(s) => out.push(s.as_bytes()),
                Value::Nil => out.push(&[][..]),
                _ => return Err(ParamError(format!("{tag} must be an array of binary strings"))),
            }
        }
        Ok(Some(out))
    }
}

/// Any msgpack integer (or an integral float) as i64.
pub fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => i.as_i64().or_else(|| i.as_u64().map(|u| u.min(i64::MAX as u64) as i64)),
        Value::F64(f) if f.fract() == 0.0 => Some(*f as i64),
        Value::F32(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

/// A msgpack str (or UTF-8 bin) as String.
pub fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => s.as_str().map(str::to_string),
        Value::Binary(b) => std::str::from_utf8(b).ok().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar", &[0u8, 255, 128, 7]] {
            let e = base64_encode(data);
            assert_eq!(base64_decode(e.as_bytes()).unwrap(), data);
            assert_eq!(base64_decode(e.trim_end_matches('=').as_bytes()).unwrap(), data);
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode(b"Zm9v\nYmFy").unwrap(), b"foobar");
        assert_eq!(base64_decode(b"_-8").unwrap(), base64_decode(b"/+8").unwrap());
        assert!(base64_decode(b"not base64!").is_none());
    }

    #[test]
    fn msgpack_primitives_match_rmpv() {
        let ints: [i64; 14] = [0, 1, 127, 128, 255, 256, 65535, 65536, -1, -32, -33, -128, -129, i64::MIN];
        for i in ints {
            let mut out = Vec::new();
            mp::sint(&mut out, i);
            let mut want = Vec::new();
            rmpv::encode::write_value(&mut want, &Value::from(i)).unwrap();
            assert_eq!(out, want, "{i}");
        }
        for n in [0usize, 5, 31, 32, 255, 256, 70000] {
            let s = "x".repeat(n);
            let mut out = Vec::new();
            mp::str(&mut out, &s);
            assert_eq!(rmpv::decode::read_value(&mut &out[..]).unwrap(), Value::from(s.as_str()));
            let mut out = Vec::new();
            mp::bin_len(&mut out, n);
            out.extend(std::iter::repeat_n(7u8, n));
            assert_eq!(rmpv::decode::read_value(&mut &out[..]).unwrap(), Value::Binary(vec![7; n]));
            let mut out = Vec::new();
            mp::array_len(&mut out, n);
            out.extend(std::iter::repeat_n(0xc0u8, n));
            assert_eq!(rmpv::decode::read_value(&mut &out[..]).unwrap(), Value::Array(vec![Value::Nil; n]));
        }
    }

    #[test]
    fn budgets_refuse_many_tiny_values_and_lying_lengths() {
        let enc = |v: &Value| {
            let mut o = Vec::new();
            rmpv::encode::write_value(&mut o, v).unwrap();
            o
        };
        let req = Value::Map(vec![
            (Value::from("jsonrpc"), Value::from("2.0")),
            (Value::from("params"), Value::Array(vec![Value::Map(vec![(Value::from("data"), Value::Binary(vec![1; 300]))])])),
            (Value::from("x"), Value::Array(vec![Value::from(-1), Value::F64(1.5), Value::from(70000), Value::from("s")])),
        ]);
        let ok = enc(&req);
        assert_eq!(check_msgpack(&ok, 100, 8), Ok(()));
        // 13 values: map, 3 keys, "2.0", array, map, key, bin, array, 4 elements.
        assert_eq!(check_msgpack(&ok, 14, 8), Ok(()));
        assert!(check_msgpack(&ok, 12, 8).unwrap_err().to_string().contains("more than 12 values"));
        assert!(check_msgpack(&ok, 100, 2).unwrap_err().to_string().contains("nesting"));
        for cut in 0..ok.len() {
            assert!(check_msgpack(&ok[..cut], 100, 8).is_err(), "cut at {cut}");
        }
        // An array claiming 4 billion elements, a bin claiming 4 GB: refused without allocating.
        assert!(check_msgpack(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 40, 8).unwrap_err().to_string().contains("past the end"));
        assert!(check_msgpack(&[0xc6, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 40, 8).unwrap_err().to_string().contains("past the end"));
        let tiny = enc(&Value::Array(vec![Value::from(1); 5000]));
        assert!(check_msgpack(&tiny, 1000, 8).unwrap_err().to_string().contains("more than 1000 values"));
        assert_eq!(check_msgpack(&tiny, 5001, 8), Ok(()));

        assert_eq!(check_json(br#"{"a": [1, 2, "x,y:[{"], "b": {"c": "\"]"}}"#, 10, 8), Ok(()));
        assert!(check_json(br#"{"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}"#, 10, 8).is_err());
        assert!(check_json(b"[[[[1]]]]", 100, 3).unwrap_err().to_string().contains("nesting"));
    }

    #[test]
    fn msgpack_compact_ints_and_bin_chunks() {
        let v = Val::Obj(vec![
            ("a", "A", Val::Int(1)),
            ("b", "B", Val::Bin(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")])),
        ]);
        let mut out = Vec::new();
        to_msgpack(&v, &mut out);
        let back = rmpv::decode::read_value(&mut &out[..]).unwrap();
        assert_eq!(back["a"], Value::from(1));
        assert_eq!(back["b"], Value::Binary(b"abc".to_vec()));
        assert_eq!(out[0..3], [0x82, 0xa1, b'a']);
        assert_eq!(out[3], 0x01); // positive fixint
        assert_eq!(to_json(&v), serde_json::json!({"A": 1, "B": "YWJj"}));
    }
}
