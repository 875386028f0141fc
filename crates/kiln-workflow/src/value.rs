//! Values of the expression language and GitHub's coercion rules.
//!
//! The expression language has six kinds of values: null, boolean, number (always an IEEE-754
//! double), string, array and object. Objects keep their insertion order and are looked up
//! case-insensitively. Operators and functions coerce between kinds with rules modelled on
//! JavaScript's, which this module implements exactly as GitHub's evaluator does:
//!
//! - **Truthiness** ([`Value::is_truthy`]): `null`, `false`, `0`, `-0`, `NaN` and `''` are
//!   falsy; everything else (including empty arrays and objects) is truthy.
//! - **To number** ([`Value::to_number`]): `null` → 0, booleans → 0/1, strings by JavaScript's
//!   `Number(string)` (surrounding whitespace ignored, `''` → 0, `0x`/`0o`/`0b` prefixes,
//!   `Infinity`, anything else → `NaN`), arrays and objects → `NaN`.
//! - **To string** ([`Value::to_display_string`]): `null` → `''`, booleans → `true`/`false`,
//!   numbers with at most 15 decimals and no trailing zeros (`-0` → `0`, large and tiny
//!   magnitudes in exponent form as JavaScript prints them), arrays → `Array`, objects →
//!   `Object`.
//! - **Loose equality** ([`Value::loose_eq`]): values of different kinds are compared as
//!   numbers after coercing `null`/booleans (and a string facing a number); strings compare
//!   case-insensitively; `NaN` equals nothing; arrays and objects are equal only to themselves.

use indexmap::IndexMap;
use std::cmp::Ordering;
use std::fmt::Write as _;

/// A value of the expression language.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A number (always a double).
    Number(f64),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object; keys keep insertion order and are looked up case-insensitively.
    Object(IndexMap<String, Value>),
}

/// The kind of a [`Value`], named as GitHub names it in messages and test vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `Null`.
    Null,
    /// `Boolean`.
    Boolean,
    /// `Number`.
    Number,
    /// `String`.
    String,
    /// `Array`.
    Array,
    /// `Object`.
    Object,
}

impl Kind {
    /// The kind's name: `Null`, `Boolean`, `Number`, `String`, `Array` or `Object`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Null => "Null",
            Kind::Boolean => "Boolean",
            Kind::Number => "Number",
            Kind::String => "String",
            Kind::Array => "Array",
            Kind::Object => "Object",
        }
    }

    /// Whether values of this kind are primitives (not arrays or objects).
    pub fn is_primitive(self) -> bool {
        !matches!(self, Kind::Array | Kind::Object)
    }
}

impl Value {
    /// The value's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Boolean,
            Value::Number(_) => Kind::Number,
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    /// GitHub's truthiness: `null`, `false`, `0`, `NaN` and `''` are falsy, all else truthy.
    pub fn is_truthy(&self) -> bool {
        match self {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => number_is_truthy(*n),
            Value::String(s) => !s.is_empty(),
            Value::Array(_) | Value::Object(_) => true,
        }
    }

    /// GitHub's string coercion, used for interpolation, `format`, `join` and comparisons.
    pub fn to_display_string(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Bool(b) => bool_to_string(*b).to_owned(),
            Value::Number(n) => number_to_string(*n),
            Value::String(s) => s.clone(),
            Value::Array(_) => "Array".to_owned(),
            Value::Object(_) => "Object".to_owned(),
        }
    }

    /// GitHub's number coercion (JavaScript's `Number(value)` for primitives; `NaN` for arrays
    /// and objects).
    pub fn to_number(&self) -> f64 {
        match self {
            Value::Null => 0.0,
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Number(n) => *n,
            Value::String(s) => string_to_number(s),
            Value::Array(_) | Value::Object(_) => f64::NAN,
        }
    }

    /// Case-insensitive object lookup (the first key that matches wins). `None` for a missing
    /// key or a value that is not an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(map) => get_ignore_case(map, key),
            _ => None,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// GitHub's loose equality (`==`): see the module documentation. Arrays and objects are
    /// equal only to themselves (the same allocation).
    pub fn loose_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Array(a), Value::Array(b)) => std::ptr::eq(a, b),
            (Value::Object(a), Value::Object(b)) => std::ptr::eq(a, b),
            _ => match (Scalar::of(self), Scalar::of(other)) {
                (Some(a), Some(b)) => scalar_eq(a, b),
                _ => false,
            },
        }
    }

    /// Converts JSON into a value (numbers become doubles; key order is kept).
    pub fn from_json(v: serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(b),
            serde_json::Value::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Value::String(s),
            serde_json::Value::Array(a) => {
                Value::Array(a.into_iter().map(Value::from_json).collect())
            }
            serde_json::Value::Object(o) => {
                let mut map = IndexMap::with_capacity(o.len());
                for (k, v) in o {
                    map.insert(k, Value::from_json(v));
                }
                Value::Object(map)
            }
        }
    }

    /// Converts into JSON. Integral numbers become JSON integers; `NaN` and infinities, which
    /// JSON cannot represent, become `null`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => number_to_json(*n),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Value::to_json).collect()),
            Value::Object(o) => {
                let mut map = serde_json::Map::with_capacity(o.len());
                for (k, v) in o {
                    map.insert(k.clone(), v.to_json());
                }
                serde_json::Value::Object(map)
            }
        }
    }

    /// GitHub's `toJSON` text: pretty-printed with two-space indentation and `\n` newlines,
    /// numbers printed as JavaScript prints them.
    pub fn to_json_pretty(&self) -> String {
        let mut out = String::new();
        write_json(self, 0, &mut out);
        out
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<f64> for Value {
    fn from(n: f64) -> Value {
        Value::Number(n)
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Value {
        Value::from_json(v)
    }
}

impl From<IndexMap<String, Value>> for Value {
    fn from(map: IndexMap<String, Value>) -> Value {
        Value::Object(map)
    }
}

impl From<Vec<Value>> for Value {
    fn from(items: Vec<Value>) -> Value {
        Value::Array(items)
    }
}

/// Case-insensitive lookup in an object map; the first matching key wins.
pub(crate) fn get_ignore_case<'m, V>(map: &'m IndexMap<String, V>, key: &str) -> Option<&'m V> {
    map.iter().find(|(k, _)| keys_equal(k, key)).map(|(_, v)| v)
}

/// Object keys compare as GitHub compares them: ignoring case.
fn keys_equal(a: &str, b: &str) -> bool {
    if a.len() == b.len() && a.eq_ignore_ascii_case(b) {
        return true;
    }
    if a.is_ascii() && b.is_ascii() {
        return false;
    }
    upper_special(a) == upper_special(b)
}

pub(crate) fn bool_to_string(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

pub(crate) fn number_is_truthy(n: f64) -> bool {
    !(n == 0.0 || n.is_nan())
}

/// A primitive value seen through a borrow, used by the coercion rules.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scalar<'a> {
    Null,
    Bool(bool),
    Number(f64),
    String(&'a str),
}

impl<'a> Scalar<'a> {
    fn of(v: &'a Value) -> Option<Scalar<'a>> {
        match v {
            Value::Null => Some(Scalar::Null),
            Value::Bool(b) => Some(Scalar::Bool(*b)),
            Value::Number(n) => Some(Scalar::Number(*n)),
            Value::String(s) => Some(Scalar::String(s)),
            Value::Array(_) | Value::Object(_) => None,
        }
    }

    pub(crate) fn to_number(self) -> f64 {
        match self {
            Scalar::Null => 0.0,
            Scalar::Bool(b) => f64::from(u8::from(b)),
            Scalar::Number(n) => n,
            Scalar::String(s) => string_to_number(s),
        }
    }
}

/// Brings two primitives to a common kind before comparing them, as GitHub does: a string
/// facing a number becomes a number, and `null`/booleans facing anything of another kind
/// become numbers. Returns `None` when the kinds still differ.
fn coerce_pair<'a>(a: Scalar<'a>, b: Scalar<'a>) -> Option<(Scalar<'a>, Scalar<'a>)> {
    use Scalar as S;
    match (a, b) {
        (S::Null, S::Null)
        | (S::Bool(_), S::Bool(_))
        | (S::Number(_), S::Number(_))
        | (S::String(_), S::String(_)) => Some((a, b)),
        (S::Number(_), S::String(_)) => Some((a, S::Number(b.to_number()))),
        (S::String(_), S::Number(_)) => Some((S::Number(a.to_number()), b)),
        (S::Null | S::Bool(_), _) => coerce_pair(S::Number(a.to_number()), b),
        (_, S::Null | S::Bool(_)) => coerce_pair(a, S::Number(b.to_number())),
    }
}

/// `==` on primitives.
pub(crate) fn scalar_eq(a: Scalar<'_>, b: Scalar<'_>) -> bool {
    match coerce_pair(a, b) {
        Some((Scalar::Null, Scalar::Null)) => true,
        Some((Scalar::Bool(x), Scalar::Bool(y))) => x == y,
        Some((Scalar::Number(x), Scalar::Number(y))) => x == y,
        Some((Scalar::String(x), Scalar::String(y))) => {
            x == y || upper_special(x) == upper_special(y)
        }
        _ => false,
    }
}

/// `<`/`>` on primitives: `Some(ordering)` when the values are comparable, `None` otherwise
/// (different kinds after coercion, `NaN`, or `null`s).
pub(crate) fn scalar_cmp(a: Scalar<'_>, b: Scalar<'_>) -> Option<Ordering> {
    match coerce_pair(a, b) {
        Some((Scalar::Bool(x), Scalar::Bool(y))) => Some(x.cmp(&y)),
        Some((Scalar::Number(x), Scalar::Number(y))) => x.partial_cmp(&y),
        Some((Scalar::String(x), Scalar::String(y))) => {
            let (x, y) = (upper_special(x), upper_special(y));
            // JavaScript compares strings by UTF-16 code units.
            Some(x.encode_utf16().cmp(y.encode_utf16()))
        }
        _ => None,
    }
}

/// Upper-cases for case-insensitive comparison, leaving the Turkish dotless `ı` alone (so it
/// does not become `I`), as GitHub does.
pub(crate) fn upper_special(s: &str) -> String {
    if s.is_ascii() {
        return s.to_ascii_uppercase();
    }
    let mut out = String::with_capacity(s.len());
    for part in s.split_inclusive('ı') {
        match part.strip_suffix('ı') {
            Some(head) => {
                out.push_str(&head.to_uppercase());
                out.push('ı');
            }
            None => out.push_str(&part.to_uppercase()),
        }
    }
    out
}

/// JavaScript's `StrWhiteSpaceChar`: what `Number(string)` trims.
fn is_js_whitespace(c: char) -> bool {
    matches!(
        c,
        '\u{9}' | '\u{a}' | '\u{b}' | '\u{c}' | '\u{d}' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'
            ..='\u{200a}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202f}'
                | '\u{205f}'
                | '\u{3000}'
                | '\u{feff}'
    )
}

/// JavaScript's `Number(string)`: surrounding whitespace is ignored, `''` is 0, `0x`/`0o`/`0b`
/// prefixes (unsigned), `Infinity` with an optional sign, and decimal literals with an
/// optional sign, fraction and exponent. Anything else is `NaN`.
pub fn string_to_number(s: &str) -> f64 {
    let t = s.trim_matches(is_js_whitespace);
    if t.is_empty() {
        return 0.0;
    }
    let b = t.as_bytes();
    if b.len() > 2 && b[0] == b'0' {
        let radix = match b[1] {
            b'x' | b'X' => 16,
            b'o' | b'O' => 8,
            b'b' | b'B' => 2,
            _ => 0,
        };
        if radix != 0 {
            return parse_radix(&t[2..], radix);
        }
    }
    let (sign, unsigned) = match b[0] {
        b'+' => (1.0, &t[1..]),
        b'-' => (-1.0, &t[1..]),
        _ => (1.0, t),
    };
    if unsigned == "Infinity" {
        return sign * f64::INFINITY;
    }
    if !is_decimal_literal(unsigned) {
        return f64::NAN;
    }
    match unsigned.parse::<f64>() {
        Ok(v) => sign * v,
        Err(_) => f64::NAN,
    }
}

/// `digits [. digits?] | . digits`, then an optional exponent.
fn is_decimal_literal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let int_digits = count_digits(&b[i..]);
    i += int_digits;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        frac_digits = count_digits(&b[i..]);
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        let exp_digits = count_digits(&b[i..]);
        if exp_digits == 0 {
            return false;
        }
        i += exp_digits;
    }
    i == b.len()
}

fn count_digits(b: &[u8]) -> usize {
    b.iter().take_while(|c| c.is_ascii_digit()).count()
}

fn parse_radix(digits: &str, radix: u32) -> f64 {
    if digits.is_empty() {
        return f64::NAN;
    }
    let mut value = 0.0f64;
    for c in digits.chars() {
        match c.to_digit(radix) {
            Some(d) => value = value * f64::from(radix) + f64::from(d),
            None => return f64::NAN,
        }
    }
    value
}

/// GitHub's number-to-string coercion: `0` for ±0; otherwise the value rounded to at most 15
/// decimals (JavaScript's `toFixed(15)`), printed as JavaScript prints numbers.
pub fn number_to_string(n: f64) -> String {
    if n == 0.0 {
        return "0".to_owned();
    }
    if !n.is_finite() || n.abs() >= 1e21 {
        return js_number_to_string(n);
    }
    let fixed = to_fixed_15(n);
    let rounded = fixed.parse::<f64>().unwrap_or(n);
    js_number_to_string(rounded)
}

/// JavaScript's `n.toFixed(15)` for finite `|n| < 1e21`: exact decimal rounding, ties away
/// from zero.
fn to_fixed_15(n: f64) -> String {
    // A tie at the 16th decimal needs an exact expansion that ends there, which only values
    // with at most 16 binary fraction digits have (n * 2^16 integral). Rust's formatting
    // rounds ties to even, so handle those by hand.
    let scaled = n * 65536.0;
    if scaled.fract() == 0.0 {
        let s16 = format!("{n:.16}");
        if let Some(head) = s16.strip_suffix('5') {
            return increment_decimal(head);
        }
    }
    format!("{n:.15}")
}

/// Adds one unit in the last place to a decimal string like `-12.345` (magnitude grows).
fn increment_decimal(s: &str) -> String {
    let mut bytes: Vec<u8> = s.as_bytes().to_vec();
    let mut i = bytes.len();
    loop {
        if i == 0 {
            let at = usize::from(bytes.first() == Some(&b'-'));
            bytes.insert(at, b'1');
            break;
        }
        i -= 1;
        match bytes[i] {
            b'9' => bytes[i] = b'0',
            b'0'..=b'8' => {
                bytes[i] += 1;
                break;
            }
            b'-' => {
                bytes.insert(i + 1, b'1');
                break;
            }
            _ => {} // the decimal point
        }
    }
    String::from_utf8(bytes).unwrap_or_else(|_| s.to_owned())
}

/// JavaScript's `Number.prototype.toString()`: the shortest digits that round-trip, in plain
/// notation for 1e-7 <= |n| < 1e21 and exponent notation (`1e+21`, `1.5e-7`) otherwise.
pub fn js_number_to_string(n: f64) -> String {
    if n.is_nan() {
        return "NaN".to_owned();
    }
    if n.is_infinite() {
        return if n > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if n == 0.0 {
        return "0".to_owned();
    }
    let mut out = String::new();
    if n < 0.0 {
        out.push('-');
    }
    let (digits, exp) = shortest_digits(n.abs());
    let k = digits.len() as i32;
    let pos = exp + 1; // position of the decimal point relative to the digits
    if k <= pos && pos <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (pos - k) as usize));
    } else if 0 < pos && pos <= 21 {
        out.push_str(&digits[..pos as usize]);
        out.push('.');
        out.push_str(&digits[pos as usize..]);
    } else if -6 < pos && pos <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-pos) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = pos - 1;
        let _ = write!(out, "e{}{}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    out
}

/// Splits `{:e}` output (`d.ddde[-]x`) into its digits and exponent.
fn split_sci(sci: &str) -> (String, i32) {
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let digits = mantissa.chars().filter(|c| *c != '.').collect();
    (digits, exp.parse().unwrap_or(0))
}

/// The shortest decimal digits that round-trip to `a` (positive, finite) and the decimal
/// exponent of the first digit, choosing as JavaScript does: of the shortest candidates, the
/// one closest to `a`, and the even one when two are equally close. (Rust's `{:e}` gives the
/// shortest digits too, but breaks exact ties upwards.)
fn shortest_digits(a: f64) -> (String, i32) {
    let (digits, exp) = split_sci(&format!("{a:e}"));
    let k = digits.len();
    // A tie needs `a`'s exact expansion to be the k shortest digits plus a final 5; exact
    // expansions that short only occur with 18 or fewer significant digits, so 80 digits of
    // exact formatting settle it.
    let (exact, exact_exp) = split_sci(&format!("{a:.80e}"));
    if exact_exp != exp || exact.len() <= k + 1 {
        return (digits, exp);
    }
    let (head, tail) = exact.split_at(k);
    if !tail.starts_with('5') || !tail[1..].bytes().all(|b| b == b'0') {
        return (digits, exp);
    }
    let low = head.to_owned();
    let high = increment_decimal(head);
    if high.len() != k {
        return (digits, exp);
    }
    let round_trips = |d: &str| {
        let text = format!("{}.{}e{exp}", &d[..1], &d[1..]);
        text.parse::<f64>().is_ok_and(|v| v == a)
    };
    let even = |d: &str| {
        d.bytes()
            .last()
            .is_some_and(|b| (b - b'0').is_multiple_of(2))
    };
    for candidate in [&low, &high] {
        if even(candidate) && round_trips(candidate) {
            return (candidate.clone(), exp);
        }
    }
    (digits, exp)
}

fn number_to_json(n: f64) -> serde_json::Value {
    if !n.is_finite() {
        return serde_json::Value::Null;
    }
    if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        // Exactly representable integer: keep it an integer in JSON.
        return serde_json::Value::from(n as i64);
    }
    serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Appends `s` as a JSON string literal, escaping as JavaScript's `JSON.stringify` does.
pub(crate) fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

pub(crate) fn write_json_number(n: f64, out: &mut String) {
    if n.is_finite() {
        out.push_str(&js_number_to_string(n));
    } else {
        out.push_str("null");
    }
}

pub(crate) fn push_indent(level: usize, out: &mut String) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', level * 2));
}

pub(crate) fn write_json(v: &Value, level: usize, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(bool_to_string(*b)),
        Value::Number(n) => write_json_number(*n, out),
        Value::String(s) => write_json_string(s, out),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_indent(level + 1, out);
                write_json(item, level + 1, out);
            }
            push_indent(level, out);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_indent(level + 1, out);
                write_json_string(k, out);
                out.push_str(": ");
                write_json(item, level + 1, out);
            }
            push_indent(level, out);
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthiness_follows_github() {
        for falsy in [
            Value::Null,
            Value::Bool(false),
            Value::Number(0.0),
            Value::Number(-0.0),
            Value::Number(f64::NAN),
            Value::from(""),
        ] {
            assert!(!falsy.is_truthy(), "{falsy:?} should be falsy");
        }
        for truthy in [
            Value::Bool(true),
            Value::Number(-1.0),
            Value::from("false"),
            Value::from("0"),
            Value::Array(vec![]),
            Value::Object(IndexMap::new()),
        ] {
            assert!(truthy.is_truthy(), "{truthy:?} should be truthy");
        }
    }

    #[test]
    fn string_to_number_is_javascripts() {
        assert_eq!(string_to_number(""), 0.0);
        assert_eq!(string_to_number("  \t"), 0.0);
        assert_eq!(string_to_number(" 123456.789 "), 123456.789);
        assert_eq!(string_to_number("+1"), 1.0);
        assert_eq!(string_to_number("-.5"), -0.5);
        assert_eq!(string_to_number("5."), 5.0);
        assert_eq!(string_to_number("1E+1"), 10.0);
        assert_eq!(string_to_number("0xfF"), 255.0);
        assert_eq!(string_to_number("0o17"), 15.0);
        assert_eq!(string_to_number("0b101"), 5.0);
        assert_eq!(string_to_number("-Infinity"), f64::NEG_INFINITY);
        for nan in [
            "abc", "-0xFF", "0x", "1e", ".", "-", "inf", "infinity", "NaN", "1_000", "0xFZ",
        ] {
            assert!(string_to_number(nan).is_nan(), "{nan} should be NaN");
        }
    }

    #[test]
    fn number_to_string_matches_vectors() {
        let cases = [
            (0.0, "0"),
            (-0.0, "0"),
            (1.0, "1"),
            (-2.0, "-2"),
            (0.5, "0.5"),
            (123456.789, "123456.789"),
            (1.2e-2, "0.012"),
            (120.0, "120"),
            (1e21, "1e+21"),
            (1.5e300, "1.5e+300"),
            (1e-7, "1e-7"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (1e-16, "0"),
            (123456789012345680000.0, "123456789012345680000"),
        ];
        for (n, want) in cases {
            assert_eq!(number_to_string(n), want, "for {n:e}");
        }
        // More digits than a double holds: rounded to 15 decimals.
        let long = string_to_number("0.84551240822557006");
        assert_eq!(number_to_string(long), "0.84551240822557");
    }

    #[test]
    fn shortest_digits_break_ties_to_even_like_javascript() {
        // Exactly halfway between ...909.2 and ...909.3: JavaScript prints the even digit.
        // -1605477925282909.25, built exactly (the literal trips clippy's precision lint).
        let tie = -(6_421_911_701_131_637_i64 as f64) / 4.0;
        assert_eq!(tie, string_to_number("-1605477925282909.25"));
        assert_eq!(js_number_to_string(tie), "-1605477925282909.2");
        assert_eq!(number_to_string(tie), "-1605477925282909.2");
        assert_eq!(js_number_to_string(0.1 + 0.2), "0.30000000000000004");
        assert_eq!(js_number_to_string(123e-20), "1.23e-18");
    }

    #[test]
    fn to_fixed_rounds_ties_away_from_zero() {
        // 2^-16 = 0.0000152587890625 has its tie exactly at the 16th decimal.
        assert_eq!(to_fixed_15(2f64.powi(-16)), "0.000015258789063");
        assert_eq!(to_fixed_15(-(2f64.powi(-16))), "-0.000015258789063");
        assert_eq!(increment_decimal("9.999"), "10.000");
        assert_eq!(increment_decimal("-0.999"), "-1.000");
    }

    #[test]
    fn loose_equality_coerces_like_github() {
        assert!(Value::Null.loose_eq(&Value::Number(0.0)));
        assert!(Value::Bool(true).loose_eq(&Value::Number(1.0)));
        assert!(Value::from("").loose_eq(&Value::Number(0.0)));
        assert!(Value::from("abc").loose_eq(&Value::from("ABC")));
        assert!(!Value::from("ı").loose_eq(&Value::from("I")));
        assert!(!Value::Number(f64::NAN).loose_eq(&Value::Number(f64::NAN)));
        assert!(Value::Null.loose_eq(&Value::from("")));
        let arr = Value::Array(vec![]);
        assert!(arr.loose_eq(&arr));
        assert!(!arr.loose_eq(&Value::Array(vec![])));
    }

    #[test]
    fn object_lookup_ignores_case() {
        let v = Value::from_json(serde_json::json!({"simPLE": {"teST": 123}}));
        let inner = v.get("SIMple").and_then(|i| i.get("test"));
        assert_eq!(inner, Some(&Value::Number(123.0)));
        assert_eq!(v.get("missing"), None);
        assert_eq!(Value::Null.get("x"), None);
    }

    #[test]
    fn pretty_json_matches_javascript() {
        let v = Value::from_json(serde_json::json!({"a": [1, 2.5, "x\"y"], "b": {}, "c": []}));
        assert_eq!(
            v.to_json_pretty(),
            "{\n  \"a\": [\n    1,\n    2.5,\n    \"x\\\"y\"\n  ],\n  \"b\": {},\n  \"c\": []\n}"
        );
        assert_eq!(Value::from("\u{1}").to_json_pretty(), "\"\\u0001\"");
        assert_eq!(Value::Number(-0.0).to_json_pretty(), "0");
    }

    #[test]
    fn json_round_trip_keeps_integers() {
        let j = serde_json::json!({"n": 3, "f": 1.5, "s": "x", "a": [null, true]});
        assert_eq!(Value::from_json(j.clone()).to_json(), j);
    }
}
